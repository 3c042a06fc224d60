"""What a finished run leaves in output_dir: the trained weights (LoRA adapter, or the full model)
with the tokenizer, optionally every weight (base + adapter, unmerged), and privacy_report.json."""
from __future__ import annotations

import json
from pathlib import Path

from dpnotes.privacy.accounting import accountant_from_state
from dpnotes.privacy.engine import PrivacyEngine
from dpnotes.privacy.keywords import CodeKeywords
from dpnotes.prompting import PromptFormat
from dpnotes.runs import RunDir
from dpnotes.training.config import TrainConfig
from dpnotes.training.setup import TrainingRun


def run_guarantee(engine: PrivacyEngine, keywords: CodeKeywords | None) -> tuple[float, float]:
    """(ε, δ) of everything the run released: its weights and its key terms, at one privacy unit.

    Both are Gaussian mechanisms on one unit's contribution under add/remove adjacency. The key
    terms are one unsampled step of noise multiplier `noise_std` (a unit's contribution has L2 norm
    1), so the run's accountant composes that step with the DP-SGD steps, at the weights' δ. Basic
    composition bounds the pair too, at (ε_weights + ε_terms, δ_weights + δ_terms); the accountant's
    pair is reported when its ε is smaller (its δ always is).
    """
    if keywords is not None and keywords.privacy_unit != engine.config.privacy_unit:
        raise ValueError(f"key terms released at unit {keywords.privacy_unit!r}, weights trained at "
                         f"{engine.config.privacy_unit!r}: guarantees of different units are never added")
    basic = (engine.epsilon() + keywords.epsilon, engine.delta + keywords.delta) if keywords else None
    if keywords is None or engine.steps_taken == 0 or engine.noise_multiplier == 0 or keywords.noise_std == 0:
        return basic or (engine.epsilon(), engine.delta)
    composed = accountant_from_state(engine.accountant.state_dict())
    composed.step(keywords.noise_std, 1.0)
    epsilon = composed.epsilon(engine.delta)
    return (epsilon, engine.delta) if epsilon < basic[0] else basic


def privacy_report(engine: PrivacyEngine, config: TrainConfig, world_size: int, prompt: PromptFormat,
                   keywords: CodeKeywords | None = None) -> dict:
    """The guarantee of the weights (epsilon, delta) and, with the key-term release at the same unit,
    of everything the run released (total_epsilon, total_delta: see `run_guarantee`)."""
    total_epsilon, total_delta = run_guarantee(engine, keywords)
    released = {"epsilon": keywords.epsilon, "delta": keywords.delta, "noise_std": keywords.noise_std,
                "privacy_unit": keywords.privacy_unit, "per_code": keywords.top_k,
                "vocabulary_size": keywords.vocabulary_size} if keywords else None
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
        "prompt_format": prompt.to_dict(),  # generation and evaluation prompt the same way
        "key_terms": released,
        "total_epsilon": total_epsilon,
        "total_delta": total_delta,
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
    report = privacy_report(run.engine, config, run.accelerator.num_processes, run.prompt, run.keywords)
    out = RunDir(run.output_dir)
    save_weights(run, out.model if config.trainable.full_finetune else out.adapter)
    if config.save_full_model and not config.trainable.full_finetune:
        save_weights(run, out.full_model, full_model=True)
    if run.accelerator.is_main_process:
        out.privacy_report.write_text(json.dumps(report, indent=2, default=str))
    return report
