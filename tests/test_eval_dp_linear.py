"""DP linear coders (hashed n-grams, frozen-encoder probe): privacy bookkeeping, public labels,
patient units, learning without noise, the sweep and CLI dispatch."""
import math
import typing

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from dpnotes.corpus import Note, generate_default_corpus, split_by_patient
from dpnotes.corpus.code_lists import public_label_space
from dpnotes.evaluation.cli import DPClassifierConfig, main
from dpnotes.evaluation.coders import EvalInputError, evaluate_coder
from dpnotes.evaluation.dp_sweep import DP_CODERS, dp_epsilon_sweep
from dpnotes.evaluation.dp_linear import DPLinearCoder, FrozenEncoderFeatures, HashedNgramFeatures
from dpnotes.models import resolve_model
from dpnotes.testing.tiny_models import tiny_bert
from dpnotes.privacy.engine import NOT_PRIVATE

LABELS = public_label_space(None, "default")
# Full batches (q = 1): the accountant's ε is then closed-form, where sampled steps cost it ~0.3 s each.
FAST = {"steps": 10, "expected_batch_size": 10_000}


@pytest.fixture(scope="module")
def splits():
    return split_by_patient(generate_default_corpus(n_patients=200, seed=5), seed=0)


@pytest.fixture(scope="module")
def tiny_encoder_features():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    return FrozenEncoderFeatures(lambda: (tiny_bert(vocab=tokenizer.vocab_size, seed=1), tokenizer), max_length=32)


def head_weights(coder):
    return [p.detach().clone() for p in coder.model_.parameters()]


@pytest.mark.parametrize("kind", ["hashed", "probe"])
def test_fit_predict_on_the_public_labels_with_a_privacy_report(splits, tiny_encoder_features, kind):
    features = HashedNgramFeatures(2**12) if kind == "hashed" else tiny_encoder_features
    coder = DPLinearCoder(1.0, LABELS, features, **FAST).fit(splits["train"])
    assert coder.labels == LABELS
    assert coder.predict_proba(splits["test"]).shape == (len(splits["test"]), len(LABELS))
    report = coder.privacy_
    assert 0 < report["epsilon_spent"] <= 1.0 * (1 + 1e-6) and report["noise_multiplier"] > 0
    assert report["private"] is True and "note" not in report
    patients = len({n.patient_id for n in splits["train"]})
    assert report["privacy_unit"] == "patient" and report["privacy_units"] == patients < len(splits["train"])
    assert report["delta"] == pytest.approx(1 / (10 * patients)) and report["labels"] == len(LABELS)


def test_sequence_unit_counts_notes(splits):
    coder = DPLinearCoder(1.0, LABELS, HashedNgramFeatures(2**12), privacy_unit="sequence", **FAST)
    assert coder.fit(splits["train"]).privacy_["privacy_units"] == len(splits["train"])


def test_fixed_privacy_seed_reproduces_and_is_labelled_not_private(splits):
    def fit(**privacy):
        coder = DPLinearCoder(1.0, LABELS, HashedNgramFeatures(2**12), **FAST, **privacy).fit(splits["train"])
        return coder, head_weights(coder)

    (audit, a), (_, b) = fit(privacy_seed=7), fit(privacy_seed=7)
    assert audit.privacy_["private"] is False and audit.privacy_["note"] == NOT_PRIVATE
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    (_, c), (_, d) = fit(), fit()  # secret keys: the noise differs
    assert any(not torch.equal(x, y) for x, y in zip(c, d))


def test_a_code_outside_the_public_list_is_ignored(splits):
    train = list(splits["train"])
    first = train[0]
    train[0] = Note(first.id, first.patient_id, first.text, [*first.codes, "Z99.RARE"], first.metadata)
    coder = DPLinearCoder(math.inf, LABELS, HashedNgramFeatures(2**12), steps=1).fit(train)
    assert "Z99.RARE" not in coder.labels and coder.model_.out_features == len(LABELS)
    only_private = [Note("x", "p", "text", ["Z99.RARE"])]
    with pytest.raises(EvalInputError, match="public label list"):
        DPLinearCoder(1.0, LABELS, HashedNgramFeatures(2**12), steps=1).fit(only_private)


def test_without_noise_the_hashed_coder_learns_the_default_corpus(splits):
    coder = DPLinearCoder(math.inf, LABELS, HashedNgramFeatures(), steps=100)
    result = evaluate_coder(coder, splits["train"], splits["dev"], splits["test"], n_bootstrap=0)
    assert result["metrics"]["micro_f1"] > 0.7  # 0.85; a constant coder gets 0.17, TF-IDF 0.90


