"""Family sweep: every decoder family transformers builds from a tiny config, untied, with all
parameters trainable and with LoRA on every linear layer, in both clipping modes, on a padded
batch whose prompt labels are masked. Each combination is exact against the batch-size-1 oracle
(rtol 1e-4) or refused when the clipper is built, naming the module. There is no third outcome."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from dpnotes.testing.dp_oracle import clipped_sum_reference, flat_clipped_sum, per_example_gradients
from dpnotes.testing.tiny_models import DECODER_FAMILIES, random_batch, tiny_causal_lm
from dpnotes.train.dp.clipping import PerExampleClipper
from dpnotes.train.dp.losses import causal_lm_losses
from dpnotes.train.dp.rules import UnsupportedParameterError

# What is refused, and the module class the refusal must name. Nothing else may be refused.
REFUSED = {
    # Fused expert weights (E, 2I, H) are indexed by the router inside one forward: no rule yet.
    ("mixtral", "all"): "MixtralExperts",
    # peft wraps the router and expert parameters (not modules): it reads lora_A/lora_B directly.
    ("mixtral", "lora"): "ParamWrapper reads it",
}


def lm_batch(batch_size=4, seq_len=12, seed=3):
    data = random_batch(vocab=128, batch=batch_size, seq_len=seq_len, seed=seed)
    data["labels"][:, : seq_len // 3] = -100  # prompt tokens carry no loss
    return data


def build(family, trainable):
    model = tiny_causal_lm(family)
    if trainable == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
        model = get_peft_model(model, config)
    return model


@pytest.mark.parametrize("mode", ["ghost", "bk"])
@pytest.mark.parametrize("trainable", ["all", "lora"])
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_family_is_exact_or_refused(family, trainable, mode):
    model = build(family, trainable)
    refused = REFUSED.get((family, trainable))
    if refused:
        with pytest.raises(UnsupportedParameterError, match=refused):
            PerExampleClipper(model, 1.0, mode=mode)
        return
    batch = lm_batch()
    per_example = per_example_gradients(model, causal_lm_losses, batch)
    max_grad_norm = float(per_example.norm(dim=1).median())
    ref_norms, ref_sum = clipped_sum_reference(per_example, max_grad_norm)
    clipper = PerExampleClipper(model, max_grad_norm, mode=mode)
    model.zero_grad(set_to_none=True)
    with clipper.recording(len(batch["input_ids"])):
        losses = causal_lm_losses(model, batch)
    result = clipper.backward(losses)
    torch.testing.assert_close(result.norms, ref_norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(flat_clipped_sum(clipper), ref_sum, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_mixture_of_experts_lora_on_attention_is_exact(mode):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(tiny_causal_lm("mixtral"), config)
    batch = lm_batch()
    per_example = per_example_gradients(model, causal_lm_losses, batch)
    ref_norms, _ = clipped_sum_reference(per_example, 1.0)
    clipper = PerExampleClipper(model, 1.0, mode=mode)
    with clipper.recording(len(batch["input_ids"])):
        losses = causal_lm_losses(model, batch)
    torch.testing.assert_close(clipper.backward(losses).norms, ref_norms, rtol=1e-4, atol=1e-6)
