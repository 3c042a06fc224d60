"""Whole tiny models beyond the decoder family sweep (tests/test_dp_families.py): a BERT classifier
(all parameters, LoRA + head), single-token and tiny batches, tied weights, bf16."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from dpnotes.testing.dp_oracle import assert_clipper_matches_oracle, per_example_gradients
from dpnotes.testing.tiny_models import prompt_masked_batch, random_batch, tiny_bert, tiny_llama
from dpnotes.privacy.clipping import PerExampleClipper
from dpnotes.privacy.losses import causal_lm_losses, multilabel_classification_losses
from dpnotes.privacy.rules import UnsupportedParameterError

def with_lora(model, targets, **extra):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False, **extra)
    return get_peft_model(model, config)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_bert_classifier_all_parameters_and_lora(mode):
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.float32)
    data = random_batch(vocab=128, batch=4, seq_len=10, seed=5)
    batch = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"], "labels": labels}
    assert_clipper_matches_oracle(tiny_bert(num_labels=3), multilabel_classification_losses, batch, mode)
    lora = with_lora(tiny_bert(num_labels=3), ["query", "value"], modules_to_save=["classifier"])
    assert_clipper_matches_oracle(lora, multilabel_classification_losses, batch, mode)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_pooled_lora_classifier_of_the_dp_lora_coder(mode):
    """DPLoRACoder's model: LoRA in the encoder, mean pooling over padded tokens, L2 normalisation, a head
    on (B, d) features, the loss summed over labels."""
    from dpnotes.evaluation.dp_classifier import PooledClassifier, multilabel_summed_losses

    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.float32)
    data = random_batch(vocab=128, batch=4, seq_len=10, seed=5)
    batch = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"], "labels": labels}
    model = PooledClassifier(with_lora(tiny_bert(), ["query", "value"]), torch.nn.Linear(32, 3))
    assert_clipper_matches_oracle(model, multilabel_summed_losses, batch, mode)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_single_token_and_tiny_batches(batch_size):
    model = tiny_llama()
    batch = random_batch(vocab=128, batch=batch_size, seq_len=2, seed=1, pad_fraction=0.0)
    assert_clipper_matches_oracle(model, causal_lm_losses, batch, "bk")


def test_tied_full_finetuning_is_refused_but_lora_on_tied_model_works():
    with pytest.raises(UnsupportedParameterError, match="tied"):
        PerExampleClipper(tiny_llama(tie=True), 1.0)
    assert_clipper_matches_oracle(with_lora(tiny_llama(tie=True), ["q_proj", "v_proj"]), causal_lm_losses, prompt_masked_batch(3), "bk")


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_bf16_model_norms_are_accumulated_in_fp32(mode):
    reference_model = with_lora(tiny_llama(), ["q_proj", "v_proj"])
    batch = prompt_masked_batch(4)
    ref_norms = per_example_gradients(reference_model, causal_lm_losses, batch).norm(dim=1)
    model = reference_model.to(torch.bfloat16)
    clipper = PerExampleClipper(model, max_grad_norm=1e3, mode=mode)
    with clipper.recording(4):
        losses = causal_lm_losses(model, batch)
    result = clipper.backward(losses)
    assert result.norms.dtype == torch.float32
    torch.testing.assert_close(result.norms, ref_norms, rtol=5e-2, atol=1e-3)
    assert all(total.dtype == torch.float32 for total in clipper.summed())
    assert all(p.grad is None for p in clipper.parameters)


def bf16_base_with_fp32_lora():
    """What dtype=bfloat16 (or auto on bf16 hardware) trains: the base loaded in bf16, then wrapped
    by peft, which keeps the LoRA adapters fp32."""
    model = with_lora(tiny_llama().to(torch.bfloat16), ["q_proj", "v_proj"])
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    return model


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_bf16_base_with_fp32_lora_norms_equal_the_oracle(mode):
    """The oracle runs the same mixed model one example at a time: the norms must be its norms."""
    model, batch = bf16_base_with_fp32_lora(), prompt_masked_batch(6)
    ref_norms = per_example_gradients(model, causal_lm_losses, batch).norm(dim=1)
    clipper = PerExampleClipper(model, max_grad_norm=float(ref_norms.median()), mode=mode)
    with clipper.recording(6):
        losses = causal_lm_losses(model, batch)
    result = clipper.backward(losses)
    assert result.norms.dtype == torch.float32
    torch.testing.assert_close(result.norms, ref_norms, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["bk", pytest.param("ghost", marks=pytest.mark.xfail(strict=True, reason=(
    "ghost forms the sum by a second backward of Σ c_i L_i through the bf16 base, which rounds c_i·backprop "
    "rather than the backprop that was normed: the sum is ~0.5% off explicit clipping (bk is exact)")))])
def test_bf16_base_with_fp32_lora_clipped_sums_equal_explicit_clipping(mode):
    assert_clipper_matches_oracle(bf16_base_with_fp32_lora(), causal_lm_losses, prompt_masked_batch(6), mode)
