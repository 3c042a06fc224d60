"""Setting up a DP training run: data, accelerator, model, privacy engine and step backend,
optimizer, trackers, resume.

Runs unchanged on one CPU process or N processes (`accelerate launch`). The step backend is chosen
here, once: under DeepSpeed (ZeRO-1/2/3) the `DeepSpeedBackend`, otherwise the
`ReplicatedBackend` (every rank holds the full trainable state; see dpnotes.privacy.backends).
The train loop, checkpoints and export only talk to the backend it returns.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from transformers import PreTrainedTokenizerBase

from dpnotes.caches import corpus_cache, token_cache
from dpnotes.corpus import Note, corpus_fingerprint, load_split_tables
from dpnotes.corpus.code_lists import public_label_space
from dpnotes.digests import digest
from dpnotes.models import compute_dtype, load_causal_lm, load_tokenizer, use_tf32
from dpnotes.privacy.accounting import PrivacyParameterError
from dpnotes.privacy.backends import ReplicatedBackend
from dpnotes.privacy.deepspeed import DeepSpeedBackend, is_deepspeed, module_dtype, require_partitioned, zero_stage
from dpnotes.privacy.engine import NOT_PRIVATE, PrivacyEngine
from dpnotes.privacy.keywords import CodeKeywords, dp_code_keywords, keyword_units, public_vocabulary
from dpnotes.prompting import PromptFormat
from dpnotes.runs import RunDir
from dpnotes.tokenized_notes import TokenizedNotes, load_tokenized
from dpnotes.training.checkpoints import appeared, claim_output_dir, latest_checkpoint, load_checkpoint
from dpnotes.training.config import TrainConfig, config_dict
from dpnotes.training.model_setup import count_trainable, enable_activation_checkpointing, prepare_trainable

Backend = ReplicatedBackend | DeepSpeedBackend


def load_training_data(config: TrainConfig, accelerator: Accelerator, prompt: PromptFormat) -> TokenizedNotes:
    """The train split's tokens from the token cache, keyed by the corpus's fingerprint (no note is
    read to compute it). On a miss the main process of each node streams the corpus into the corpus
    cache (validated), splits it and tokenizes the train split; the other ranks wait, then
    memory-map what it stored."""
    generated = {"n_patients": config.corpus_patients, "canaries": config.canaries} if config.corpus == "default" else {}
    source = digest(corpus_fingerprint(config.corpus, **generated), "train split", config.split_seed)

    with accelerator.local_main_process_first():  # one per node: the caches are on each node's disk
        return load_tokenized(source, lambda: train_split(config), load_tokenizer(config.model), config.max_length,
                              prompt, token_cache())


def train_split(config: TrainConfig):
    return load_split_tables(config.corpus, default_patients=config.corpus_patients, canaries=config.canaries,
                             seed=config.split_seed, cache=corpus_cache())["train"]


def released_key_terms(config: TrainConfig, accelerator: Accelerator) -> CodeKeywords | None:
    """The run's DP key terms per code (`keywords_epsilon`), released once by the main process into
    output_dir and read back by every rank: a resumed run reads its release and spends nothing again.
    A non-private run (target ε = ∞) releases them exactly. Collective: call on every rank."""
    if config.keywords_epsilon is None:
        return None
    path = RunDir(Path(config.output_dir)).keywords
    if accelerator.is_main_process and not path.exists():
        split = train_split(config)
        notes = [Note(f"row-{i}", patient, text, list(codes)) for i, (patient, text, codes)
                 in enumerate(zip(split["patient_id"], split["text"], split["codes"]))]
        unit = config.privacy.privacy_unit
        units = keyword_units(notes, unit)
        epsilon = math.inf if math.isinf(config.privacy.target_epsilon) else config.keywords_epsilon
        release = dp_code_keywords(units, public_label_space(None, config.corpus),
                                   public_vocabulary(load_tokenizer(config.model)), epsilon, 1 / (10 * len(units)),
                                   privacy_unit=unit, top_k=config.keywords_per_code, seed=config.privacy.seed)
        tmp = path.with_name(path.name + ".tmp")
        release.save(tmp)
        tmp.replace(path)
    accelerator.wait_for_everyone()
    return CodeKeywords.load(appeared(path))


def make_accelerator(config: TrainConfig) -> Accelerator:
    # Launched as several CPU processes, accelerate would otherwise treat every one as rank 0.
    # cpu=True gives the MULTI_CPU type (real barriers); DeepSpeed sets its own type (DEEPSPEED).
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        PartialState(backend="gloo") if deepspeed else PartialState(cpu=True, backend="gloo")
    use_tf32()
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


def load_dtype(config: TrainConfig, accelerator: Accelerator) -> torch.dtype:
    """Under DeepSpeed the module runs in its config's dtype whatever it was loaded in: loading in
    that dtype spares every rank a transient fp32 copy (ZeRO-1/2, where each rank loads it whole)."""
    if is_deepspeed(accelerator):
        return module_dtype(accelerator.state.deepspeed_plugin.deepspeed_config)
    return compute_dtype(config.resolved_dtype())


def load_model(config: TrainConfig, accelerator: Accelerator) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The model with its trainable part (LoRA adapters, or everything) set up, in train mode.

    Call it after make_accelerator: under ZeRO-3 from_pretrained then builds the model inside
    deepspeed.zero.Init, so each rank only ever holds its partition (rank 0 copies the checkpoint
    in one module at a time). DeepSpeed places the model itself; otherwise it goes to the device."""
    torch.manual_seed(config.init_seed)
    model, tokenizer = load_causal_lm(config.model, dtype=load_dtype(config, accelerator))
    deepspeed = is_deepspeed(accelerator)
    if deepspeed and zero_stage(accelerator) == 3:
        require_partitioned(model)
    model = prepare_trainable(model, config.trainable)
    if not deepspeed:
        model = model.to(accelerator.device)
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    return model, tokenizer


