"""Privacy accounting for DP-SGD with Poisson sampling and the Gaussian mechanism.

Accountants are registered by name ("rdp", "prv", "pld") and share one stateful
interface: ``step`` records a run-length history of (noise_multiplier, sample_rate,
count) segments, and ``epsilon(delta)`` recomputes ε from the whole history. Because ε
is a pure function of that history, ``state_dict`` is just the history, and a resumed
run reports exactly the ε an uninterrupted one would.

"rdp" and "prv" reuse opacus' analysis; "pld" uses Google's dp_accounting. RDP is the
loosest (an upper bound via Rényi moments) and how loose depends on the run: at the σ that gives
PLD ε = 8, RDP reports 10–17 % more for long runs (q = 0.01, 1,000 steps; q = 0.004, 3,000 steps)
but 33–42 % more for the short, low-noise runs of the demo (q = 0.025 or 0.017, 12 steps,
δ ≈ 3·10⁻⁴; 24–25 % at δ = 10⁻⁵), and 70 % more at ε = 1 there (tests/test_accounting.py pins
three of these). Calibrating with "pld" therefore
buys a smaller σ for the same guarantee. PLD is numerically tight; PRV reports the upper end of its
error bar, about 0.01 above PLD in absolute terms (<1% relative for ε >= 1).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from numbers import Integral
from typing import Any, ClassVar

import dp_accounting
import numpy as np
from dp_accounting import pld
from opacus.accountants import PRVAccountant, RDPAccountant

from dpnotes.errors import UserError

Segment = tuple[float, float, int]  # (noise_multiplier, sample_rate, num_steps)

_ACCOUNTANTS: dict[str, type[PrivacyAccountant]] = {}


def register_accountant(name: str) -> Callable[[type[PrivacyAccountant]], type[PrivacyAccountant]]:
    def register(cls: type[PrivacyAccountant]) -> type[PrivacyAccountant]:
        if name in _ACCOUNTANTS:
            raise ValueError(f"accountant {name!r} is already registered by {_ACCOUNTANTS[name].__name__}")
        cls.name = name
        _ACCOUNTANTS[name] = cls
        return cls

    return register


def available_accountants() -> list[str]:
    return sorted(_ACCOUNTANTS)


def make_accountant(name: str) -> PrivacyAccountant:
    try:
        return _ACCOUNTANTS[name]()
    except KeyError:
        raise ValueError(f"unknown accountant {name!r}; available: {', '.join(available_accountants())}") from None


def accountant_from_state(state: dict[str, Any]) -> PrivacyAccountant:
    """Rebuild whichever accountant wrote ``state`` (see ``PrivacyAccountant.state_dict``)."""
    accountant = make_accountant(state["accountant"])
    accountant.load_state_dict(state)
    return accountant


class PrivacyAccountant(ABC):
    name: ClassVar[str]

    def __init__(self) -> None:
        self.history: list[Segment] = []

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` DP-SGD steps, each Poisson-sampling at ``sample_rate``."""
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, Integral) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        noise_multiplier, sample_rate = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (noise_multiplier, sample_rate, self.history[-1][2] + int(num_steps))
        else:
            self.history.append((noise_multiplier, sample_rate, int(num_steps)))

    @property
    def steps_taken(self) -> int:
        return sum(count for _, _, count in self.history)

    def epsilon(self, delta: float) -> float:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self.history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self.history):
            return math.inf  # a noiseless step releases the gradient exactly
        return float(self._epsilon(delta))

    @abstractmethod
    def _epsilon(self, delta: float) -> float:
        """ε for the (non-empty, all σ > 0) history."""

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.name, "history": [list(segment) for segment in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["accountant"] != self.name:
            raise ValueError(f"state was written by the {state['accountant']!r} accountant, not {self.name!r}")
        self.history = [(float(sigma), float(q), int(count)) for sigma, q, count in state["history"]]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps_taken={self.steps_taken}, segments={len(self.history)})"


@register_accountant("rdp")
class RdpAccountant(PrivacyAccountant):
    # opacus' orders plus the large ones dp_accounting also uses: small-ε regimes (large σ)
    # are optimised at orders > 63, where opacus alone would warn and report a looser ε.
    extra_orders: ClassVar[tuple[int, ...]] = (128, 256, 512, 1024)

    def _epsilon(self, delta: float) -> float:
        opacus_accountant = RDPAccountant()
        opacus_accountant.history = list(self.history)  # same (σ, q, steps) layout as ours
        return opacus_accountant.get_epsilon(delta, alphas=[*RDPAccountant.DEFAULT_ALPHAS, *self.extra_orders])


@register_accountant("prv")
class PrvAccountant(PrivacyAccountant):
    # Absolute ε error of the FFT discretisation; opacus returns the upper end of the bound.
    eps_error: ClassVar[float] = 0.01

    def _epsilon(self, delta: float) -> float:
        opacus_accountant = PRVAccountant()
        opacus_accountant.history = list(self.history)
        with np.errstate(divide="ignore"):  # an unsampled step (q = 1) takes log(1 - q) = -inf on the way, harmlessly
            return opacus_accountant.get_epsilon(delta, eps_error=self.eps_error)