@pytest.mark.slow
def test_without_noise_the_minilm_probe_learns_the_default_corpus(splits):
    coder = DPLinearCoder(math.inf, LABELS, FrozenEncoderFeatures("minilm", max_length=64), steps=100)
    result = evaluate_coder(coder, splits["train"], splits["dev"], splits["test"], n_bootstrap=0)
    assert result["metrics"]["micro_f1"] > 0.5  # 0.71; a constant coder gets 0.17


def test_encoder_features_are_unit_rows_cached_on_disk(tmp_path):
    cache = tmp_path / "features.npz"
    texts = ["chest pain on exertion", "no acute findings", "chest pain on exertion"]
    first = FrozenEncoderFeatures("minilm", max_length=16, feature_cache=cache).transform(texts)
    assert first.shape == (3, 384) and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-4)
    assert np.array_equal(first[0], first[2])
    again = FrozenEncoderFeatures("minilm", max_length=16, feature_cache=cache)
    assert np.array_equal(again.transform(texts), first) and again._encoder is None  # read, not re-encoded
    with pytest.raises(EvalInputError, match="feature cache"):
        FrozenEncoderFeatures("minilm", max_length=32, feature_cache=cache)


def test_sweep_dispatches_to_the_linear_coders(splits):
    out = dp_epsilon_sweep(splits["train"], splits["dev"], splits["test"], LABELS, epsilons=[1.0, math.inf],
                           n_bootstrap=0, coder="hashed", n_features=2**12, **FAST)
    assert list(out["weighted_f1"]) == ["1", "inf"] and all(0 <= v <= 1 for v in out["weighted_f1"].values())
    assert out["by_epsilon"]["1"]["privacy"]["noise_multiplier"] > 0
    assert out["by_epsilon"]["inf"]["privacy"]["noise_multiplier"] == 0
    with pytest.raises(EvalInputError, match="unknown DP coder"):
        dp_epsilon_sweep(splits["train"], splits["dev"], splits["test"], LABELS, epsilons=[1.0], coder="svm")


def test_cli_coder_option(capsys):
    assert typing.get_args(typing.get_type_hints(DPClassifierConfig)["coder"]) == tuple(DP_CODERS)
    base = ["dp-classifier", "corpus=default", "reader_options.n_patients=80", "epsilons=[1]", "bootstrap=0"]
    main([*base, "coder=hashed", "steps=5", "expected_batch_size=16"])
    assert "DP hashed coder" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        main([*base, "coder=hashed", "model=minilm"])
    assert exit.value.code == 2 and "coder hashed has none" in capsys.readouterr().err


def test_the_head_starts_as_the_zero_shot_coder_of_the_code_titles(splits):
    titles = {"I10": "Essential (primary) hypertension", "E11.9": "Type 2 diabetes mellitus without complications"}
    features = HashedNgramFeatures(2**12)
    coder = DPLinearCoder(math.inf, LABELS, features, titles=titles, steps=1, learning_rate=0.0).fit(splits["train"])
    weight = coder.model_.weight.detach()
    for code, title in titles.items():
        row = LABELS.index(code)
        expected = DPLinearCoder.TITLE_SCALE * torch.from_numpy(features.transform([title]).toarray()[0])
        assert torch.allclose(weight[row], expected)
    untitled = [row for row, code in enumerate(LABELS) if code not in titles]
    assert torch.count_nonzero(weight[untitled]) == 0
    note = Note("t", "p", "History of essential primary hypertension.", [])
    assert LABELS[int(np.argmax(coder.predict_proba([note])[0]))] == "I10"


def test_the_learning_rate_scales_with_units_times_epsilon(splits):
    units = len({n.patient_id for n in splits["train"]})

    def rate(epsilon, **training):
        coder = DPLinearCoder(epsilon, LABELS, HashedNgramFeatures(2**12), **{**FAST, **training})
        return coder.fit(splits["train"]).privacy_["learning_rate"]

    full, scale = DPLinearCoder.LEARNING_RATE, DPLinearCoder.FULL_RATE_UNIT_EPSILON
    assert rate(1.0) == pytest.approx(full * units / scale)  # 160 units × ε 1: far below the full rate
    assert rate(scale / units * 2) == full and rate(math.inf) == full
    assert rate(1.0, learning_rate=3.0) == 3.0  # a rate that is given is kept
