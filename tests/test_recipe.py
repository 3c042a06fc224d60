"""The training recipe end to end on a tiny LLaMA: outputs, derived quantities, and
interrupted + resumed == uninterrupted (parameters and ε)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from dpnotes.train.dp.engine import PrivacyEngine
from dpnotes.train.recipe import train
from dpnotes.train.run_config import load_config

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
