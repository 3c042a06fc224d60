"""DP fine-tuning of a causal LM on notes: the library behind train/dp_lora.py.

Runs unchanged on one CPU process or N processes (`accelerate launch`): every rank holds the
full trainable state, samples the same logical batch (shared secret key), clips its own share, the
clipped sums are summed across ranks, and every rank adds the same noise (shared noise key),
so noise lands once per coordinate and replicas stay identical.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState

from dpnotes.corpus import Note, examples_by_patient, load_configured_corpus, split_by_patient
from dpnotes.models import load_causal_lm
from dpnotes.privacy.engine import NOT_PRIVATE, PrivacyEngine
from dpnotes.privacy.losses import causal_lm_losses
from dpnotes.privacy.deepspeed import DeepSpeedDPStep, is_deepspeed, prepare_deepspeed, save_trained
from dpnotes.runs import RunDir
from dpnotes.training.model_setup import count_trainable, prepare_trainable
from dpnotes.training.config import TrainConfig, config_dict
from dpnotes.tokenized_notes import tokenize_notes

class TrainableWeights:
    """Checkpoint only what training changes (LoRA adapters, or everything under full FT)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


def load_training_notes(config: TrainConfig) -> list[Note]:
    """The train split (by patient) of the configured corpus, validated before any work."""
    notes = load_configured_corpus(config.corpus, default_patients=config.corpus_patients, canaries=config.canaries,
                                   seed=config.split_seed)
    return split_by_patient(notes, seed=config.split_seed)["train"]


def make_accelerator(config: TrainConfig) -> Accelerator:
    # Launched as several CPU processes, accelerate would otherwise treat every one as rank 0.
    # cpu=True gives the MULTI_CPU type (real barriers); DeepSpeed sets its own type (DEEPSPEED).
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        PartialState(backend="gloo") if deepspeed else PartialState(cpu=True, backend="gloo")
    trackers = None if config.report_to == "none" else config.report_to
    os.environ.setdefault("WANDB_MODE", "offline")  # `wandb sync` uploads later, on purpose
    if trackers:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", str(Path(config.output_dir).parent))
    return Accelerator(log_with=trackers, project_dir=config.output_dir)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {config.optimizer!r}")


STEP_FOLDER = re.compile(r"step_\d{6,}")  # f"step_{step:06d}"
RUN_STAMP = "dpnotes_run.json"  # in every checkpoint: the config hash it belongs to


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed from (foreign run, tampered pointer)."""


def latest_checkpoint(output_dir: Path, config_hash: str) -> Path | None:
    """The checkpoint `checkpoints/latest` names, after checking that the pointer names a sibling
    step folder and that the checkpoint belongs to this run's configuration.

    Resuming unpickles the checkpoint (accelerate/torch): run directories are trusted input.
    These checks stop mistakes (a copied folder, a hand-edited pointer), not an attacker who can
    write to the run directory.
    """
    folder = RunDir(output_dir).checkpoints
    pointer = folder / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not STEP_FOLDER.fullmatch(name) or not (folder / name).is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, not a step_NNNNNN folder beside it: refusing to resume")
    checkpoint = folder / name
    stamp = checkpoint / RUN_STAMP
    recorded = json.loads(stamp.read_text()).get("config_hash") if stamp.exists() else None
    if recorded != config_hash:
        raise CheckpointError(
            f"{checkpoint} belongs to configuration {recorded}, not this run's {config_hash}: refusing to resume"
        )
    return checkpoint


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, config_hash: str) -> None:
    """Write the step's state, owner-only (it holds the secret sampling and noise keys), then move
    the `latest` pointer."""
    name = f"step_{step:06d}"
    folder = RunDir(output_dir).checkpoints
    previous = os.umask(0o077)  # everything written below is owner-only
    try:
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(folder / name))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            restrict_to_owner(folder / name)  # in case a library set modes of its own
            (folder / name / RUN_STAMP).write_text(json.dumps({"config_hash": config_hash, "step": step}))
            # The pointer moves only once the state is fully written: a crash mid-save keeps the old one.
            tmp = folder / "latest.tmp"
            tmp.write_text(name)
            tmp.replace(folder / "latest")
    finally:
        os.umask(previous)


def restrict_to_owner(root: Path) -> None:
    """chmod go-rwx below `root` (files a library wrote with its own modes included)."""
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & 0o700)


def claim_output_dir(output_dir: Path, config: TrainConfig, write: bool) -> None:
    """Bind output_dir to this config: resuming someone else's checkpoints would mix two runs."""
    stamp = RunDir(output_dir).config
    if stamp.exists():
        recorded = json.loads(stamp.read_text()).get("config_hash")
        if recorded != config.fingerprint():
            raise ValueError(
                f"{output_dir} holds a run with another configuration (hash {recorded}, this one "
                f"{config.fingerprint()}): choose another output_dir or delete it"
            )
        return
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"config_hash": config.fingerprint(), **config_dict(config)}, indent=2))


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
        "accountant": config.privacy.accountant,
        "target_epsilon": config.privacy.target_epsilon,
        "corpus": config.corpus,
        "model": config.model,
        "prompt_format": config.prompt_format().to_dict(),  # generation and evaluation prompt the same way
        "config_hash": config.fingerprint(),
        "world_size": world_size,
    }


