"""Family sweep: every decoder family transformers builds from a tiny config, untied, with all
parameters trainable and with LoRA on every linear layer, in both clipping modes, on a padded
batch whose prompt labels are masked. Each combination is exact against the batch-size-1 oracle
(rtol 1e-4) or refused when the clipper is built, naming the module. There is no third outcome."""
import pytest
from peft import LoraConfig, get_peft_model

from dpnotes.testing.dp_oracle import assert_clipper_matches_oracle
from dpnotes.testing.tiny_models import DECODER_FAMILIES, prompt_masked_batch, tiny_causal_lm
from dpnotes.privacy.clipping import PerExampleClipper
from dpnotes.privacy.losses import causal_lm_losses
from dpnotes.privacy.rules import UnsupportedParameterError

# What is refused, and the module class the refusal must name. Nothing else may be refused.
REFUSED = {
    # Fused expert weights (E, 2I, H) are indexed by the router inside one forward: no rule yet.
    ("mixtral", "all"): "MixtralExperts",
    # peft wraps the router and expert parameters (not modules): it reads lora_A/lora_B directly.
    ("mixtral", "lora"): "ParamWrapper reads it",
}


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
    assert_clipper_matches_oracle(model, causal_lm_losses, prompt_masked_batch(), mode)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_mixture_of_experts_lora_on_attention_is_exact(mode):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(tiny_causal_lm("mixtral"), config)
    assert_clipper_matches_oracle(model, causal_lm_losses, prompt_masked_batch(), mode)
