"""Variants of the DP probe (MiniLM features) on inner partitions of a small corpus's train split
(not a test; CPU, ~20 s per partition and variant): the small-corpus ε = 10 gap, docs/utility.md §4a.

Two kinds of variant, neither shipped:

* `transform:MODE` keeps the shipped DP-SGD head and changes the features with a public map before
  the L2 normalisation: `base` (none), `mean_title` (project out the mean direction of the code titles'
  encodings), `center_title` (subtract that mean), `icd_mean` (subtract the mean of 3,000 ICD-10-CM
  titles), `icd_top:D` (subtract it and project out the top D principal directions of those titles:
  "all but the top", Mu & Viswanath 2018).
* `ssp:lam=…,alpha=…` replaces DP-SGD by ridge regression from one Gaussian release of X'X and X'Y
  (sufficient-statistics perturbation), shrunk towards the title start (alpha · φ(title)).

  python bench/probe_variants.py --corpus cmc2007 --inner 10 transform:base transform:mean_title transform:icd_top:3
  python bench/probe_variants.py --corpus cmc2007 --inner 5 ssp:lam=10 ssp:lam=30,alpha=3

The features come from --feature-cache (MiniLM encodes CMC-2007 in ~1 min, MTSamples in ~3).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from dp_coders import DATA, ROOT, load, splits
from dpnotes.evaluation import dp_linear
from dpnotes.evaluation.dp_linear import FrozenEncoderFeatures
from dpnotes.evaluation.dp_sweep import dp_epsilon_sweep
from dpnotes.evaluation.metrics import binarize, evaluate_scores, tune_threshold
from dpnotes.privacy.accounting import calibrate_noise_multiplier

EPSILONS = (1.0, 10.0, float("inf"))


class TransformedFeatures(FrozenEncoderFeatures):
    """MiniLM features minus `center`, with the rows of `basis` projected out, L2-normalised again."""

    center: np.ndarray | None = None
    basis: np.ndarray | None = None

    def transform(self, texts):
        x = super().transform(texts)
        if self.center is not None:
            x = x - self.center
        if self.basis is not None:
            x = x - (x @ self.basis.T) @ self.basis
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def raw(self, texts) -> np.ndarray:
        return super().transform(texts)


def icd10_titles(count: int) -> list[str]:
    """`count` leaf ICD-10-CM titles, a fixed public draw."""
    import simple_icd_10_cm as icd

    leaves = [code for code in icd.get_all_codes(False) if icd.is_leaf(code)]
    pick = np.random.default_rng(0).choice(len(leaves), size=count, replace=False)
    return [icd.get_description(leaves[i]) for i in pick]


def set_transform(features: TransformedFeatures, mode: str, titles: dict[str, str]) -> None:
    features.center = features.basis = None
    if mode == "base":
        return
    if mode in ("mean_title", "center_title"):
        mean = features.raw(list(titles.values())).mean(0)
        if mode == "center_title":
            features.center = mean
        else:
            features.basis = (mean / np.linalg.norm(mean))[None]
        return
    public = features.raw(icd10_titles(3000))
    features.center = public.mean(0)
    if mode.startswith("icd_top:"):
        features.basis = np.linalg.svd(public - features.center, full_matrices=False)[2][: int(mode.split(":")[1])]
    elif mode != "icd_mean":
        raise SystemExit(f"unknown transform {mode!r}")


def run_transform(mode, parts, labels, titles, features) -> dict[float, list[float]]:
    set_transform(features, mode, titles)
    dp_linear.FEATURES["probe"] = (lambda **_: features, ("model", "max_length", "feature_cache"))
    scores: dict[float, list[float]] = {}
    for train, threshold_set, scored in parts:
        sweep = dp_epsilon_sweep(train, threshold_set, scored, labels, EPSILONS, n_bootstrap=0, coder="probe",
                                 titles=titles)
        for eps, result in sweep["by_epsilon"].items():
            scores.setdefault(float(eps), []).append(result["metrics"]["weighted_f1"])
    return scores


def _with_intercept(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1), np.float32)]) / np.sqrt(2)  # unit norm


def fit_ssp(train, labels, features, title_rows, epsilon, lam, alpha, rng) -> np.ndarray:
    """(d + 1, L) ridge weights from one Gaussian release of per-patient-clipped [X'X, X'Y]."""
    x = _with_intercept(features.raw([n.text for n in train]))
    y = binarize([n.codes for n in train], labels).astype(np.float64)
    y /= np.maximum(1.0, np.linalg.norm(y, axis=1, keepdims=True))
    units: dict[str, list[int]] = {}
    for i, note in enumerate(train):
        units.setdefault(note.patient_id, []).append(i)
    gram, cross, bound = np.zeros((x.shape[1],) * 2), np.zeros((x.shape[1], len(labels))), np.sqrt(2)
    for rows in units.values():
        a, b = x[rows].T @ x[rows], x[rows].T @ y[rows]
        scale = min(1.0, bound / np.sqrt((a**2).sum() + (b**2).sum()))
        gram += scale * a
        cross += scale * b
    if epsilon != float("inf"):
        std = bound * calibrate_noise_multiplier(epsilon, 1 / (10 * len(units)), 1.0, 1)
        noise = rng.normal(0, std, gram.shape)
        gram = gram + (noise + noise.T) / 2
        cross = cross + rng.normal(0, std, cross.shape)
    eigenvalues, vectors = np.linalg.eigh(gram)
    gram = (vectors * np.maximum(eigenvalues, 0)) @ vectors.T
    prior = np.zeros_like(cross)
    prior[:-1] = alpha * np.sqrt(2) * title_rows.T
    return np.linalg.solve(gram + lam * np.eye(len(gram)), cross + lam * prior)


def run_ssp(spec, parts, labels, titles, features) -> dict[float, list[float]]:
    settings = dict(item.split("=") for item in spec.split(",")) if spec else {}
    lam, alpha = float(settings.get("lam", 10)), float(settings.get("alpha", 1))
    title_rows = np.zeros((len(labels), 384), np.float32)
    titled = [i for i, code in enumerate(labels) if code in titles]
    title_rows[titled] = features.raw([titles[labels[i]] for i in titled])
    rng = np.random.default_rng()  # a prototype's noise: not the engine's secret generator
    scores: dict[float, list[float]] = {}
    for train, threshold_set, scored in parts:
        for eps in EPSILONS:
            weights = fit_ssp(train, labels, features, title_rows, eps, lam, alpha, rng)
            score = lambda notes: _with_intercept(features.raw([n.text for n in notes])) @ weights  # noqa: E731
            threshold = tune_threshold(binarize([n.codes for n in threshold_set], labels), score(threshold_set))
            result = evaluate_scores(binarize([n.codes for n in scored], labels), score(scored), threshold,
                                     labels=labels, n_bootstrap=0)
            scores.setdefault(eps, []).append(result["metrics"]["weighted_f1"])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", help="transform:MODE or ssp:key=value,…")
    parser.add_argument("--corpus", choices=("cmc2007", "mtsamples"), default="cmc2007")
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--feature-cache", type=Path, default=ROOT / "runs" / "probe_features_{corpus}.npz")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.patients, args.no_titles, args.dev_only = 0, False, False
    notes, labels, titles = load(args)
    parts = splits(notes, args)
    features = TransformedFeatures(feature_cache=str(args.feature_cache).format(corpus=args.corpus))
    print(f"{args.corpus}: {len(parts)} inner partitions; weighted F1 mean ± s.e. at ε = 1 / 10 / ∞, gap at 10")
    for variant in args.variants:
        kind, _, spec = variant.partition(":")
        scores = {"transform": run_transform, "ssp": run_ssp}[kind](spec, parts, labels, titles, features)
        cells = "  ".join(f"{np.mean(v):.3f} ± {np.std(v) / np.sqrt(len(v)):.3f}" for v in scores.values())
        gap = np.array(scores[float("inf")]) - np.array(scores[10.0])
        print(f"{variant:<28} {cells}   gap {gap.mean():.3f} ± {gap.std() / np.sqrt(len(gap)):.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