def train(config: TrainConfig) -> dict:
    """Train (or resume) and return the privacy report; writes adapter/model and report to output_dir."""
    notes = load_training_notes(config)
    units = len(examples_by_patient([n.patient_id for n in notes])) if config.privacy.privacy_unit == "patient" else len(notes)
    config.privacy.validated_delta(units)  # bad privacy settings fail before any model is loaded
    accelerator = make_accelerator(config)
    output_dir = Path(config.output_dir)
    claim_output_dir(output_dir, config, write=accelerator.is_main_process)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    torch.manual_seed(config.init_seed)
    model, tokenizer = load_causal_lm(config.model, dtype=dtype)
    model = prepare_trainable(model, config.trainable).to(accelerator.device)
    model.train()
    data = tokenize_notes(notes, tokenizer, config.max_length, config.prompt_format())
    patient_unit = config.privacy.privacy_unit == "patient"
    examples_of_unit = examples_by_patient(data.patient_ids) if patient_unit else None
    engine = PrivacyEngine(model, config.privacy, len(examples_of_unit) if patient_unit else len(data), examples_of_unit)
    optimizer = make_optimizer(model, config)
    deepspeed = is_deepspeed(accelerator)
    if deepspeed:  # ZeRO-1/2/3: DeepSpeed checkpoints weights and optimizer; noise per fp32 partition
        ds_model, optimizer = prepare_deepspeed(accelerator, model, optimizer, config.privacy.micro_batch_size)
        ds_step = DeepSpeedDPStep(engine, ds_model, model, optimizer)
        accelerator.register_for_checkpointing(engine)
    else:
        accelerator.register_for_checkpointing(TrainableWeights(model), optimizer, engine)
    print(
        f"dpnotes rank {accelerator.process_index}/{accelerator.num_processes} "
        f"({accelerator.distributed_type}, device {accelerator.device})", flush=True
    )

    summary = {**engine.summary(), "examples": len(data), "world_size": accelerator.num_processes}
    trainable, total = count_trainable(model)
    summary.update(trainable_parameters=trainable, total_parameters=total, config_hash=config.fingerprint())
    accelerator.init_trackers("dpnotes", config=config_dict(config) | {"derived": summary})
    accelerator.print(
        f"dpnotes DP training | rank {accelerator.process_index}/{accelerator.num_processes} | "
        f"{len(data)} notes, {engine.num_units} {config.privacy.privacy_unit} units | q={engine.sample_rate:.4g} "
        f"σ={engine.noise_multiplier:.4g} C={config.privacy.max_grad_norm} expected batch={summary['expected_batch_size']:.1f} "
        f"steps={config.privacy.steps} target ε={config.privacy.target_epsilon} δ={engine.delta:.3g} | "
        f"trainable {trainable:,}/{total:,}"
    )

    if engine.privacy_label:
        accelerator.print(f"WARNING: privacy.seed is set: {NOT_PRIVATE} (tests and audits only)")

    checkpoint = latest_checkpoint(output_dir, config.fingerprint())
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {engine.steps_taken}, ε spent {engine.epsilon():.4g}")

    def fetch(indices: list[int]) -> dict:
        return data.collate(indices, accelerator.device)

    more = engine.budget_allows_step()
    while more:
        start = time.perf_counter()
        if deepspeed:
            stats = ds_step.step(fetch, causal_lm_losses, accelerator.process_index, accelerator.num_processes)
        else:
            stats = engine.step(model, optimizer, fetch, causal_lm_losses, accelerator.process_index, accelerator.num_processes)
        elapsed = time.perf_counter() - start
        step = engine.steps_taken
        accelerator.log(
            {
                "epsilon": stats.epsilon,
                "noise_multiplier": engine.noise_multiplier,
                # Computed from the sampled (private) batch, or timed on it (a step's work grows with
                # the batch's size and lengths): outside the DP guarantee.
                "nonprivate/step_seconds": elapsed,
                "nonprivate/loss": stats.loss_sum / max(stats.examples, 1),
                "nonprivate/clipped_fraction": stats.clipped_units / max(stats.units, 1),
                "nonprivate/tokens_per_second": stats.tokens / elapsed,
            },
            step=step,
        )
        more = engine.budget_allows_step()
        if step % config.save_every == 0 or not more:
            save_checkpoint(accelerator, output_dir, step, config.fingerprint())
        accelerator.print(
            f"step {step}/{config.privacy.steps} ε={stats.epsilon:.4g} "
            f"[not private: loss {stats.loss_sum / max(stats.examples, 1):.3f}, {elapsed:.2f}s]"
        )

    report = privacy_report(engine, config, accelerator.num_processes)
    run = RunDir(output_dir)
    trained = run.model if config.trainable.full_finetune else run.adapter
    if deepspeed:  # collective (ZeRO-3 gathers the weights)
        save_trained(accelerator, ds_model, model, trained, tokenizer, config.trainable.full_finetune)
        if config.save_full_model and not config.trainable.full_finetune:
            save_trained(accelerator, ds_model, model, run.full_model, tokenizer, full_model=True)
    else:
        if accelerator.is_main_process:
            model.save_pretrained(trained)
            tokenizer.save_pretrained(trained)
        if config.save_full_model and not config.trainable.full_finetune:
            accelerator.save_model(model, run.full_model)  # writes on the main process
    if accelerator.is_main_process:
        run.privacy_report.write_text(json.dumps(report, indent=2, default=str))
    accelerator.end_training()
    if not math.isinf(report["epsilon"]):
        accelerator.print(f"done: ε = {report['epsilon']:.4g} at δ = {report['delta']:.3g} after {report['steps']} steps")
    return report
