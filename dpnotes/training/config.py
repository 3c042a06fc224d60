"""Run configuration: dataclasses filled from a YAML file, then `key.sub=value` overrides."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpnotes.prompting import PromptFormat, prompt_format_for
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
    split_seed: int = 0
    init_seed: int = 0  # LoRA initialisation and dropout: public randomness, unlike sampling and noise
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    dtype: str = "float32"  # or bfloat16; norms and noise are computed in fp32 either way
    save_every: int = 25
    optimizer: str = "adamw"  # or "sgd" (plain SGD: the update reads the DP gradient directly; tests)
    save_full_model: bool = False  # also write every weight (gathered under ZeRO-3) to output_dir/full_model
    report_to: str = "wandb"  # or "none"; W&B runs offline unless WANDB_MODE says otherwise
    prompt: PromptFormat | None = None  # None: the corpus kind's format (dpnotes.prompting.CORPUS_PROMPTS)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def prompt_format(self) -> PromptFormat:
        return self.prompt or prompt_format_for(self.corpus)

    def fingerprint(self) -> str:
        """Hash of everything that determines the result (not where it is written)."""
        content = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("output_dir", "report_to", "save_every", "save_full_model")}
        content["prompt"] = self.prompt_format().to_dict()  # the derived format too: it shapes every example
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping")
        return _build(annotation, value, where)
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        non_null = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, non_null[0], where)
    if annotation is float:
        if isinstance(value, str) and value.lower() in ("inf", "infinity", ".inf"):
            return float("inf")
        return float(value)
    if annotation is int and not isinstance(value, bool):
        return int(value)
    return value


def _build(cls: type, values: dict, where: str = "config"):
    hints = _field_types(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(hints)}")
    return cls(**{key: _coerce(value, hints[key], f"{where}.{key}") for key, value in values.items()})


def parse_overrides(overrides: list[str]) -> dict:
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        target = nested
        *parents, leaf = dotted.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(raw)
    return nested


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    values = yaml.safe_load(Path(path).read_text()) if path else {}
    return _build(TrainConfig, _merge(values or {}, parse_overrides(list(overrides))))


def config_dict(config: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))

