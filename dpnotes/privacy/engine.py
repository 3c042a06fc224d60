"""The privacy engine: ties clipping, Poisson sampling, noise and accounting into DP-SGD steps.

One logical step:  g = (Σ_units clip_C(grad_unit) + N(0, σ²C² I)) / (q·N)
with units sampled independently at rate q, then any optimizer steps on g. The secret sampling
and noise keys and the accountant's history form the privacy state, which goes into every
checkpoint (see randomness.py: the draws of a step are a function of its key, step and rank).

`PrivacyEngine.step` is the one DP step, a fixed sequence: sample (this rank's micro-batches of
the Poisson-sampled logical batch) → clip (per micro-batch) → noise (and the optimizer step) →
account (exactly once per logical step). How a model is laid out over processes only changes how
clip and noise are carried out; a `StepBackend` does those, chosen once when training is set up:
`backends.ReplicatedBackend` (one process, or DDP-style replicas) or `deepspeed.DeepSpeedBackend`
(ZeRO-1/2/3). Sampling, padding, accounting and the step's statistics live here only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Literal, Protocol, Sequence

import torch
from torch import nn

from dpnotes.privacy.accounting import (
    PrivacyParameterError,
    available_accountants,
    calibrate_noise_multiplier,
    check_epsilon,
    check_privacy_params,
    make_accountant,
)
from dpnotes.privacy.clipping import ClipResult, ClippingMode, PerExampleClipper
from dpnotes.privacy.noise import GaussianNoise
from dpnotes.privacy.randomness import SecretKeys, shared_keys
from dpnotes.privacy.sampling import PoissonSampler, pack_micro_batches, shard_units

PrivacyUnit = Literal["sequence", "patient"]
LossFn = Callable[[nn.Module, dict], torch.Tensor]


@dataclass
class PrivacyConfig:
    target_epsilon: float = 8.0  # math.inf: no noise (clipping kept), the non-private reference
    delta: float | None = None  # None: 1 / (10 · number of privacy units)
    max_grad_norm: float = 1.0
    expected_batch_size: int = 64  # sampling rate q = expected_batch_size / number of units
    steps: int = 100
    accountant: str = "rdp"
    clipping: ClippingMode = "bk"
    privacy_unit: PrivacyUnit = "sequence"
    micro_batch_size: int = 8
    noise_multiplier: float | None = None  # set to skip calibration; ε is then what it gives
    # None (the default): secret 128-bit sampling and noise keys from OS entropy. An int derives the
    # keys from it: for tests and audits only, and every result then says "not private: fixed seed".
    seed: int | None = None

    def check(self) -> None:
        """The checks that need no data, so that a bad setting stops a run before any work."""
        check_epsilon(self.target_epsilon)
        if self.delta is not None and not 0 < self.delta < 1:
            raise PrivacyParameterError(f"delta must be in (0, 1), got {self.delta}")
        for name in ("expected_batch_size", "steps", "micro_batch_size"):
            if getattr(self, name) <= 0:
                raise PrivacyParameterError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.privacy_unit not in ("sequence", "patient"):
            raise PrivacyParameterError(f"privacy_unit must be 'sequence' or 'patient', got {self.privacy_unit!r}")
        if not self.max_grad_norm > 0:
            raise PrivacyParameterError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise PrivacyParameterError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.accountant not in available_accountants():
            raise PrivacyParameterError(f"unknown accountant {self.accountant!r}; available: {', '.join(available_accountants())}")

    def validated_delta(self, num_units: int) -> float:
        """Check the whole configuration against the number of privacy units; return δ."""
        self.check()
        delta = self.delta if self.delta is not None else 1.0 / (10 * num_units)
        check_privacy_params(self.target_epsilon, delta, num_units)
        if self.expected_batch_size > num_units:
            raise PrivacyParameterError(f"expected_batch_size must be in [1, {num_units}], got {self.expected_batch_size}")
        return delta


@dataclass
class StepStats:
    """What one rank saw in one logical step. Every field but `epsilon` is computed from private
    data and is NOT covered by the DP guarantee: log it only to trusted, private sinks."""

    epsilon: float
    examples: int
    units: int
    clipped_units: int
    loss_sum: float
    tokens: int


NOT_PRIVATE = "not private: fixed seed"


@dataclass
class MicroBatch:
    """One forward/backward of a logical step on this rank."""

    batch: dict  # collated examples
    size: int  # number of examples
    group_index: torch.Tensor | None  # privacy unit of each example within the micro-batch (None: its own)
    padding: bool  # a zero-weight pass that only keeps the ranks' collectives in step; contributes nothing
    last: bool  # this rank's last micro-batch of the step


class StepBackend(Protocol):
    """What differs between the ways a model is laid out over processes; PrivacyEngine.step does the rest."""

    rank: int
    world_size: int

    def micro_batch_count(self, local: int) -> int:
        """How many micro-batches to run, given this rank's `local` ones (more: zero-weight padding)."""

    def clip(self, engine: PrivacyEngine, loss_fn: LossFn, micro: MicroBatch) -> tuple[torch.Tensor, ClipResult]:
        """Forward and backward one micro-batch so that its units' clipped gradients join the step's
        sum; return the detached per-example losses and the clip result."""

    def noise_and_step(self, engine: PrivacyEngine) -> None:
        """Add the step's noise (once per coordinate across ranks) to the clipped sum, scale by
        1/(q·N) and step the optimizer on the result."""


