"""Where the control codes of synthetic notes come from.

The mix of code sets in the training notes is itself private. It is released at the privacy unit
of the training run (`privacy_unit`, the adjacency of both guarantees), so that the two (ε, δ) can
be added (basic composition); guarantees of different units are never added.

- `patient` unit (add/remove one patient with all their notes): each patient contributes ONE
  code set, its first note's. Adding or removing a patient adds or removes that one contribution;
  no other patient's contribution changes (their first note is their own).
- `sequence` unit (add/remove one note = one training sequence): EVERY note contributes its own
  code set. Adding or removing a note adds or removes exactly its own contribution. (The patient
  release is NOT valid here: removing a patient's first note turns that patient's contribution
  from set A into their next note's set B, two counts change, L2 sensitivity √2.)

Two DP releases, both with one contribution per unit:

- `dp-histogram`: a DP release of the code-set histogram. One unit changes one count by 1 (L2
  sensitivity 1). Counts get Gaussian noise N(0, σ²) with σ calibrated to (ε, δ/2), and only sets
  whose noisy count clears τ = max(min_count, 1 + σ·Φ⁻¹(1 − δ/2)) are released: a set held by a
  single unit escapes with probability ≤ δ/2, which pays for releasing the (data-dependent) set
  of keys.
- `dp-marginals`: for corpora too small for whole code sets to clear the threshold (the usual
  case): DP counts of single codes and of set sizes 1..K. A unit contributes the first K codes of
  its set and one size, so the L2 sensitivity is √(K+1); codes are released above a threshold with
  a union bound over the K codes one unit can make appear. Sets are then sampled as a size, then
  that many distinct codes ∝ their counts (co-occurrence is not kept).
- `prior`: a public or user-given distribution (JSON {"I10; E11.9": weight, ...}); costs nothing
  and has no privacy unit.

Raw training labels are never sampled from directly.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from dpnotes.errors import UserError
from dpnotes.corpus import Note, examples_by_patient
from dpnotes.privacy.accounting import calibrate_noise_multiplier, compute_epsilon

CODE_SEPARATOR = "; "
PRIVACY_UNITS = ("patient", "sequence")
UNIT_NAMES = {"patient": "patients", "sequence": "notes (sequence units)"}


def code_set_key(codes: list[str]) -> str:
    return CODE_SEPARATOR.join(sorted(set(codes)))


def check_privacy_unit(privacy_unit: str | None) -> str:
    if privacy_unit not in PRIVACY_UNITS:
        raise UserError(f"privacy_unit must be one of {', '.join(PRIVACY_UNITS)}, got {privacy_unit!r}")
    return privacy_unit


@dataclass
class CodeSetDistribution:
    """Released code sets with sampling weights, what releasing them cost, and at which privacy unit
    (None only for a free prior)."""

    weights: dict[str, float]
    epsilon: float
    delta: float
    source: str
    noise_std: float = 0.0
    threshold: float = 0.0
    set_sizes: dict[str, float] | None = None  # marginals mode: weights are per code, sizes sampled apart
    privacy_unit: str | None = None

    def __post_init__(self) -> None:
        if self.privacy_unit is not None:
            check_privacy_unit(self.privacy_unit)
        elif not self.free:
            raise UserError(f"the {self.source} release (ε = {self.epsilon}, δ = {self.delta}) must record its "
                             f"privacy_unit ({' or '.join(PRIVACY_UNITS)})")

    @property
    def free(self) -> bool:
        """A prior: no privacy cost, so it composes with a guarantee at any unit."""
        return self.epsilon == 0 and self.delta == 0

    def sample(self, count: int, seed: int) -> list[list[str]]:
        if not self.weights:
            raise UserError(
                "no code (set) survived the DP threshold: raise the conditioning ε, use dp-marginals, or a prior"
            )
        rng = np.random.default_rng(seed)
        keys = sorted(self.weights)
        p = np.array([self.weights[k] for k in keys], dtype=np.float64)
        p /= p.sum()
        if self.set_sizes is None:
            return [keys[i].split(CODE_SEPARATOR) for i in rng.choice(len(keys), size=count, p=p)]
        sizes = sorted(self.set_sizes, key=int)
        size_p = np.array([self.set_sizes[k] for k in sizes], dtype=np.float64)
        drawn = rng.choice([int(k) for k in sizes], size=count, p=size_p / size_p.sum())
        return [sorted(keys[i] for i in rng.choice(len(keys), size=min(int(k), len(keys)), replace=False, p=p))
                for k in drawn]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> CodeSetDistribution:
        data = json.loads(Path(path).read_text())
        if "privacy_unit" not in data and (data.get("epsilon") or data.get("delta")):
            raise UserError(
                f"{path}: this DP conditioning release does not record its privacy unit, so its (ε, δ) cannot "
                "be composed with the training guarantee. It was written before units were recorded, when every "
                "release was per patient (first note of each): if it came from that version, add "
                '"privacy_unit": "patient" to it; otherwise delete it to release again (spending the '
                "conditioning budget again)"
            )
        return cls(**data)


def unit_contributions(notes: list[Note], privacy_unit: str) -> list[list[str]]:
    """The code list each privacy unit contributes: one per patient (their first note's codes, in
    corpus order) for `patient`, one per note for `sequence`. Adding or removing one unit adds or
    removes exactly one entry and leaves every other entry unchanged."""
    if check_privacy_unit(privacy_unit) == "sequence":
        return [list(note.codes) for note in notes]
    return [list(notes[examples[0]].codes) for examples in examples_by_patient([note.patient_id for note in notes])]


def dp_code_set_histogram(
    notes: list[Note], epsilon: float, delta: float, min_count: float = 0.0, seed: int | None = None,
    *, privacy_unit: str,
) -> CodeSetDistribution:
    """(ε, δ)-DP code-set histogram at `privacy_unit`.

    Each unit contributes one code set (`unit_contributions`): for `patient`, a patient's first
    note's set, so adding/removing a patient (all their notes) adds/removes one set; for
    `sequence`, every note's own set, so adding/removing a note adds/removes its set. Either way
    one count moves by 1: L2 sensitivity 1, Gaussian noise calibrated to (ε, δ/2). A key held by a
    single unit has true count 1 and clears τ ≥ 1 + σ·Φ⁻¹(1 − δ/2) with probability ≤ δ/2, the
    other δ/2 of the budget; δ is checked against the number of units of that kind.
    """
    _check_budget(notes, epsilon, delta, privacy_unit)
    counts: dict[str, int] = {}
    for codes in unit_contributions(notes, privacy_unit):
        key = code_set_key(codes)
        counts[key] = counts.get(key, 0) + 1

    gaussian_delta = delta / 2
    sigma = calibrate_noise_multiplier(epsilon, gaussian_delta, sample_rate=1.0, steps=1, accountant="pld")
    threshold = max(min_count, 1 + sigma * NormalDist().inv_cdf(1 - delta / 2))
    rng = np.random.default_rng(seed)
    released = {}
    for key in sorted(counts):
        noisy = counts[key] + rng.normal(0.0, sigma)
        if noisy >= threshold:
            released[key] = float(noisy)
    spent = compute_epsilon(sigma, 1.0, 1, gaussian_delta, accountant="pld")
    return CodeSetDistribution(released, spent, delta, "dp-histogram", noise_std=sigma, threshold=threshold,
                               privacy_unit=privacy_unit)


def dp_code_marginals(
    notes: list[Note], epsilon: float, delta: float, max_codes: int = 4, min_count: float = 0.0, seed: int | None = None,
    *, privacy_unit: str,
) -> CodeSetDistribution:
    """(ε, δ)-DP counts of single codes and of set sizes 1..K (K = max_codes) at `privacy_unit`.

    Each unit contributes the first K (sorted, distinct) codes of its code set and one size
    (`unit_contributions`: a patient's first note for `patient`, every note for `sequence`), so
    adding/removing one unit moves at most K code counts and one size count by 1 each: L2
    sensitivity √(K+1), noise std √(K+1)·σ(ε, δ/2). A unit can make at most K codes appear; each
    one held by that unit alone clears τ = 1 + noise_std·Φ⁻¹(1 − δ/(2K)) with probability ≤ δ/(2K),
    ≤ δ/2 together (union bound). δ is checked against the number of units of that kind.
    """
    _check_budget(notes, epsilon, delta, privacy_unit)
    code_counts: dict[str, int] = {}
    size_counts = {str(k): 0 for k in range(1, max_codes + 1)}
    for contribution in unit_contributions(notes, privacy_unit):
        codes = sorted(set(contribution))[:max_codes]
        for code in codes:
            code_counts[code] = code_counts.get(code, 0) + 1
        if codes:  # a unit without codes contributes nothing (sizes run from 1)
            size_counts[str(len(codes))] += 1
    unit_sigma = calibrate_noise_multiplier(epsilon, delta / 2, sample_rate=1.0, steps=1, accountant="pld")
    noise_std = unit_sigma * math.sqrt(max_codes + 1)
    threshold = max(min_count, 1 + noise_std * NormalDist().inv_cdf(1 - delta / (2 * max_codes)))
    rng = np.random.default_rng(seed)
    codes = {code: float(n + rng.normal(0.0, noise_std)) for code, n in sorted(code_counts.items())}
    sizes = {k: max(0.0, float(n + rng.normal(0.0, noise_std))) for k, n in size_counts.items()}
    if sum(sizes.values()) == 0:
        sizes = {"1": 1.0}
    spent = compute_epsilon(unit_sigma, 1.0, 1, delta / 2, accountant="pld")
    released = {code: count for code, count in codes.items() if count >= threshold}
    return CodeSetDistribution(released, spent, delta, "dp-marginals", noise_std, threshold, sizes, privacy_unit)


def count_units(notes: list[Note], privacy_unit: str) -> int:
    """N: the number of privacy units (patients or notes) in the released notes."""
    return len(unit_contributions(notes, privacy_unit))


def _check_budget(notes: list[Note], epsilon: float, delta: float, privacy_unit: str) -> int:
    units = count_units(notes, privacy_unit)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise UserError(f"conditioning epsilon must be finite and > 0, got {epsilon}")
    if not 0 < delta < 1 / max(units, 1):
        raise UserError(f"conditioning delta must be in (0, 1/N) with N = {units} {UNIT_NAMES[privacy_unit]}, got {delta}")
    return units


def prior_distribution(path: Path) -> CodeSetDistribution:
    """A public or user-given {code set: weight} prior; no privacy cost."""
    weights = json.loads(Path(path).read_text())
    if not isinstance(weights, dict) or not weights:
        raise UserError(f"{path}: expected a non-empty JSON object {{'I10; E11.9': weight, ...}}")
    cleaned = {}
    for key, weight in weights.items():
        if not isinstance(weight, (int, float)) or weight < 0:
            raise UserError(f"{path}: weight of {key!r} must be a non-negative number")
        cleaned[code_set_key([code.strip() for code in key.split(";") if code.strip()])] = float(weight)
    return CodeSetDistribution(cleaned, 0.0, 0.0, f"prior:{path}")
