"""Where the control codes of synthetic notes come from.

The mix of code sets in the training notes is itself private. Two sources are allowed:

- `dp-histogram`: a DP release of the code-set histogram. Each patient contributes one code set
  (its first note's), so one patient changes one count by 1 (L2 sensitivity 1). Counts get
  Gaussian noise N(0, σ²) with σ calibrated to (ε, δ/2), and only sets whose noisy count clears
  τ = max(min_count, 1 + σ·Φ⁻¹(1 − δ/2)) are released: a set held by a single patient escapes
  with probability ≤ δ/2, which pays for releasing the (data-dependent) set of keys. Its (ε, δ)
  adds to the training budget (basic composition), and the manifest reports both.
- `dp-marginals`: for corpora too small for whole code sets to clear the threshold (the usual
  case): DP counts of single codes and of set sizes 1..K. A patient contributes its first K
  codes and one size, so the L2 sensitivity is √(K+1); codes are released above a threshold with
  a union bound over the K codes one patient can make appear. Sets are then sampled as a size,
  then that many distinct codes ∝ their counts (co-occurrence is not kept).
- `prior`: a public or user-given distribution (JSON {"I10; E11.9": weight, ...}); costs nothing.

Raw training labels are never sampled from directly.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from dpnotes.corpus import Note
from dpnotes.train.dp.accounting import calibrate_noise_multiplier, compute_epsilon

CODE_SEPARATOR = "; "


def code_set_key(codes: list[str]) -> str:
    return CODE_SEPARATOR.join(sorted(set(codes)))


@dataclass
class CodeSetDistribution:
    """Released code sets with sampling weights, and what releasing them cost."""

    weights: dict[str, float]
    epsilon: float
    delta: float
    source: str
    noise_std: float = 0.0
    threshold: float = 0.0
    set_sizes: dict[str, float] | None = None  # marginals mode: weights are per code, sizes sampled apart

    def sample(self, count: int, seed: int) -> list[list[str]]:
        if not self.weights:
            raise ValueError(
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
        return cls(**json.loads(path.read_text()))


def dp_code_set_histogram(
    notes: list[Note], epsilon: float, delta: float, min_count: float = 0.0, seed: int | None = None
) -> CodeSetDistribution:
    _check_budget(notes, epsilon, delta)
    per_patient: dict[str, str] = {}
    for note in notes:
        per_patient.setdefault(note.patient_id, code_set_key(note.codes))
    counts: dict[str, int] = {}
    for key in per_patient.values():
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
    return CodeSetDistribution(released, spent, delta, "dp-histogram", noise_std=sigma, threshold=threshold)


def dp_code_marginals(
    notes: list[Note], epsilon: float, delta: float, max_codes: int = 4, min_count: float = 0.0, seed: int | None = None
) -> CodeSetDistribution:
    _check_budget(notes, epsilon, delta)
    first_codes: dict[str, list[str]] = {}
    for note in notes:
        first_codes.setdefault(note.patient_id, sorted(set(note.codes))[:max_codes])
    code_counts: dict[str, int] = {}
    size_counts = {str(k): 0 for k in range(1, max_codes + 1)}
    for codes in first_codes.values():
        for code in codes:
            code_counts[code] = code_counts.get(code, 0) + 1
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
    return CodeSetDistribution(released, spent, delta, "dp-marginals", noise_std, threshold, sizes)


def _check_budget(notes: list[Note], epsilon: float, delta: float) -> int:
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"conditioning epsilon must be finite and > 0, got {epsilon}")
    patients = len({n.patient_id for n in notes})
    if not 0 < delta < 1 / max(patients, 1):
        raise ValueError(f"conditioning delta must be in (0, 1/N) with N = {patients} patients, got {delta}")
    return patients


def prior_distribution(path: Path) -> CodeSetDistribution:
    """A public or user-given {code set: weight} prior; no privacy cost."""
    weights = json.loads(Path(path).read_text())
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"{path}: expected a non-empty JSON object {{'I10; E11.9': weight, ...}}")
    cleaned = {}
    for key, weight in weights.items():
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"{path}: weight of {key!r} must be a non-negative number")
        cleaned[code_set_key([code.strip() for code in key.split(";") if code.strip()])] = float(weight)
    return CodeSetDistribution(cleaned, 0.0, 0.0, f"prior:{path}")
