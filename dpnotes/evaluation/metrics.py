"""Multi-label coding metrics as the clinical-coding literature reports them.

Conventions (all arrays are (notes, labels); `y` is 0/1, `scores` are probabilities or any
monotone scores):

* one global decision threshold, tuned on dev to maximise micro-F1 (`tune_threshold`), then
  applied unchanged to test;
* micro-F1 pools every (note, label) decision; macro-F1 is the unweighted mean of per-label F1
  over the labels with at least one gold positive in the evaluated set (labels absent from the
  gold standard carry no information about recall and are left out, as in CAML/PLM-ICD
  evaluations); weighted-F1 weights per-label F1 by gold support (scikit-learn's "weighted");
* P@k = mean over notes of |top-k predicted ∩ gold| / k (notes without gold codes count as 0);
* micro-AUC ranks all (note, label) pairs together; macro-AUC averages per-label AUC over the
  labels that have both a positive and a negative note (others are skipped and counted);
* bootstrap CIs resample test notes with replacement (percentile method, seeded), keeping the
  threshold fixed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_KS = (1, 3, 5)


def _check(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    scores = np.asarray(scores, dtype=float)
    if y.ndim != 2 or scores.shape != y.shape:
        raise ValueError(f"y and scores must be 2-D arrays of the same shape, got {y.shape} and {scores.shape}")
    if y.shape[0] == 0:
        raise ValueError("no notes to evaluate")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must be 0/1")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    return y.astype(int), scores


def binarize(code_lists: Sequence[Sequence[str]], labels: Sequence[str]) -> np.ndarray:
    """Multi-hot (notes, labels) matrix; codes outside `labels` are ignored."""
    index = {label: j for j, label in enumerate(labels)}
    y = np.zeros((len(code_lists), len(labels)), dtype=int)
    for i, codes in enumerate(code_lists):
        for code in codes:
            j = index.get(code)
            if j is not None:
                y[i, j] = 1
    return y


def tune_threshold(y_dev: np.ndarray, scores_dev: np.ndarray) -> float:
    """The one global threshold t (predict score >= t) that maximises micro-F1 on dev.

    Exact search over every distinct score: sort all (note, label) scores descending; cutting
    after the k-th distinct value gives TP(k), FP(k) and micro-F1 = 2TP / (TP + FP + P). The
    returned threshold is the midpoint between the best cut value and the next lower distinct
    score (so it generalises rather than sitting on a dev score); ties keep the higher threshold.
    """
    y, scores = _check(y_dev, scores_dev)
    flat_y, flat_s = y.ravel(), scores.ravel()
    positives = int(flat_y.sum())
    if positives == 0:
        raise ValueError("dev set has no positive labels: cannot tune a threshold")
    order = np.argsort(-flat_s, kind="stable")
    s_sorted, y_sorted = flat_s[order], flat_y[order]
    tp = np.cumsum(y_sorted)
    predicted = np.arange(1, len(s_sorted) + 1)
    # Only cut at the last position of a run of equal scores (a threshold cannot split ties).
    last_of_run = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    f1 = np.where(last_of_run, 2 * tp / (predicted + positives), -1.0)
    best = int(np.argmax(f1))
    cut = s_sorted[best]
    lower = s_sorted[best + 1] if best + 1 < len(s_sorted) else None
    return float(cut if lower is None else (cut + lower) / 2)


def f1_scores(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """micro/macro/weighted F1 plus micro precision/recall of 0/1 predictions (numpy; equals
    scikit-learn's with zero_division=0 and labels = the labels with gold support)."""
    y, predicted = _check(y, predicted)
    gold, pred = y.astype(bool), predicted.astype(bool)
    tp = (gold & pred).sum(0).astype(float)
    fp = (~gold & pred).sum(0).astype(float)
    fn = (gold & ~pred).sum(0).astype(float)
    support = tp + fn
    TP, FP, FN = tp.sum(), fp.sum(), fn.sum()
    out = {
        "micro_f1": _ratio(2 * TP, 2 * TP + FP + FN),
        "micro_precision": _ratio(TP, TP + FP),
        "micro_recall": _ratio(TP, TP + FN),
        "macro_f1": float("nan"),
        "weighted_f1": float("nan"),
    }
    present = support > 0
    if present.any():
        denominator = 2 * tp + fp + fn
        per_label = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        out["macro_f1"] = float(per_label[present].mean())
        out["weighted_f1"] = float((per_label * support).sum() / support.sum())
    return out


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def precision_at_k(y: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Mean over notes of (gold codes among the k highest-scored labels) / k."""
    y, scores = _check(y, scores)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k_eff = min(k, y.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k_eff]
    hits = np.take_along_axis(y, top, axis=1).sum(axis=1)
    return float(np.mean(hits / k))


def _auc_columns(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-column ROC AUC by the Mann-Whitney rank formula (ties get average ranks)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=0)
    positives = y.sum(0).astype(float)
    negatives = y.shape[0] - positives
    rank_sum = (ranks * y).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def auc_scores(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """micro-AUC and macro-AUC (labels lacking a positive or a negative note are skipped)."""
    y, scores = _check(y, scores)
    flat = y.reshape(-1, 1)
    micro = float(_auc_columns(flat, scores.reshape(-1, 1))[0]) if 0 < flat.sum() < flat.size else float("nan")
    positives = y.sum(0)
    usable = (positives > 0) & (positives < y.shape[0])
    macro = float(_auc_columns(y[:, usable], scores[:, usable]).mean()) if usable.any() else float("nan")
    return {"micro_auc": micro, "macro_auc": macro, "auc_labels_used": int(usable.sum()),
            "auc_labels_skipped": int((~usable).sum())}


def point_metrics(y: np.ndarray, scores: np.ndarray, threshold: float, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Every headline metric at a fixed threshold."""
    y, scores = _check(y, scores)
    out = f1_scores(y, (scores >= threshold).astype(int))
    for k in ks:
        out[f"p@{k}"] = precision_at_k(y, scores, k)
    out.update(auc_scores(y, scores))
    return out


def per_label_table(y: np.ndarray, scores: np.ndarray, threshold: float, labels: Sequence[str]) -> list[dict]:
    """One row per label: support, predicted count, precision, recall, F1 and AUC (None if undefined)."""
    y, scores = _check(y, scores)
    if len(labels) != y.shape[1]:
        raise ValueError(f"{len(labels)} label names for {y.shape[1]} columns")
    predicted = scores >= threshold
    rows = []
    for j, label in enumerate(labels):
        gold, pred = y[:, j].astype(bool), predicted[:, j]
        tp = int((gold & pred).sum())
        precision = tp / pred.sum() if pred.sum() else 0.0
        recall = tp / gold.sum() if gold.sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        auc = float(_auc_columns(y[:, [j]], scores[:, [j]])[0]) if 0 < gold.sum() < len(gold) else None
        rows.append({"label": label, "support": int(gold.sum()), "predicted": int(pred.sum()),
                     "precision": float(precision), "recall": float(recall), "f1": float(f1), "auc": auc})
    return rows


def bootstrap_ci(
    y: np.ndarray,
    scores: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI of every value `metric_fn(y, scores)` returns, resampling notes.

    Resamples on which a metric is undefined (NaN, e.g. AUC with one class) are dropped for
    that metric; a metric undefined on all resamples gets (nan, nan).
    """
    y, scores = _check(y, scores)
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    rng = np.random.default_rng(seed)
    n = y.shape[0]
    samples: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        rows = rng.integers(0, n, size=n)
        for name, value in metric_fn(y[rows], scores[rows]).items():
            samples.setdefault(name, []).append(float(value))
    tail = (1 - confidence) / 2 * 100
    out = {}
    for name, values in samples.items():
        values = np.asarray(values)
        values = values[np.isfinite(values)]
        out[name] = (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))) if len(values) else (float("nan"), float("nan"))
    return out


def evaluate_scores(
    y_test: np.ndarray,
    scores_test: np.ndarray,
    threshold: float,
    labels: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Point metrics, bootstrap CIs (`n_bootstrap=0` skips them) and the per-label table."""
    y, scores = _check(y_test, scores_test)

    def headline(yy: np.ndarray, ss: np.ndarray) -> dict[str, float]:
        out = f1_scores(yy, (ss >= threshold).astype(int))
        for k in ks:
            out[f"p@{k}"] = precision_at_k(yy, ss, k)
        aucs = auc_scores(yy, ss)
        out["micro_auc"], out["macro_auc"] = aucs["micro_auc"], aucs["macro_auc"]
        return out

    result: dict = {"threshold": float(threshold), "n_notes": int(y.shape[0]), "n_labels": int(y.shape[1])}
    result["metrics"] = point_metrics(y, scores, threshold, ks)
    if n_bootstrap:
        result["ci"] = {name: list(bounds) for name, bounds in bootstrap_ci(y, scores, headline, n_bootstrap, confidence, seed).items()}
        result["ci_confidence"] = confidence
        result["n_bootstrap"] = n_bootstrap
    if labels is not None:
        result["per_label"] = per_label_table(y, scores, threshold, labels)
    return result