def make_backend(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 micro_batch_size: int) -> Backend:
    """The one place that asks whether this is a DeepSpeed run."""
    if is_deepspeed(accelerator):  # ZeRO-1/2/3: DeepSpeed checkpoints weights and optimizer; noise per fp32 partition
        return DeepSpeedBackend.prepare(accelerator, model, optimizer, micro_batch_size)
    return ReplicatedBackend(model, optimizer, accelerator.process_index, accelerator.num_processes)


@dataclass
class TrainingRun:
    """Everything the train loop, checkpoints and export need."""

    config: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    data: TokenizedNotes
    engine: PrivacyEngine
    backend: Backend
    prompt: PromptFormat  # the corpus's format, with the run's key terms when it released them
    keywords: CodeKeywords | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def fetch(self, indices: list[int]) -> dict:
        return self.data.collate(indices, self.accelerator.device)


def setup(config: TrainConfig) -> TrainingRun:
    """Build (or, when output_dir holds a checkpoint of this configuration, resume) a run."""
    config.privacy.check()  # what needs no data fails first; δ < 1/N once the units are known
    if config.keywords_epsilon is not None and not config.keywords_epsilon > 0:
        raise PrivacyParameterError(f"keywords_epsilon must be > 0 (or unset: no key terms), got {config.keywords_epsilon}")
    if config.patient_token_cap() < config.max_length:
        raise PrivacyParameterError(f"max_tokens_per_patient must be >= max_length={config.max_length}, "
                                    f"got {config.max_tokens_per_patient}")
    accelerator = make_accelerator(config)
    claim_output_dir(accelerator, Path(config.output_dir), config)
    keywords = released_key_terms(config, accelerator)
    prompt = config.prompt_format() if keywords is None else config.prompt_format().with_keywords(keywords.keywords)
    data = load_training_data(config, accelerator, prompt)
    examples_of_unit = (data.examples_of_patient.capped(data.lengths(), config.patient_token_cap())
                        if config.privacy.privacy_unit == "patient" else None)
    num_units = len(examples_of_unit) if examples_of_unit is not None else len(data)
    config.privacy.validated_delta(num_units)  # bad privacy settings fail before the model is loaded
    model, tokenizer = load_model(config, accelerator)
    engine = PrivacyEngine(model, config.privacy, num_units, examples_of_unit)
    backend = make_backend(accelerator, model, make_optimizer(model, config), config.privacy.micro_batch_size)
    accelerator.register_for_checkpointing(*backend.checkpointed(), engine)
    print(
        f"dpnotes rank {accelerator.process_index}/{accelerator.num_processes} "
        f"({accelerator.distributed_type}, device {accelerator.device})", flush=True
    )
    run = TrainingRun(config, accelerator, model, tokenizer, data, engine, backend, prompt, keywords)
    start_tracking(run)
    resume(run)
    return run


def start_tracking(run: TrainingRun) -> None:
    """Trackers get the configuration and the derived privacy quantities; the console a summary."""
    config, engine, accelerator = run.config, run.engine, run.accelerator
    summary = {**engine.summary(), "examples": len(run.data), "world_size": accelerator.num_processes}
    trainable, total = count_trainable(run.model)
    summary.update(trainable_parameters=trainable, total_parameters=total, config_hash=config.fingerprint(),
                   dtype=config.resolved_dtype())
    accelerator.init_trackers("dpnotes", config=config_dict(config) | {"derived": summary})
    unit_cap = f" (≤ {config.patient_token_cap()} tokens each)" if config.privacy.privacy_unit == "patient" else ""
    accelerator.print(
        f"dpnotes DP training | rank {accelerator.process_index}/{accelerator.num_processes} | "
        f"{len(run.data)} notes, {engine.num_units} {config.privacy.privacy_unit} units{unit_cap} | q={engine.sample_rate:.4g} "
        f"σ={engine.noise_multiplier:.4g} C={config.privacy.max_grad_norm} expected batch={summary['expected_batch_size']:.1f} "
        f"steps={config.privacy.steps} target ε={config.privacy.target_epsilon} δ={engine.delta:.3g} | "
        f"trainable {trainable:,}/{total:,} | {summary['dtype']} base"
        f"{' | activation checkpointing' if config.activation_checkpointing else ''}"
    )
    if run.keywords is not None:
        released = run.keywords
        accelerator.print(
            f"key terms per code (prompt): ε={released.epsilon} δ={released.delta:.3g} σ={released.noise_std:.4g} | "
            f"{sum(map(len, released.keywords.values()))} terms for {sum(map(bool, released.keywords.values()))} of "
            f"{len(released.keywords)} codes, ≤ {released.top_k} each, from {released.vocabulary_size:,} public words"
        )
    if engine.privacy_label:
        accelerator.print(f"WARNING: privacy.seed is set: {NOT_PRIVATE} (tests and audits only)")


def resume(run: TrainingRun) -> None:
    """Load the latest checkpoint of this configuration, if there is one."""
    checkpoint = latest_checkpoint(run.output_dir, run.config.fingerprint())
    if checkpoint is not None:
        load_checkpoint(run.accelerator, checkpoint)
        run.accelerator.print(f"resumed from {checkpoint} at step {run.engine.steps_taken}, ε spent {run.engine.epsilon():.4g}")
