"""One config style for every command: each shipped YAML loads through its dataclass, unknown keys
and wrong types are one-line errors naming the file and the key, overrides apply, and the `dpnotes`
console script dispatches to every command."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dpnotes.cli import COMMANDS
from dpnotes.cli import main as dpnotes
from dpnotes.config import ConfigError, build, load, parse_overrides
from dpnotes.errors import UserError
from dpnotes.evaluation.cli import CodersConfig, DPClassifierConfig
from dpnotes.generation.synthesize import SynthesizeConfig
from dpnotes.study.parts import StudyConfig, load_study_config, part_pipeline
from dpnotes.study.pipeline import load_pipeline_config
from dpnotes.training.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
EVAL_CONFIGS = {"coders.yaml": CodersConfig, "dp_classifier.yaml": DPClassifierConfig}


def shipped(folder: str) -> list[Path]:
    found = sorted((ROOT / folder).glob("*.yaml"))
    assert found, folder
    return found


@pytest.mark.parametrize("path", shipped("train/configs"), ids=lambda p: p.name)
def test_every_train_config_loads(path):
    assert isinstance(load_config(path), TrainConfig)


@pytest.mark.parametrize("path", shipped("generate/configs"), ids=lambda p: p.name)
def test_every_generate_config_loads(path):
    config = load(SynthesizeConfig, path, ["model=runs/x/merged", "output_dir=runs/x/synthetic"])
    assert config.sampling().max_new_tokens == config.max_new_tokens


@pytest.mark.parametrize("path", shipped("eval/configs"), ids=lambda p: p.name)
def test_every_eval_config_loads(path):
    assert isinstance(load(EVAL_CONFIGS[path.name], path), EVAL_CONFIGS[path.name])


@pytest.mark.parametrize("path", [p for p in shipped("dpnotes/study/configs") if p.name != "study.yaml"], ids=lambda p: p.name)
def test_every_pipeline_config_loads_with_its_training_config(path):
    config = load_pipeline_config(path)
    assert config.epsilons and config.generation.max_new_tokens > 0


def test_the_study_config_loads_with_every_part():
    study = load_study_config(ROOT / "dpnotes" / "study" / "configs" / "study.yaml")
    assert isinstance(study, StudyConfig) and study.parts
    pipelines = {name: part_pipeline(study, name) for name in study.parts}
    assert pipelines["default_20k_dp_coders"].train == {"corpus_patients": 20000}


def test_an_unknown_key_is_named_with_the_file_and_the_known_keys(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("privacy:\n  epsilon: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: unknown key 'privacy.epsilon'; known: ") and "privacy.target_epsilon" in message
    assert "\n" not in message


@pytest.mark.parametrize("overrides, message", [
    (["lr=0.1"], "command line: unknown key 'lr'"),
    (["trainable.lora_r=4"], "unknown key 'trainable.lora_r'"),
    (["privacy.steps=many"], "'privacy.steps' must be an integer"),
    (["privacy.clipping=fast"], "'privacy.clipping' must be one of 'ghost', 'bk'"),
    (["trainable=4"], "'trainable' must be a mapping"),
    (["steps"], "not of the form key.sub=value"),
])
def test_bad_overrides_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(ROOT / "train" / "configs" / "tiny_test.yaml", overrides)


def test_overrides_apply_over_the_file_with_yaml_values():
    config = load_config(ROOT / "train" / "configs" / "tiny_test.yaml",
                         ["privacy.target_epsilon=inf", "learning_rate=1e-3", "trainable.lora_targets=[q_proj]"])
    assert math.isinf(config.privacy.target_epsilon) and config.learning_rate == 0.001
    assert config.trainable.lora_targets == ["q_proj"] and config.privacy.steps == 4  # the file's
    assert parse_overrides(["a.b=1", "a.c=x:y"]) == {"a": {"b": 1, "c": "x:y"}}


def test_pipeline_train_settings_are_checked_against_the_training_config():
    path = ROOT / "dpnotes" / "study" / "configs" / "pipeline_demo.yaml"
    with pytest.raises(ConfigError, match="command line: unknown key 'train.privacy.epsilon'"):
        load_pipeline_config(path, ["train.privacy.epsilon=3"])
    with pytest.raises(ConfigError, match="unknown key 'generation_batch_size'"):
        load_pipeline_config(path, ["generation_batch_size=3"])
    config = load_pipeline_config(path, ["train.privacy.steps=3", "generation.temperature=0.5"])
    assert config.train == {"privacy": {"steps": 3}} and config.generation.temperature == 0.5


def test_pipeline_dp_coder_settings_are_checked_against_the_coder_kinds():
    path = ROOT / "dpnotes" / "study" / "configs" / "pipeline_demo.yaml"
    with pytest.raises(ConfigError, match=r"'dp_coders\[0\]' must be one of 'lora', 'probe', 'hashed'"):
        load_pipeline_config(path, ["dp_coders=[svm]"])
    with pytest.raises(UserError, match="coder hashed has none"):
        load_pipeline_config(path, ["dp_coder_options.hashed.lora_rank=4"])
    config = load_pipeline_config(path, ["dp_coder_options.probe.learning_rate=20", "dp_coder_options.probe.steps=50"])
    assert config.dp_coder_options["probe"].coder_options("probe") == {"learning_rate": 20.0, "steps": 50}


def test_a_missing_required_key_and_a_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing key 'model'"):
        build(SynthesizeConfig, {"output_dir": "x"}, "command line")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


def test_dpnotes_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit:
        dpnotes(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "merge", "generate", "eval", "study", "demo"))


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"eval"}) + ["eval coders", "eval dp-classifier"])
def test_every_command_help_lists_its_settings(name, capsys):
    with pytest.raises(SystemExit) as exit:
        dpnotes([*name.split(), "--help"])
    assert exit.value.code == 0
    assert "settings (YAML keys, or key.sub=value) and their defaults:" in capsys.readouterr().out


def test_the_console_script_reports_a_config_error_in_one_line():
    script = Path(sys.executable).parent / "dpnotes"
    result = subprocess.run([str(script), "train", "--dry-run", "privacy.epsilon=3"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: command line: unknown key 'privacy.epsilon'; known: ")
    assert result.stderr.count("\n") == 1


def deepspeed_configs() -> list[tuple[str, dict]]:
    """Every DeepSpeed config shipped: ds_configs/*.json, and what the DeepSpeed accelerate configs
    name or embed."""
    import json

    import yaml

    found = [(p.name, json.loads(p.read_text())) for p in sorted((ROOT / "ds_configs").glob("*.json"))]
    for path in shipped("accelerate_configs"):
        launch = yaml.safe_load(path.read_text())
        if launch.get("distributed_type") != "DEEPSPEED":
            continue
        settings = launch["deepspeed_config"]
        file = settings.get("deepspeed_config_file")
        found.append((path.name, json.loads((ROOT / file).read_text()) if file else settings))
    return found


@pytest.mark.parametrize("name, ds_config", deepspeed_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_deepspeed_config_accumulates_and_reduces_the_clipped_sums_in_fp32(name, ds_config):
    # The keys as the installed DeepSpeed reads them: a misspelt key would be silently ignored.
    constants = pytest.importorskip("deepspeed.runtime.constants")
    assert ds_config[constants.DATA_TYPES][constants.GRAD_ACCUM_DTYPE] == "fp32"
    assert ds_config[constants.COMMUNICATION_DATA_TYPE] == "fp32"
    zero = ds_config["zero_optimization"]
    gpu = ds_config["bf16"]["enabled"]  # the *_cpu configs train in fp32 on gloo, where nothing overlaps
    assert zero["overlap_comm"] == (gpu and zero["stage"] in (2, 3)), "overlap_comm on for GPU ZeRO-2/3 only"


def test_launch_files_set_the_current_nccl_variables():
    # torch >= 2.2 reads TORCH_NCCL_ASYNC_ERROR_HANDLING; the bare name is deprecated and will be ignored.
    import re

    bare = re.compile(r"(?<!TORCH_)NCCL_ASYNC_ERROR_HANDLING")
    files = [p for pattern in ("docs/*", "accelerate_configs/*", "ds_configs/*", "Makefile") for p in ROOT.glob(pattern)]
    assert [p.name for p in files if p.is_file() and bare.search(p.read_text())] == []


@pytest.mark.parametrize("native", [True, False])
def test_train_dtype_auto_resolves_on_this_machine_and_stays_fp32_where_bf16_is_not_exact(monkeypatch, native):
    monkeypatch.setattr("dpnotes.models.native_bf16", lambda: native)
    demo = ROOT / "train/configs/demo_smollm2.yaml"
    config = load_config(demo)
    assert config.dtype == "auto" and config.resolved_dtype() == ("bfloat16" if native else "float32")
    # auto is the same run as the dtype it resolves to: a checkpoint of one resumes the other
    assert config.fingerprint() == load_config(demo, [f"dtype={config.resolved_dtype()}"]).fingerprint()
    for exact_in_fp32_only in ("trainable.full_finetune=true", "privacy.clipping=ghost"):
        assert load_config(demo, [exact_in_fp32_only]).resolved_dtype() == "float32"
        assert load_config(demo, [exact_in_fp32_only, "dtype=bfloat16"]).resolved_dtype() == "bfloat16"
