"""The training recipe end to end on a tiny LLaMA: outputs, derived quantities, and
interrupted + resumed == uninterrupted (parameters and ε)."""
import json
import stat

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from dpnotes.privacy.engine import NOT_PRIVATE, PrivacyEngine
from dpnotes.training.checkpoints import RUN_STAMP, CheckpointError, latest_checkpoint
from dpnotes.training.recipe import train
from dpnotes.training.config import load_config

CONFIG = "train/configs/tiny_test.yaml"


def run(tmp_path, model_dir, name, *overrides):
    out = tmp_path / name
    config = load_config(CONFIG, [f"model={model_dir}", f"output_dir={out}", "privacy.seed=5", *overrides])
    return train(config), out


def test_recipe_trains_and_writes_adapter_and_privacy_report(tmp_path, tiny_model_dir):
    report, out = run(tmp_path, tiny_model_dir, "run")
    assert report["steps"] == 4
    assert 0 < report["epsilon"] <= 8.0
    assert json.loads((out / "privacy_report.json").read_text())["epsilon"] == report["epsilon"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "checkpoints" / "latest").read_text() == "step_000004"
    assert report["private"] is False and report["note"] == NOT_PRIVATE  # privacy.seed=5


def test_checkpoints_hold_secret_keys_and_are_owner_only(tmp_path, tiny_model_dir):
    _, out = run(tmp_path, tiny_model_dir, "run")
    folder = out / "checkpoints"
    for path in [folder, *folder.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_only_public_quantities_are_logged_outside_nonprivate(tmp_path, tiny_model_dir, monkeypatch):
    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append(values))
    run(tmp_path, tiny_model_dir, "run")
    assert logged
    for values in logged:
        assert {k for k in values if not k.startswith("nonprivate/")} == {"epsilon", "noise_multiplier"}
        assert "nonprivate/step_seconds" in values


def test_resume_refuses_a_foreign_or_redirected_checkpoint(tmp_path, tiny_model_dir):
    _, out = run(tmp_path, tiny_model_dir, "run")
    config_hash = json.loads((out / "config.json").read_text())["config_hash"]
    folder = out / "checkpoints"
    assert latest_checkpoint(out, config_hash) == folder / "step_000004"
    with pytest.raises(CheckpointError, match="belongs to configuration"):
        latest_checkpoint(out, "0" * 16)
    for pointer in ("../../elsewhere", "step_000004/../step_000002", "step_000099"):
        (folder / "latest").write_text(pointer)
        with pytest.raises(CheckpointError, match="not a step_NNNNNN folder"):
            latest_checkpoint(out, config_hash)
    (folder / "latest").write_text("step_000004")
    (folder / "step_000004" / RUN_STAMP).unlink()  # a checkpoint copied in from elsewhere
    with pytest.raises(CheckpointError, match="belongs to configuration None"):
        latest_checkpoint(out, config_hash)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_model_dir, monkeypatch):
    full_report, full = run(tmp_path, tiny_model_dir, "full")

    allows = PrivacyEngine.budget_allows_step
    monkeypatch.setattr(PrivacyEngine, "budget_allows_step", lambda self: self.steps_taken < 2 and allows(self))
    run(tmp_path, tiny_model_dir, "split")  # "crashes" after the step-2 checkpoint
    monkeypatch.setattr(PrivacyEngine, "budget_allows_step", allows)
    resumed_report, split = run(tmp_path, tiny_model_dir, "split")

    assert resumed_report["steps"] == 4
    assert resumed_report["epsilon"] == full_report["epsilon"]
    expected = load_file(full / "adapter" / "adapter_model.safetensors")
    got = load_file(split / "adapter" / "adapter_model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)


def test_bad_privacy_target_fails_before_training(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        run(tmp_path, tiny_model_dir, "bad", "privacy.target_epsilon=0")


def test_output_dir_of_another_config_is_refused(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, "taken")
    with pytest.raises(ValueError, match="another configuration"):
        run(tmp_path, tiny_model_dir, "taken", "learning_rate=0.5")


def test_lora_on_the_top_layers_only_adapts_those_layers_and_stays_exact():
    from dpnotes.testing.dp_oracle import assert_clipper_matches_oracle
    from dpnotes.testing.tiny_models import prompt_masked_batch, tiny_llama
    from dpnotes.privacy.losses import causal_lm_losses
    from dpnotes.training.model_setup import TrainableConfig, prepare_trainable

    model = prepare_trainable(tiny_llama(layers=3), TrainableConfig(lora_rank=2, lora_targets=["q_proj", "v_proj"],
                                                                     lora_top_layers=1))
    adapted = {name.split(".layers.")[1].split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"2"}
    assert_clipper_matches_oracle(model, causal_lm_losses, prompt_masked_batch(), "ghost")
    with pytest.raises(ValueError, match="lora_top_layers must be in"):
        prepare_trainable(tiny_llama(layers=3), TrainableConfig(lora_top_layers=4))


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_printed_and_recorded_and_the_adapters_stay_fp32(tmp_path, tiny_model_dir, monkeypatch, capsys, native):
    monkeypatch.setattr("dpnotes.models.native_bf16", lambda: native)
    report, out = run(tmp_path, tiny_model_dir, "run", "dtype=auto")
    dtype = "bfloat16" if native else "float32"
    assert report["dtype"] == dtype and f"| {dtype} base" in capsys.readouterr().out
    assert {t.dtype for t in load_file(out / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}


def test_trainable_parameters_below_fp32_are_refused():
    from dpnotes.testing.tiny_models import tiny_llama
    from dpnotes.training.model_setup import require_fp32_trainable

    with pytest.raises(RuntimeError, match="must be float32"):
        require_fp32_trainable(tiny_llama().to(torch.bfloat16))


def test_auto_bf16_under_deepspeed_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    """DeepSpeed back-propagates Σ c_i L_i itself, which over a bf16 base is not the exact clipped sum."""
    from dpnotes.errors import UserError

    monkeypatch.setattr("dpnotes.models.native_bf16", lambda: True)
    monkeypatch.setattr("dpnotes.training.setup.is_deepspeed", lambda accelerator: True)
    with pytest.raises(UserError, match="dtype=auto would give DeepSpeed a bf16 base"):
        run(tmp_path, tiny_model_dir, "run", "dtype=auto")
