"""What a finished run leaves in output_dir: the trained weights (LoRA adapter, or the full model)
with the tokenizer, optionally every weight (base + adapter, unmerged), and privacy_report.json."""
from __future__ import annotations

import json
from pathlib import Path

from dpnotes.privacy.engine import PrivacyEngine
from dpnotes.runs import RunDir
from dpnotes.training.config import TrainConfig
from dpnotes.training.setup import TrainingRun


def privacy_report(engine: PrivacyEngine, config: TrainConfig, world_size: int) -> dict:
    return {
        "epsilon": engine.epsilon(),
        **engine.privacy_status(),  # private: False with a fixed seed (the noise can be recomputed)
        "delta": engine.delta,
        "noise_multiplier": engine.noise_multiplier,
        "sample_rate": engine.sample_rate,
        "steps": engine.steps_taken,
        "max_grad_norm": config.privacy.max_grad_norm,
        "privacy_unit": config.privacy.privacy_unit,
        "privacy_units": engine.num_units,
        "max_tokens_per_patient": config.patient_token_cap() if config.privacy.privacy_unit == "patient" else None,
        "accountant": config.privacy.accountant,
        "target_epsilon": config.privacy.target_epsilon,
        "corpus": config.corpus,
        "model": config.model,
        "dtype": config.resolved_dtype(),  # of the base model; the trained weights are fp32 under auto
        "prompt_format": config.prompt_format().to_dict(),  # generation and evaluation prompt the same way
        "config_hash": config.fingerprint(),
        "world_size": world_size,
    }


def save_weights(run: TrainingRun, folder: Path, full_model: bool = False) -> None:
    """The backend's weights (gathered under ZeRO-3) and the tokenizer. Collective: call on every rank."""
    run.backend.save_weights(run.accelerator, folder, full_model)
    if run.accelerator.is_main_process:
        run.tokenizer.save_pretrained(folder)
    run.accelerator.wait_for_everyone()


def export(run: TrainingRun) -> dict:
    """Write the trained weights and the privacy report; return the report."""
    config = run.config
    report = privacy_report(run.engine, config, run.accelerator.num_processes)
    out = RunDir(run.output_dir)
    save_weights(run, out.model if config.trainable.full_finetune else out.adapter)
    if config.save_full_model and not config.trainable.full_finetune:
        save_weights(run, out.full_model, full_model=True)
    if run.accelerator.is_main_process:
        out.privacy_report.write_text(json.dumps(report, indent=2, default=str))
    return report
