"""Coders: label-space handling, the common interface, evaluation on real test notes."""
import numpy as np
import pytest
from transformers import AutoTokenizer

from dpnotes.corpus import Note, generate_default_corpus, split_by_patient
from dpnotes.evaluation.coders import (
    EncoderCoder,
    EvalInputError,
    TfidfCoder,
    align_scores,
    compare_train_sets,
    evaluate_coder,
)
from dpnotes.models import resolve_model
from dpnotes.testing.tiny_models import tiny_bert



@pytest.fixture(scope="module")
def splits():
    return split_by_patient(generate_default_corpus(n_patients=80, seed=3), seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("minilm"))


def note(i, codes, text="word"):
    return Note(f"n{i}", f"p{i}", text, codes)


def test_tfidf_coder_learns_the_default_corpus(splits):
    result = evaluate_coder(TfidfCoder(), splits["train"], splits["dev"], splits["test"], n_bootstrap=50)
    assert result["metrics"]["micro_f1"] > 0.6
    lo, hi = result["ci"]["micro_f1"]
    assert lo <= result["metrics"]["micro_f1"] <= hi
    assert result["labels"] == sorted(result["labels"][: len(result["labels"]) - len(result["test_codes_unseen_by_coder"])]) + result["test_codes_unseen_by_coder"]


def test_dev_only_codes_get_constant_zero_and_unseen_test_codes_are_misses():
    train = [note(i, ["A"] if i % 2 else ["B"], "alpha" if i % 2 else "beta") for i in range(10)]
    dev = [note(10, ["A", "C"], "alpha"), note(11, ["B"], "beta")]
    test = [note(12, ["A", "D"], "alpha"), note(13, ["B"], "beta")]
    coder = TfidfCoder().fit(train, dev)
    assert coder.labels == ["A", "B", "C"]
    assert np.all(coder.predict_proba(test)[:, 2] == 0.0)
    result = evaluate_coder(TfidfCoder(), train, dev, test, n_bootstrap=0)
    assert result["labels"] == ["A", "B", "C", "D"] and result["test_codes_unseen_by_coder"] == ["D"]
    assert result["metrics"]["micro_recall"] == pytest.approx(2 / 3)  # D is always missed


def test_align_scores():
    scores = np.array([[0.1, 0.2]])
    assert align_scores(scores, ["a", "b"], ["b", "z", "a"]).tolist() == [[0.2, 0.0, 0.1]]


def test_bad_inputs():
    train = [note(i, ["A"]) for i in range(3)]
    with pytest.raises(EvalInputError, match="train set is empty"):
        evaluate_coder(TfidfCoder(), [], train, train)
    with pytest.raises(EvalInputError, match="no label in common"):
        evaluate_coder(TfidfCoder(), train, [note(5, ["A"])], [note(6, ["Q"])], n_bootstrap=0)
    with pytest.raises(ValueError, match="unknown train set"):
        compare_train_sets(TfidfCoder, train, train, train, train, train_sets=["bogus"])


def test_compare_train_sets_share_one_label_space(splits):
    synthetic = generate_default_corpus(n_patients=30, seed=9)
    results = compare_train_sets(TfidfCoder, splits["train"], synthetic, splits["dev"], splits["test"], n_bootstrap=0)
    assert list(results) == ["real", "synthetic", "real+synthetic"]
    assert len({tuple(r["labels"]) for r in results.values()}) == 1
    assert results["real+synthetic"]["n_train"] == len(splits["train"]) + len(synthetic)


@pytest.mark.parametrize("head", ["mean", "label_attention"])
def test_encoder_coder_tiny_bert(splits, tokenizer, head):
    factory = lambda: (tiny_bert(vocab=tokenizer.vocab_size, seed=1), tokenizer)  # noqa: E731
    coder = EncoderCoder(factory, head=head, max_length=48, epochs=2, batch_size=16, lr=1e-3, head_lr=1e-2,
                         attention_dim=16)
    train = splits["train"][:48]
    coder.fit(train, splits["dev"])
    probs = coder.predict_proba(splits["test"])
    assert probs.shape == (len(splits["test"]), len(coder.labels))
    assert np.all((probs >= 0) & (probs <= 1))
    assert [h["epoch"] for h in coder.history_] == [1, 2] and all("dev_micro_f1" in h for h in coder.history_)
    assert coder.history_[1]["train_loss"] < coder.history_[0]["train_loss"]
    result = evaluate_coder(coder, train, splits["dev"], splits["test"], n_bootstrap=0, fit=False)
    assert 0 <= result["metrics"]["micro_f1"] <= 1
