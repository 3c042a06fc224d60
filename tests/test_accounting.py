import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from dpnotes.privacy.accounting import (
    PrivacyAccountant,
    PrvAccountant,
    accountant_from_state,
    available_accountants,
    calibrate_noise_multiplier,
    check_privacy_params,
    compute_epsilon,
    make_accountant,
    max_steps_for_budget,
    register_accountant,
)

DELTA = 1e-5
REFERENCE = dict(sample_rate=256 / 50_000, noise_multiplier=1.0, steps=3000)


def reference_epsilon(accountant: str) -> float:
    tracker = make_accountant(accountant)
    tracker.step(REFERENCE["noise_multiplier"], REFERENCE["sample_rate"], REFERENCE["steps"])
    return tracker.epsilon(DELTA)


def dp_accounting_epsilon(google_accountant, history: list[tuple[float, float, int]]) -> float:
    """ε from Google's dp_accounting: an implementation independent of opacus."""
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count
        )
        for sigma, q, count in history
    ]
    google_accountant.compose(dp_accounting.ComposedDpEvent(events))
    return google_accountant.get_epsilon(DELTA)


@pytest.mark.parametrize("accountant, expected", [("rdp", 1.7325), ("prv", 1.5318), ("pld", 1.5217)])
def test_reference_point(accountant, expected):
    assert reference_epsilon(accountant) == pytest.approx(expected, abs=1e-3)


def test_registry():
    assert available_accountants() == ["pld", "prv", "rdp"]
    with pytest.raises(ValueError, match="unknown accountant 'nope'; available: pld, prv, rdp"):
        make_accountant("nope")
    with pytest.raises(ValueError, match="already registered"):

        @register_accountant("rdp")
        class Duplicate(PrivacyAccountant):
            def _epsilon(self, delta: float) -> float:
                return 0.0


# σ >= 1 keeps ε below ~30: at larger ε dp_accounting returns inf at fractional orders
# where opacus still has a finite bound, so the two legitimately part ways.
GRID = [(q, sigma, steps) for q in (0.001, 0.01, 0.1) for sigma in (1.0, 1.5, 2.0) for steps in (10, 1000)]


@pytest.mark.parametrize("q, sigma, steps", GRID)
def test_rdp_matches_dp_accounting_rdp(q, sigma, steps):
    ours = compute_epsilon(sigma, q, steps, DELTA, "rdp")
    theirs = dp_accounting_epsilon(rdp.RdpAccountant(), [(sigma, q, steps)])
    assert ours == pytest.approx(theirs, rel=0.01)


# PLD costs up to ~1 s per point at small σ, so this grid is smaller. opacus' PRV reports
# the upper end of its error bar, ε_estimate + eps_error (0.01 absolute): hence the abs
# tolerance (plus PLD's own 1e-3 discretisation slack), which only matters below ε ≈ 1
# (see the last point).
@pytest.mark.parametrize(
    "q, sigma, steps",
    [(0.01, 0.8, 300), (0.1, 2.0, 50), (0.004, 1.0, 3000), (0.05, 1.5, 500), (0.01, 3.0, 2000)],
)
def test_prv_matches_dp_accounting_pld(q, sigma, steps):
    ours = compute_epsilon(sigma, q, steps, DELTA, "prv")
    theirs = dp_accounting_epsilon(pld.PLDAccountant(), [(sigma, q, steps)])
    assert ours == pytest.approx(theirs, rel=0.01, abs=PrvAccountant.eps_error + 1e-3)
    assert ours >= theirs - 1e-3, "PRV's upper bound should not undercut the tight PLD value"


def test_changing_noise_history_matches_dp_accounting():
    history = [(1.2, 0.01, 200), (0.9, 0.02, 100), (1.2, 0.01, 50)]
    for name in ("rdp", "pld"):
        tracker = make_accountant(name)
        for sigma, q, count in history:
            tracker.step(sigma, q, count)
        assert tracker.history == history
        google = rdp.RdpAccountant() if name == "rdp" else pld.PLDAccountant()
        assert tracker.epsilon(DELTA) == pytest.approx(dp_accounting_epsilon(google, history), rel=0.01)


def test_history_is_run_length_encoded():
    tracker = make_accountant("rdp")
    for _ in range(5):
        tracker.step(1.0, 0.01)
    tracker.step(1.0, 0.01, num_steps=10)
    tracker.step(1.1, 0.01)
    assert tracker.history == [(1.0, 0.01, 15), (1.1, 0.01, 1)]
    assert tracker.steps_taken == 16


