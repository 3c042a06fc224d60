"""DP-LoRA classifier on a tiny random BERT: privacy bookkeeping, LoRA wiring, the ε sweep."""
import math

import pytest
from transformers import AutoTokenizer

from dpnotes.corpus import generate_default_corpus, split_by_patient
from dpnotes.eval.coders import label_space
from dpnotes.eval.dp_classifier import DPLoRACoder, dp_epsilon_sweep, format_epsilon, parse_epsilon
from dpnotes.models import resolve_model
from dpnotes.testing.tiny_models import tiny_bert



@pytest.fixture(scope="module")
def setup():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    splits = split_by_patient(generate_default_corpus(n_patients=40, seed=5), seed=0)
    factory = lambda n: (tiny_bert(num_labels=n, vocab=tokenizer.vocab_size, seed=2), tokenizer)  # noqa: E731
    return splits, factory


def test_sweep_reports_weighted_f1_and_privacy_per_epsilon(setup):
    splits, factory = setup
    out = dp_epsilon_sweep(splits["train"], splits["dev"], splits["test"], epsilons=[1.0, math.inf], n_bootstrap=0,
                           model=factory, steps=2, expected_batch_size=8, micro_batch_size=16, max_length=32, lora_r=4)
    assert list(out["weighted_f1"]) == ["1", "inf"]
    assert all(0 <= v <= 1 for v in out["weighted_f1"].values())
    private, reference = out["by_epsilon"]["1"]["privacy"], out["by_epsilon"]["inf"]["privacy"]
    assert 0 < private["epsilon_spent"] <= 1.0 * (1 + 1e-6) and private["noise_multiplier"] > 0
    assert reference["noise_multiplier"] == 0 and math.isinf(reference["epsilon_spent"])
    patients = len({n.patient_id for n in splits["train"]})
    assert private["privacy_units"] == patients and private["delta"] == pytest.approx(1 / (10 * patients))
    assert private["steps_taken"] == 2


def test_only_lora_and_classifier_are_trained(setup):
    splits, factory = setup
    coder = DPLoRACoder(math.inf, model=factory, steps=2, expected_batch_size=8, max_length=32, lora_r=2,
                        privacy_unit="sequence")
    num_labels = len(label_space(splits["train"], splits["dev"]))
    before = {n: p.detach().clone() for n, p in coder._build(num_labels)[0].named_parameters()}
    head_biases = [v for n, v in before.items() if "classifier" in n and n.endswith("bias")]
    assert head_biases and all((b == -3.0).all() for b in head_biases)  # data-independent rare-code prior
    coder.fit(splits["train"], splits["dev"])
    trainable = {n for n, p in coder.model_.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("lora_" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    changed = {n for n, p in coder.model_.named_parameters() if n in before and not (p == before[n]).all()}
    assert changed and changed <= trainable
    assert coder.predict_proba(splits["test"]).shape == (len(splits["test"]), len(coder.labels))
    assert coder.privacy_["privacy_units"] == len(splits["train"])


def test_epsilon_parsing():
    assert parse_epsilon("inf") == math.inf and parse_epsilon("0.1") == 0.1
    assert format_epsilon(math.inf) == "inf" and format_epsilon(10.0) == "10"
    with pytest.raises(ValueError):
        parse_epsilon("0")