class PrivacyEngine:
    """DP-SGD over a model whose trainable parameters all have norm rules.

    `units`: number of privacy units N. `examples_of_unit`: for privacy_unit="patient", the
    example indices of each patient (None: each example is its own unit).
    """

    def __init__(
        self,
        model: nn.Module,
        config: PrivacyConfig,
        num_units: int,
        examples_of_unit: Sequence[Sequence[int]] | None = None,
    ):
        if config.privacy_unit == "patient" and examples_of_unit is None:
            raise ValueError("privacy_unit='patient' needs the examples of each patient")
        if config.privacy_unit == "sequence" and examples_of_unit is not None:
            raise ValueError("examples_of_unit is only meaningful with privacy_unit='patient'")
        self.config = config
        self.num_units = num_units
        self.examples_of_unit = examples_of_unit
        self.delta = config.validated_delta(num_units)
        self.sample_rate = config.expected_batch_size / num_units
        self.noise_multiplier = self._noise_multiplier()
        self._use_keys(shared_keys(config.seed))
        self.accountant = make_accountant(config.accountant)
        self.clipper = PerExampleClipper(model, config.max_grad_norm, config.clipping)

    def _use_keys(self, keys: SecretKeys) -> None:
        self.keys = keys
        self.sampler = PoissonSampler(self.num_units, self.sample_rate, keys.sampling)
        self.noise = GaussianNoise(self.noise_multiplier, self.config.max_grad_norm, keys.noise)

    @property
    def privacy_label(self) -> str | None:
        """None when the randomness is secret; otherwise what every result must say."""
        return None if self.keys.private else NOT_PRIVATE

    def privacy_status(self) -> dict:
        """What every report of a result trained by this engine carries about its randomness."""
        return {"private": self.keys.private, **({"note": NOT_PRIVATE} if not self.keys.private else {})}

    def _noise_multiplier(self) -> float:
        c = self.config
        if c.noise_multiplier is not None:
            return c.noise_multiplier
        if math.isinf(c.target_epsilon):
            return 0.0
        return calibrate_noise_multiplier(c.target_epsilon, self.delta, self.sample_rate, c.steps, accountant=c.accountant)

    # ---- reporting -------------------------------------------------------------------------
    @property
    def steps_taken(self) -> int:
        return self.accountant.steps_taken

    def epsilon(self) -> float:
        """ε spent so far at this engine's δ (∞ when σ = 0 and a step was taken)."""
        if self.steps_taken == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return self.accountant.epsilon(self.delta)

    def summary(self) -> dict:
        """Derived quantities to print at start and log."""
        return {
            **asdict(self.config),
            "seed": "secret (128-bit keys from OS entropy)" if self.keys.private else self.keys.fixed_seed,
            "private": self.keys.private,
            "privacy_units": self.num_units,
            "delta": self.delta,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "noise_std_on_sum": self.noise.std,
            "expected_batch_size": self.expected_batch_size,
        }

    def budget_allows_step(self) -> bool:
        """Whether one more step keeps ε within the target (training stops at the budget)."""
        if self.steps_taken >= self.config.steps:
            return False
        if math.isinf(self.config.target_epsilon):
            return True
        probe = make_accountant(self.config.accountant)
        probe.load_state_dict(self.accountant.state_dict())
        probe.step(self.noise_multiplier, self.sample_rate)
        return probe.epsilon(self.delta) <= self.config.target_epsilon * (1 + 1e-6)

    # ---- one logical step --------------------------------------------------------------------
    @property
    def expected_batch_size(self) -> float:
        """q·N, what DP gradients are divided by (the realised batch size is private)."""
        return self.sampler.expected_batch_size

    def micro_batches(self, rank: int = 0, world_size: int = 1) -> Iterator[tuple[list[int], torch.Tensor | None]]:
        """Sample the next logical batch and yield this rank's micro-batches as
        (example indices, unit index of each example within the micro-batch or None)."""
        units = shard_units(self.sampler.sample(self.steps_taken), rank, world_size)
        for examples, groups in pack_micro_batches(units.tolist(), self.examples_of_unit, self.config.micro_batch_size):
            yield examples, torch.tensor(groups) if self.examples_of_unit is not None else None

    def step(self, backend: StepBackend, fetch: Callable[[list[int]], dict], loss_fn: LossFn) -> StepStats:
        """One DP-SGD step: sample → clip → noise → account. `fetch(example_indices)` returns a
        collated batch; `loss_fn(model, batch)` the per-example losses."""
        local = list(self.micro_batches(backend.rank, backend.world_size))
        count = backend.micro_batch_count(len(local))
        self.clipper.reset_sums()
        examples = units = clipped = tokens = 0
        loss_sum = 0.0
        for k in range(count):
            padding = k >= len(local)
            indices, group_index = ([0], None) if padding else local[k]  # padding: any example, weight 0
            batch = fetch(indices)
            losses, result = backend.clip(self, loss_fn, MicroBatch(batch, len(indices), group_index, padding, k == count - 1))
            if padding:
                continue
            examples += len(indices)
            units += len(result.norms)
            clipped += result.clipped_count
            loss_sum += float(losses.sum())
            if "attention_mask" in batch:
                tokens += int(batch["attention_mask"].sum())
        backend.noise_and_step(self)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        return StepStats(self.epsilon(), examples, units, clipped, loss_sum, tokens)

    # ---- checkpointing (accelerate's register_for_checkpointing protocol) ---------------------
    def state_dict(self) -> dict:
        return {
            "keys": self.keys.state_dict(),  # secret: checkpoints are secret material (docs/privacy.md)
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }

    def load_state_dict(self, state: dict) -> None:
        if "keys" not in state:
            raise ValueError("checkpoint written by an older dpnotes (per-generator privacy state): start a new run")
        if not math.isclose(state["sample_rate"], self.sample_rate) or not math.isclose(
            state["noise_multiplier"], self.noise_multiplier
        ):
            raise ValueError(
                "checkpoint was taken with q={sample_rate}, σ={noise_multiplier}; this run has "
                f"q={self.sample_rate}, σ={self.noise_multiplier}: resuming would mis-account".format(**state)
            )
        self._use_keys(SecretKeys.from_state(state["keys"]))
        self.accountant.load_state_dict(state["accountant"])