@register_accountant("pld")
class PldAccountant(PrivacyAccountant):
    value_discretization_interval: ClassVar[float] = 1e-4  # dp_accounting's default

    def _epsilon(self, delta: float) -> float:
        events = [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count
            )
            for sigma, q, count in self.history
        ]
        google_accountant = pld.PLDAccountant(value_discretization_interval=self.value_discretization_interval)
        google_accountant.compose(dp_accounting.ComposedDpEvent(events))
        return google_accountant.get_epsilon(delta)


def compute_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    tracker = make_accountant(accountant)
    tracker.step(noise_multiplier, sample_rate, steps)
    return tracker.epsilon(delta)


_MAX_NOISE_MULTIPLIER = 1e4


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    rtol: float = 1e-3,
) -> float:
    """σ with (1 - rtol) * target_epsilon <= ε(σ) <= target_epsilon.

    Bracketing bisection on σ (ε falls monotonically as σ grows), splitting at a log-log
    interpolation once both ends are finite (see ``_split_point``). The returned σ always
    satisfies the budget; ``rtol`` only bounds how much budget is left unused.
    """
    if target_epsilon == math.inf:
        return 0.0
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")

    def eps(sigma: float) -> float:
        return compute_epsilon(sigma, sample_rate, steps, delta, accountant)

    # Invariant: eps(low) > target >= eps(high). σ = 0 is a valid low end: its ε is infinite.
    low, low_eps, high = 0.0, math.inf, 1.0
    while (high_eps := eps(high)) > target_epsilon:
        low, low_eps, high = high, high_eps, 2 * high
        if high > _MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"no noise_multiplier <= {_MAX_NOISE_MULTIPLIER:g} reaches epsilon {target_epsilon} "
                f"at sample_rate={sample_rate}, steps={steps}, delta={delta}"
            )
    # The σ-width test stops the search should a numerical accountant's ε plateau (PRV/PLD
    # resolve ε to ~1e-3) before the ε window is hit; high is still within budget then.
    while target_epsilon - high_eps > rtol * target_epsilon and high - low > 1e-9 * high:
        middle = _split_point(low, low_eps, high, high_eps, aim=target_epsilon * (1 - rtol / 2))
        middle_eps = eps(middle)
        if middle_eps > target_epsilon:
            low, low_eps = middle, middle_eps
        else:
            high, high_eps = middle, middle_eps
    return high


def _split_point(low: float, low_eps: float, high: float, high_eps: float, aim: float) -> float:
    """Where to split the bracket [low, high]: the midpoint, or a log-log interpolation.

    Each PLD/PRV evaluation costs up to a second, and log ε is nearly linear in log σ, so
    interpolating reaches the window in ~3 evaluations instead of ~12 for the midpoint.
    Aiming inside the acceptance window (not at its edge) keeps the iterates from creeping
    up on it from one side; the margin keeps every split a real shrink of the bracket.
    """
    if low == 0 or not math.isfinite(low_eps):
        return (low + high) / 2
    fraction = math.log(low_eps / aim) / math.log(low_eps / high_eps)
    guess = low * (high / low) ** fraction
    margin = 0.05 * (high - low)
    return min(max(guess, low + margin), high - margin)


def max_steps_for_budget(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    noise_multiplier: float,
    accountant: str = "rdp",
    max_steps: int = 10_000_000,
) -> int:
    """Largest number of steps whose ε stays within ``target_epsilon`` (0 if even one step exceeds it)."""

    def fits(steps: int) -> bool:
        return compute_epsilon(noise_multiplier, sample_rate, steps, delta, accountant) <= target_epsilon

    if not fits(1):
        return 0
    low, high = 1, 2  # invariant: fits(low) and (high > max_steps or not fits(high))
    while high <= max_steps and fits(high):
        low, high = high, 2 * high
    high = min(high, max_steps + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


class PrivacyParameterError(UserError):
    """A privacy setting that is invalid or meaningless (ε ≤ 0, δ ≥ 1/N, ...)."""


def check_epsilon(epsilon: float) -> None:
    if math.isnan(epsilon) or epsilon <= 0:
        raise PrivacyParameterError(f"epsilon must be > 0 (or inf for non-private training), got {epsilon}")


def check_privacy_params(epsilon: float, delta: float, dataset_size: int) -> None:
    """Reject privacy targets that are invalid or meaningless for ``dataset_size`` privacy units.

    ``epsilon = inf`` means non-private training; δ is then irrelevant and not checked.
    """
    check_epsilon(epsilon)
    if dataset_size < 1:
        raise PrivacyParameterError(f"dataset_size must be >= 1, got {dataset_size}")
    if epsilon == math.inf:
        return
    if not 0 < delta < 1:
        raise PrivacyParameterError(f"delta must be in (0, 1), got {delta}")
    if delta >= 1 / dataset_size:
        # With δ >= 1/N a mechanism that publishes one random record in full is (0, δ)-DP.
        raise PrivacyParameterError(
            f"delta={delta:g} is not < 1/N = {1 / dataset_size:g} (N = {dataset_size} privacy units): "
            f"such a delta allows leaking whole records. Use delta well below 1/N, e.g. "
            f"1/(10N) = {1 / (10 * dataset_size):.3g}"
        )
