"""The training recipe end to end on a tiny LLaMA: outputs, derived quantities, and
interrupted + resumed == uninterrupted (parameters and ε)."""
import json
import stat

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from dpnotes.privacy.engine import NOT_PRIVATE, PrivacyEngine
from dpnotes.errors import UserError
from dpnotes.runs import RunDir
from dpnotes.training.checkpoints import RUN_STAMP, CheckpointError, claim_output_dir, latest_checkpoint
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


def test_a_patient_token_cap_below_max_length_fails_before_training(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="max_tokens_per_patient must be >= max_length"):
        run(tmp_path, tiny_model_dir, "bad", "privacy.privacy_unit=patient", "max_tokens_per_patient=8")


def test_output_dir_of_another_config_is_refused(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, "taken")
    with pytest.raises(ValueError, match="another configuration"):
        run(tmp_path, tiny_model_dir, "taken", "learning_rate=0.5")



class Rank:
    """One rank's view of a first launch: `during_barrier` is what the other ranks do meanwhile."""

    def __init__(self, main: bool, during_barrier=lambda: None):
        self.is_main_process, self.during_barrier, self.barriers = main, during_barrier, 0

    def wait_for_everyone(self):
        self.barriers += 1
        self.during_barrier()


def test_the_main_process_claims_the_output_dir_whole_before_the_barrier(tmp_path):
    config, out = load_config(CONFIG, [f"output_dir={tmp_path / 'run'}"]), tmp_path / "run"

    def others_read_it():  # what the other ranks find when they pass the barrier
        assert json.loads(RunDir(out).config.read_text())["config_hash"] == config.fingerprint()

    main = Rank(main=True, during_barrier=others_read_it)
    claim_output_dir(main, out, config)
    assert main.barriers == 1 and [p.name for p in out.iterdir()] == [RunDir(out).config.name]


def test_other_ranks_check_the_stamp_only_after_the_barrier(tmp_path):
    # On a first launch the stamp does not exist yet when a non-main rank arrives; the main process
    # writes it (here: of another configuration) while that rank waits. Checking before the barrier,
    # it would find nothing and skip the check.
    config, out = load_config(CONFIG, [f"output_dir={tmp_path / 'run'}"]), tmp_path / "run"
    other = load_config(CONFIG, [f"output_dir={out}", "learning_rate=0.5"])
    with pytest.raises(UserError, match="another configuration"):
        claim_output_dir(Rank(main=False, during_barrier=lambda: claim_output_dir(Rank(main=True), out, other)), out, config)


def test_a_refused_output_dir_stops_every_rank_after_the_barrier(tmp_path):
    config, out = load_config(CONFIG, [f"output_dir={tmp_path / 'run'}"]), tmp_path / "run"
    claim_output_dir(Rank(main=True), out, load_config(CONFIG, [f"output_dir={out}", "learning_rate=0.5"]))
    for main in (True, False):  # the main process reaches the barrier too: no rank waits there forever
        rank = Rank(main=main)
        with pytest.raises(UserError, match="another configuration"):
            claim_output_dir(rank, out, config)
        assert rank.barriers == 1

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


def test_auto_is_fp32_under_deepspeed(monkeypatch):
    """DeepSpeed back-propagates Σ c_i L_i itself, which over a bf16 base is not the exact clipped sum;
    accelerate's launcher says DeepSpeed in the environment before any setup."""
    monkeypatch.setattr("dpnotes.models.native_bf16", lambda: True)
    assert load_config(CONFIG, ["dtype=auto"]).resolved_dtype() == "bfloat16"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert load_config(CONFIG, ["dtype=auto"]).resolved_dtype() == "float32"
    assert load_config(CONFIG, ["dtype=bfloat16"]).resolved_dtype() == "bfloat16"
