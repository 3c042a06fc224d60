"""A training run folder as the recipe leaves it, on a tiny model, for the generation tests."""
from __future__ import annotations

import json
from pathlib import Path

from dpnotes.prompting import prompt_format_for

# What a DP training run records (privacy_report.json), with made-up values the tests check against.
TRAINING_REPORT = {"epsilon": 3.2, "delta": 1e-4, "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 40,
                   "max_grad_norm": 1.0, "privacy_unit": "patient", "privacy_units": 300, "accountant": "rdp",
                   "corpus": "default", "config_hash": "abc", "prompt_format": prompt_format_for("default").to_dict()}


def tiny_training_run(folder: Path, model_dir: Path) -> Path:
    """folder/adapter (a random, non-zero LoRA on q/v of `model_dir`) and folder/privacy_report.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(folder / "adapter")
    (folder / "privacy_report.json").write_text(json.dumps({**TRAINING_REPORT, "model": str(model_dir)}))
    return folder
