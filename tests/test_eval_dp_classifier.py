"""DP-LoRA classifier on a tiny random BERT: privacy bookkeeping, LoRA wiring, the ε sweep."""
import math

import pytest
import torch
from transformers import AutoTokenizer

from dpnotes.corpus import Note, generate_default_corpus, split_by_patient
from dpnotes.corpus.code_lists import public_label_space
from dpnotes.evaluation.dp_classifier import DPLoRACoder
from dpnotes.evaluation.dp_sweep import dp_epsilon_sweep, format_epsilon, parse_epsilon
from dpnotes.models import resolve_model
from dpnotes.testing.tiny_models import tiny_bert
from dpnotes.privacy.engine import NOT_PRIVATE

LABELS = public_label_space(None, "default")


@pytest.fixture(scope="module")
def setup():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    splits = split_by_patient(generate_default_corpus(n_patients=40, seed=5), seed=0)
    factory = lambda: (tiny_bert(vocab=tokenizer.vocab_size, seed=2), tokenizer)  # noqa: E731
    return splits, factory


def test_sweep_reports_weighted_f1_and_privacy_per_epsilon(setup):
    splits, factory = setup
    out = dp_epsilon_sweep(splits["train"], splits["dev"], splits["test"], LABELS, epsilons=[1.0, math.inf], n_bootstrap=0,
                           model=factory, steps=2, expected_batch_size=8, micro_batch_size=16, max_length=32, lora_rank=4)
    assert list(out["weighted_f1"]) == ["1", "inf"]
    assert all(0 <= v <= 1 for v in out["weighted_f1"].values())
    private, reference = out["by_epsilon"]["1"]["privacy"], out["by_epsilon"]["inf"]["privacy"]
    assert 0 < private["epsilon_spent"] <= 1.0 * (1 + 1e-6) and private["noise_multiplier"] > 0
    assert reference["noise_multiplier"] == 0 and math.isinf(reference["epsilon_spent"])
    patients = len({n.patient_id for n in splits["train"]})
    assert private["privacy_units"] == patients and private["delta"] == pytest.approx(1 / (10 * patients))
    assert private["steps_taken"] == 2


def test_only_lora_and_the_head_are_trained_from_the_title_start(setup):
    """Adapters at zero and the head as the titles' zero-shot coder: before any step the coder scores
    a note by the similarity of its pooled features to each code's title, as the probe starts."""
    splits, factory = setup
    titles = {LABELS[0]: "type 2 diabetes mellitus", LABELS[1]: "essential hypertension"}
    coder = DPLoRACoder(math.inf, LABELS, model=factory, steps=2, expected_batch_size=8, max_length=32, lora_rank=2,
                        privacy_unit="sequence", titles=titles)
    coder.labels = LABELS
    start = coder._build(len(LABELS))
    title_features = start.features(**coder._tokens(list(titles.values())))
    assert torch.allclose(start.head.weight[:2], coder.TITLE_SCALE * title_features, atol=1e-6)
    assert (start.head.weight[2:] == 0).all() and (start.head.bias == -3.0).all()  # untitled; rare-code prior
    before = {n: p.detach().clone() for n, p in start.named_parameters()}
    coder.fit(splits["train"], splits["dev"])
    trainable = {n for n, p in coder.model_.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and {"head.weight", "head.bias"} <= trainable
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    changed = {n for n, p in coder.model_.named_parameters() if not (p == before[n]).all()}
    assert changed and changed <= trainable
    assert coder.predict_proba(splits["test"]).shape == (len(splits["test"]), len(coder.labels))
    assert coder.privacy_["privacy_units"] == len(splits["train"])


def test_model_seed_is_not_the_privacy_seed(setup):
    """Same model seed (default 0), finite ε: secret keys differ, so the noise and the weights do."""
    splits, factory = setup

    def fit(**privacy):
        coder = DPLoRACoder(1.0, LABELS, model=factory, steps=2, expected_batch_size=8, max_length=32, lora_rank=2,
                            **privacy)
        coder.fit(splits["train"], splits["dev"])
        return coder, [p.detach().clone() for p in coder.model_.parameters() if p.requires_grad]

    (first, a), (_, b) = fit(), fit()
    assert first.privacy_["private"] and "note" not in first.privacy_
    assert any(not torch.equal(x, y) for x, y in zip(a, b))
    (audit, c), (_, d) = fit(privacy_seed=11), fit(privacy_seed=11)
    assert audit.privacy_["private"] is False and audit.privacy_["note"] == NOT_PRIVATE
    assert all(torch.equal(x, y) for x, y in zip(c, d))  # the audit option reproduces the noise


def test_label_space_is_the_public_list_not_the_training_codes(setup):
    """A code only the training notes carry must not widen the head or appear in the labels."""
    splits, factory = setup
    train = list(splits["train"])
    rare = train[0]
    train[0] = Note(rare.id, rare.patient_id, rare.text, [*rare.codes, "Z99.RARE"], rare.metadata)
    coder = DPLoRACoder(math.inf, LABELS, model=factory, steps=1, expected_batch_size=8, max_length=32, lora_rank=2)
    coder.fit(train, splits["dev"])
    assert coder.labels == LABELS and "Z99.RARE" not in coder.labels
    assert coder.predict_proba(splits["test"][:2]).shape == (2, len(LABELS))
    assert coder.privacy_["labels"] == len(LABELS)


def test_epsilon_parsing():
    assert parse_epsilon("inf") == math.inf and parse_epsilon("0.1") == 0.1
    assert format_epsilon(math.inf) == "inf" and format_epsilon(10.0) == "10"
    with pytest.raises(ValueError):
        parse_epsilon("0")