def test_epsilon_edge_cases():
    tracker = make_accountant("rdp")
    assert tracker.epsilon(DELTA) == 0.0
    tracker.step(0.0, 0.01)
    assert tracker.epsilon(DELTA) == math.inf
    with pytest.raises(ValueError, match="delta"):
        tracker.epsilon(0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise_multiplier=-1.0, sample_rate=0.1), "noise_multiplier"),
        (dict(noise_multiplier=1.0, sample_rate=0.0), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=1.5), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, num_steps=0), "num_steps"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, num_steps=2.0), "num_steps"),
    ],
)
def test_step_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_accountant("rdp").step(**kwargs)


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_resume_equals_uninterrupted_run(name):
    uninterrupted = make_accountant(name)
    uninterrupted.step(1.1, 0.01, 120)
    uninterrupted.step(0.9, 0.01, 80)

    first_half = make_accountant(name)
    first_half.step(1.1, 0.01, 120)
    first_half.step(0.9, 0.01, 30)
    saved = json.loads(json.dumps(first_half.state_dict()))  # must survive a JSON checkpoint

    resumed = make_accountant(name)
    resumed.load_state_dict(saved)
    resumed.step(0.9, 0.01, 50)
    assert resumed.history == uninterrupted.history
    assert resumed.steps_taken == 200
    assert resumed.epsilon(DELTA) == uninterrupted.epsilon(DELTA)
    assert accountant_from_state(resumed.state_dict()).epsilon(DELTA) == uninterrupted.epsilon(DELTA)


def test_load_state_from_another_accountant_is_refused():
    tracker = make_accountant("rdp")
    tracker.step(1.0, 0.01)
    with pytest.raises(ValueError, match="written by the 'rdp' accountant"):
        make_accountant("pld").load_state_dict(tracker.state_dict())


CALIBRATION_SETTINGS = dict(delta=DELTA, sample_rate=0.02, steps=100)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_calibration_round_trips(accountant, target):
    sigma = calibrate_noise_multiplier(target, accountant=accountant, **CALIBRATION_SETTINGS)
    achieved = compute_epsilon(
        sigma, CALIBRATION_SETTINGS["sample_rate"], CALIBRATION_SETTINGS["steps"], DELTA, accountant
    )
    assert 0.99 * target <= achieved <= target


def test_calibration_of_non_private_and_unreachable_targets():
    assert calibrate_noise_multiplier(math.inf, DELTA, 0.01, 100) == 0.0
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(0.0, DELTA, 0.01, 100)
    with pytest.raises(ValueError, match="no noise_multiplier"):
        calibrate_noise_multiplier(1e-6, DELTA, 1.0, 10**6)


def test_max_steps_for_budget():
    steps = max_steps_for_budget(2.0, DELTA, sample_rate=0.01, noise_multiplier=1.0)
    assert compute_epsilon(1.0, 0.01, steps, DELTA) <= 2.0 < compute_epsilon(1.0, 0.01, steps + 1, DELTA)
    assert max_steps_for_budget(1e-3, DELTA, sample_rate=0.5, noise_multiplier=0.5) == 0
    assert max_steps_for_budget(50.0, DELTA, sample_rate=1e-4, noise_multiplier=5.0, max_steps=1000) == 1000


def test_check_privacy_params_accepts_sane_values():
    check_privacy_params(epsilon=8.0, delta=1e-5, dataset_size=50_000)
    check_privacy_params(epsilon=math.inf, delta=0.5, dataset_size=10)  # non-private: δ unused


@pytest.mark.parametrize(
    "epsilon, delta, dataset_size, message",
    [
        (0.0, 1e-5, 1000, "epsilon must be > 0"),
        (-1.0, 1e-5, 1000, "epsilon must be > 0"),
        (float("nan"), 1e-5, 1000, "epsilon must be > 0"),
        (1.0, 0.0, 1000, r"delta must be in \(0, 1\)"),
        (1.0, 1.0, 1000, r"delta must be in \(0, 1\)"),
        (1.0, 1e-3, 1000, r"delta=0.001 is not < 1/N = 0.001 \(N = 1000 privacy units\).*1/\(10N\) = 0.0001"),
        (1.0, 1e-2, 1000, "not < 1/N"),
        (1.0, 1e-5, 0, "dataset_size"),
    ],
)
def test_check_privacy_params_rejects(epsilon, delta, dataset_size, message):
    with pytest.raises(ValueError, match=message):
        check_privacy_params(epsilon, delta, dataset_size)


@pytest.mark.parametrize(
    "q,steps,sigma,delta,low,high",
    [
        (0.01, 1000, 0.586, 1e-5, 1.10, 1.20),  # long run, PLD ε ≈ 8
        (0.025, 12, 0.387, 1 / 3200, 1.30, 1.40),  # the demo's 12 steps, PLD ε ≈ 8
        (0.025, 12, 0.802, 1 / 3200, 1.65, 1.75),  # the same at PLD ε ≈ 1
    ],
)
def test_documented_rdp_over_pld_gap(q, steps, sigma, delta, low, high):
    """The RDP/PLD ratios stated in accounting.py's docstring."""
    ratio = compute_epsilon(sigma, q, steps, delta, accountant="rdp") / compute_epsilon(sigma, q, steps, delta, accountant="pld")
    assert low <= ratio <= high
