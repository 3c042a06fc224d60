"""Activation checkpointing with exact per-example norms: the non-reentrant kind keeps the forward's
graph, so the recorded outputs and layer inputs are the forward's own and recomputation in backward
records nothing twice; the reentrant kind is refused by name."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from dpnotes.privacy.clipping import PerExampleClipper
from dpnotes.privacy.losses import causal_lm_losses
from dpnotes.privacy.rules import UnsupportedParameterError
from dpnotes.testing.dp_oracle import assert_clipper_matches_oracle
from dpnotes.testing.tiny_models import prompt_masked_batch, tiny_llama
from dpnotes.training.model_setup import enable_activation_checkpointing
from dpnotes.training.recipe import train
from tests.test_recipe import run


def checkpointed(lora: bool):
    model = tiny_llama()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, init_lora_weights=False))
    enable_activation_checkpointing(model)
    return model.train()


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_norms_and_clipped_sums_equal_the_oracle_with_checkpointing(mode, lora):
    model = checkpointed(lora)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert_clipper_matches_oracle(model, causal_lm_losses, prompt_masked_batch(4), mode)


def test_reentrant_checkpointing_is_refused_by_name():
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    clipper = PerExampleClipper(model.train(), 1.0)
    with pytest.raises(UnsupportedParameterError, match=r"model \(LlamaModel\) uses reentrant or unknown activation checkpointing \(checkpoint\)"):
        with clipper.recording(4):
            causal_lm_losses(model, prompt_masked_batch(4))


@pytest.mark.parametrize("name", ["checkpoint", "non_reentrant_checkpoint"])
def test_deepspeeds_activation_checkpointing_is_refused_by_name(name):
    """DeepSpeed's `checkpoint` is the reentrant kind (an autograd Function that reruns the forward
    inside backward); its `non_reentrant_checkpoint` raises on torch.autograd.grad ("Checkpointing is
    not compatible with .grad()"), which the norm pass uses."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.activation_checkpointing import checkpointing

    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = getattr(checkpointing, name)
    clipper = PerExampleClipper(model.train(), 1.0)
    with pytest.raises(UnsupportedParameterError, match=rf"uses reentrant or unknown activation checkpointing \({name}\)"):
        with clipper.recording(4):
            pass


def test_a_run_with_checkpointing_trains_the_same_adapter(tmp_path, tiny_model_dir):
    _, plain = run(tmp_path, tiny_model_dir, "plain")
    _, saved = run(tmp_path, tiny_model_dir, "checkpointed", "activation_checkpointing=true")
    expected = load_file(plain / "adapter" / "adapter_model.safetensors")
    got = load_file(saved / "adapter" / "adapter_model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7)
