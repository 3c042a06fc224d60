"""The training run's settings (dpnotes.config: a YAML file, then `key.sub=value` overrides)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dpnotes.config import as_dict, load
from dpnotes.models import ComputeDtype, resolve_dtype
from dpnotes.prompting import PromptFormat, prompt_format_for, title_source_digest
from dpnotes.privacy.engine import PrivacyConfig
from dpnotes.training.model_setup import TrainableConfig


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    corpus: str = "default"  # see dpnotes.corpus.load_corpus; "default" is the embedded stand-in corpus
    corpus_patients: int = 400  # size of the default corpus only
    canaries: int = 0  # fake identifiers planted in the default corpus (leakage tests)
    output_dir: str = "runs/dp_lora"
    max_length: int = 256
    # privacy_unit=patient: a patient's notes count, in corpus order, while their tokens total at most
    # this (None: 4 × max_length); later notes are not trained on. It bounds a unit's micro-batch (MIMIC
    # patients have dozens of notes) and is part of the unit's definition: the cut reads that patient only.
    max_tokens_per_patient: int | None = None
    split_seed: int = 0
    init_seed: int = 0  # LoRA initialisation and dropout: public randomness, unlike sampling and noise
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    # The base model's dtype. auto: bfloat16 for LoRA with bk clipping where matmuls are native bf16
    # (dpnotes.models), else float32. Trained weights stay fp32 under auto, and norms, sums and noise
    # are fp32 whatever this says.
    dtype: ComputeDtype = "auto"
    # transformers' non-reentrant activation checkpointing: recomputes each layer's forward in backward
    # instead of keeping its activations (bench/activation_checkpointing.py); norms stay exact
    activation_checkpointing: bool = False
    save_every: int = 25
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: plain SGD, the update reads the DP gradient directly (tests)
    save_full_model: bool = False  # also write every weight (gathered under ZeRO-3) to output_dir/full_model
    report_to: str = "wandb"  # or "none"; W&B runs offline unless WANDB_MODE says otherwise
    prompt: PromptFormat | None = None  # None: the corpus kind's format (dpnotes.prompting.CORPUS_PROMPTS)
    # Key terms per code in every prompt: a DP release of the train split at this ε (dpnotes/privacy/keywords.py),
    # added to the run's guarantee (total_epsilon in its privacy report). None: titles only.
    keywords_epsilon: float | None = None
    keywords_per_code: int = 6
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def patient_token_cap(self) -> int:
        return self.max_tokens_per_patient if self.max_tokens_per_patient is not None else 4 * self.max_length

    def resolved_dtype(self) -> Literal["float32", "bfloat16"]:
        """`dtype` with auto resolved on this machine. auto is bf16 only where training stays exact:
        - LoRA: full fine-tuning's weights are the optimizer's only copy, and bf16 rounds small updates away
          (LoRA adapters are fp32 over a bf16 base; model_setup checks it);
        - bk clipping: ghost's second backward over bf16 layers rounds each unit's clipped gradient
          (docs/privacy.md);
        - outside DeepSpeed: there bf16 is the DeepSpeed config's, which casts the whole module,
          adapters included.
        `accelerate launch` with a DeepSpeed config says so in the environment, before any setup."""
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if self.dtype == "auto" and (self.trainable.full_finetune or self.privacy.clipping != "bk" or deepspeed):
            return "float32"
        return resolve_dtype(self.dtype)

    def prompt_format(self) -> PromptFormat:
        return self.prompt or prompt_format_for(self.corpus)

    def fingerprint(self) -> str:
        """Hash of everything that determines the result (not where it is written)."""
        content = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("output_dir", "report_to", "save_every", "save_full_model")}
        prompt = self.prompt_format()
        content["prompt"] = prompt.to_dict()  # the derived format too: it shapes every example
        content["titles"] = title_source_digest(prompt.code_system)  # and the titles it writes
        content["dtype"] = self.resolved_dtype()  # auto is bf16 on one machine and fp32 on another
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    return load(TrainConfig, path, overrides)


def config_dict(config: TrainConfig) -> dict:
    return as_dict(config)
