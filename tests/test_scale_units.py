"""Fast, single-process checks of the ZeRO integration pieces (the multi-process ones are in
tests/test_scale.py)."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from dpnotes.privacy.randomness import NormalDraws
from dpnotes.privacy.deepspeed import ZeroNoiseOptimizer, require_fp32_sums


def _param(n=20000):
    p = torch.nn.Parameter(torch.zeros(n))
    p.grad = torch.zeros(n)
    return p


def test_noise_optimizer_refuses_to_step_unarmed():
    p = _param()
    opt = ZeroNoiseOptimizer(torch.optim.SGD([p], lr=1.0))
    with pytest.raises(RuntimeError, match="not armed"):
        opt.step()


def test_noise_optimizer_adds_full_std_to_what_it_steps_then_delegates():
    p = _param()
    opt = ZeroNoiseOptimizer(torch.optim.SGD([p], lr=1.0))
    opt.arm(0.5, NormalDraws(123, 0, 1))
    opt.step()
    opt.disarm()
    assert opt.noised_elements == p.numel()
    assert abs(float(p.detach().std()) / 0.5 - 1) < 0.03  # SGD lr=1 applied the noisy gradient
    assert opt.state_dict()["param_groups"] == opt.base.state_dict()["param_groups"]
    # DeepSpeed swaps param_groups around its calls: the wrapper must follow the base's list
    opt.param_groups = [opt.base.param_groups[0]]
    assert opt.base.param_groups is opt.param_groups


def test_sigma_zero_armed_steps_without_noise():
    p = _param(10)
    p.grad.fill_(1.0)
    opt = ZeroNoiseOptimizer(torch.optim.SGD([p], lr=1.0))
    opt.arm(0.0, NormalDraws(1, 0, 0))
    opt.step()
    assert torch.equal(p.detach(), -torch.ones(10))


def test_deepspeed_is_made_to_accumulate_and_reduce_in_fp32():
    # DeepSpeed's defaults follow the model's dtype: bf16 sums before the noise unless told otherwise.
    config = {"bf16": {"enabled": True}}
    require_fp32_sums(config)
    assert config["data_types"]["grad_accum_dtype"] == "fp32" and config["communication_data_type"] == "fp32"
    with pytest.raises(ValueError, match="fp32"):
        require_fp32_sums({"bf16": {"enabled": True}, "communication_data_type": "bf16"})
    with pytest.raises(ValueError, match="fp32"):
        require_fp32_sums({"data_types": {"grad_accum_dtype": "bf16"}})


class _Rank:
    """The accelerator of one rank as save_weights sees it; the full state dict is not to be had."""

    def __init__(self, main: bool):
        self.is_main_process = main

    def get_state_dict(self, model):
        raise AssertionError("the full model's state dict was cloned to the CPU on this rank")


def test_saving_the_adapter_copies_only_the_adapter_and_only_on_the_main_process(tmp_path):
    # ZeRO-1/2 (parameters not partitioned): accelerate's get_state_dict would clone the whole model
    # to the CPU on every rank to write megabytes of adapter.
    from safetensors.torch import load_file

    from dpnotes.privacy.deepspeed import DeepSpeedBackend
    from dpnotes.testing.tiny_models import tiny_causal_lm
    from dpnotes.training.model_setup import TrainableConfig, prepare_trainable

    pytest.importorskip("deepspeed")
    model = prepare_trainable(tiny_causal_lm("llama"), TrainableConfig(lora_rank=4, lora_targets=["q_proj", "v_proj"]))
    backend = DeepSpeedBackend(None, model, None, rank=0, world_size=2, stage=2)
    assert backend.trainable_state(keep=False) == {}
    backend.save_weights(_Rank(main=False), tmp_path / "other")
    assert not (tmp_path / "other").exists()
    backend.save_weights(_Rank(main=True), tmp_path / "main")
    saved = load_file(tmp_path / "main" / "adapter_model.safetensors")
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(saved) == len(adapter) == 8 and all("lora_" in key for key in saved)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in adapter.values())


def test_saving_the_full_model_under_zero2_writes_on_the_main_process_without_cloning(tmp_path):
    from safetensors.torch import load_file

    from dpnotes.privacy.deepspeed import DeepSpeedBackend
    from dpnotes.testing.tiny_models import tiny_causal_lm
    from dpnotes.training.model_setup import TrainableConfig, prepare_trainable

    model = prepare_trainable(tiny_causal_lm("llama"), TrainableConfig(lora_rank=4, lora_targets=["q_proj", "v_proj"]))
    backend = DeepSpeedBackend(None, model, None, rank=0, world_size=2, stage=2)
    backend.save_weights(_Rank(main=False), tmp_path / "other", full_model=True)
    assert not (tmp_path / "other").exists()
    backend.save_weights(_Rank(main=True), tmp_path / "main", full_model=True)
    saved = {k: v for f in (tmp_path / "main").glob("*.safetensors") for k, v in load_file(f).items()}
    expected = model.state_dict()
    assert set(saved) <= set(expected) and len(saved) >= len(expected) - 1  # a tied weight is written once
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


def test_deepspeed_checkpoints_keep_no_frozen_weight_tied_ones_included(tmp_path):
    """exclude_frozen_parameters keeps a frozen weight tied to another (named once by
    named_parameters): drop_frozen_weights leaves only what training changes."""
    from peft import LoraConfig, get_peft_model

    from dpnotes.testing.tiny_models import tiny_llama
    from dpnotes.training.checkpoints import drop_frozen_weights

    model = get_peft_model(tiny_llama(tie=True), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    states = tmp_path / "step" / "pytorch_model" / "mp_rank_00_model_states.pt"
    states.parent.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "global_steps": 1}, states)
    drop_frozen_weights(tmp_path / "step", model)
    kept = torch.load(states, weights_only=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(kept["module"]) == trainable and kept["global_steps"] == 1


def test_every_zero3_launch_config_builds_the_model_partitioned():
    root = Path(__file__).resolve().parents[1]
    zero3 = []
    for path in sorted((root / "accelerate_configs").glob("*.yaml")):
        deepspeed = yaml.safe_load(path.read_text()).get("deepspeed_config", {})
        ds_file = deepspeed.get("deepspeed_config_file")
        if ds_file and json.loads((root / ds_file).read_text())["zero_optimization"]["stage"] == 3:
            zero3.append(path.name)
            assert deepspeed.get("zero3_init_flag") is True, path.name
    assert len(zero3) == 4, zero3


def test_zero3_refuses_a_model_loaded_whole():
    from dpnotes.errors import UserError
    from dpnotes.privacy.deepspeed import require_partitioned
    from dpnotes.testing.tiny_models import tiny_llama

    with pytest.raises(UserError, match="zero3_init_flag: true"):
        require_partitioned(tiny_llama())


def test_under_deepspeed_the_model_loads_in_the_dtype_deepspeed_runs_it_in():
    from dpnotes.privacy.deepspeed import module_dtype

    assert module_dtype({"bf16": {"enabled": True}}) == torch.bfloat16
    assert module_dtype({"fp16": {"enabled": "true"}}) == torch.float16
    assert module_dtype({"bf16": {"enabled": False}}) == module_dtype({}) == torch.float32
