"""Multi-label metrics against hand-computed values and scikit-learn."""
import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from dpnotes.evaluation.metrics import (
    auc_scores,
    binarize,
    bootstrap_ci,
    evaluate_scores,
    f1_scores,
    per_label_table,
    point_metrics,
    precision_at_k,
    tune_threshold,
)

Y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
S = np.array([[0.9, 0.2, 0.6], [0.3, 0.8, 0.1], [0.7, 0.4, 0.35], [0.2, 0.5, 0.45]])


def random_case(seed, n=40, labels=6):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < 0.3).astype(int)
    scores = np.clip(0.35 * y + rng.random((n, labels)) * 0.7, 0, 1)
    return y, scores


def test_binarize_ignores_unknown_codes():
    assert binarize([["a", "z"], [], ["b", "a"]], ["a", "b"]).tolist() == [[1, 0], [0, 0], [1, 1]]


def test_threshold_is_the_micro_f1_maximiser_by_brute_force():
    for seed in range(2):
        y, s = random_case(seed, n=15, labels=4)
        t = tune_threshold(y, s)
        best = f1_scores(y, (s >= t).astype(int))["micro_f1"]
        cuts = np.unique(s)
        brute = max(f1_score(y.ravel(), (s.ravel() >= c).astype(int), zero_division=0) for c in cuts)
        assert best == pytest.approx(brute)


def test_threshold_hand_example():
    # scores sorted: 0.9(1) 0.8(1) 0.7(1) 0.6(1) 0.5(0) 0.45(1) 0.4(1) ...; P=6 positives.
    # cut at 0.6: TP=4, predicted=4 → F1=8/10=0.8; at 0.45: TP=5, pred=6 → 10/12=0.833;
    # at 0.4: TP=6, pred=7 → 12/13=0.923 (best); at 0.35: TP=6, pred=8 → 12/14.
    t = tune_threshold(Y, S)
    assert t == pytest.approx((0.4 + 0.35) / 2)
    assert f1_scores(Y, (S >= t).astype(int))["micro_f1"] == pytest.approx(12 / 13)


def test_threshold_needs_positives():
    with pytest.raises(ValueError, match="no positive"):
        tune_threshold(np.zeros((2, 2), int), np.ones((2, 2)) * 0.5)


def test_f1_against_sklearn_macro_over_present_labels():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]])
    pred = np.array([[1, 0, 1], [0, 1, 0], [0, 1, 0]])
    out = f1_scores(y, pred)
    assert out["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"))
    # label 0: P=1 R=1/2 F=2/3; label 1: F=1; label 2 has no gold positive → left out of macro.
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted", zero_division=0))
    assert out["micro_precision"] == pytest.approx(3 / 4) and out["micro_recall"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_and_auc_match_sklearn_on_random_data(seed):
    y, s = random_case(seed)
    s = np.round(s, 1)  # ties
    pred = (s >= 0.5).astype(int)
    present = np.flatnonzero(y.sum(0))
    out = f1_scores(y, pred)
    for average in ("micro", "macro", "weighted"):
        assert out[f"{average}_f1"] == pytest.approx(f1_score(y, pred, average=average, labels=present, zero_division=0))
    rows = per_label_table(y, s, 0.5, list("abcdef"))
    for j, row in enumerate(rows):
        assert row["auc"] == pytest.approx(roc_auc_score(y[:, j], s[:, j]))
        assert row["f1"] == pytest.approx(f1_score(y[:, j], pred[:, j], zero_division=0))


def test_precision_at_k_hand():
    # top-1: [0,1,0,1] → hits 1,1,1,0; top-2: [0,2],[1,0],[0,1],[1,2] → 2,1,2,1
    assert precision_at_k(Y, S, 1) == pytest.approx(3 / 4)
    assert precision_at_k(Y, S, 2) == pytest.approx((2 + 1 + 2 + 1) / 8)
    assert precision_at_k(Y, S, 5) == pytest.approx(Y.sum() / (4 * 5))  # k > labels: divide by k


def test_auc_against_sklearn_and_skipping():
    y, s = random_case(1)
    y[:, 2] = 0  # no positive: skipped
    out = auc_scores(y, s)
    expected = np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(6) if j != 2])
    assert out["macro_auc"] == pytest.approx(expected)
    assert out["micro_auc"] == pytest.approx(roc_auc_score(y.ravel(), s.ravel()))
    assert out["auc_labels_skipped"] == 1


def test_per_label_table_hand():
    rows = per_label_table(Y, S, 0.5, ["a", "b", "c"])
    assert rows[0] == {"label": "a", "support": 2, "predicted": 2, "precision": 1.0, "recall": 1.0, "f1": 1.0, "auc": 1.0}
    # label c: gold rows 0,3; predicted (>=0.5) row 0 → P=1, R=1/2
    assert rows[2]["precision"] == 1.0 and rows[2]["recall"] == 0.5 and rows[2]["f1"] == pytest.approx(2 / 3)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    y, s = random_case(2, n=60)
    fn = lambda yy, ss: point_metrics(yy, ss, 0.5, ks=(1,))  # noqa: E731
    a = bootstrap_ci(y, s, fn, n_resamples=200, seed=3)
    assert a == bootstrap_ci(y, s, fn, n_resamples=200, seed=3)
    assert a != bootstrap_ci(y, s, fn, n_resamples=200, seed=4)
    point = fn(y, s)["micro_f1"]
    assert a["micro_f1"][0] < point < a["micro_f1"][1]
    # Percentile method by hand on a trivial statistic.
    rng = np.random.default_rng(3)
    manual = [y[rng.integers(0, 60, 60)].mean() for _ in range(200)]
    got = bootstrap_ci(y, s, lambda yy, ss: {"m": yy.mean()}, n_resamples=200, seed=3)["m"]
    assert got == pytest.approx((np.percentile(manual, 2.5), np.percentile(manual, 97.5)))


def test_evaluate_scores_shape_and_errors():
    y, s = random_case(4)
    out = evaluate_scores(y, s, 0.5, labels=list("abcdef"), n_bootstrap=20)
    assert set(out["ci"]) >= {"micro_f1", "macro_f1", "weighted_f1", "p@1", "micro_auc"}
    assert len(out["per_label"]) == 6 and out["n_notes"] == 40
    with pytest.raises(ValueError, match="same shape"):
        evaluate_scores(y, s[:, :2], 0.5)
    with pytest.raises(ValueError, match="no notes"):
        f1_scores(np.zeros((0, 2)), np.zeros((0, 2)))
