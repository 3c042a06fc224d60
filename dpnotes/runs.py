"""Where a run keeps what it makes: the one spelling of the run-directory layout.

A training run's output_dir holds its configuration and checkpoints, the trained weights and the
privacy report; the pipeline adds the merged model, the synthetic notes and their evaluation. A
study keeps one such folder per ε (`eps_8`, `eps_inf`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dpnotes.caches import corpus_cache
from dpnotes.corpus import Note, load_configured_splits, read_notes


def epsilon_tag(epsilon: float) -> str:
    return "eps_inf" if math.isinf(epsilon) else f"eps_{epsilon:g}"


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:  # the training configuration and its hash
        return self.root / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:  # LoRA runs
        return self.root / "adapter"

    @property
    def model(self) -> Path:  # full fine-tuning runs
        return self.root / "model"

    @property
    def full_model(self) -> Path:  # LoRA runs with save_full_model: base + adapter, unmerged
        return self.root / "full_model"

    @property
    def privacy_report(self) -> Path:
        return self.root / PRIVACY_REPORT

    @property
    def keywords(self) -> Path:  # the run's DP key terms per code, released once
        return self.root / "keywords.json"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def evaluation(self) -> Path:
        return self.root / "eval.json"

    def training_notes(self) -> list[Note]:
        """The notes this run trained on: its corpus, as recorded in config.json, and its train split."""
        recorded = json.loads(self.config.read_text())
        return load_configured_splits(recorded["corpus"], default_patients=recorded["corpus_patients"],
                                      canaries=recorded["canaries"], seed=recorded["split_seed"], cache=corpus_cache())["train"]


PRIVACY_REPORT = "privacy_report.json"  # beside every trained or merged model
NOTES = "notes.jsonl"  # in a synthetic/ folder: one note per line, written as generated
MANIFEST = "manifest.json"  # in a synthetic/ folder: provenance, ε, sampling
AUDIT_DIR = "audit"  # in a study's output_dir: the run folder of its memorisation audit (pipeline `audit:`)


def load_synthetic(folder: Path) -> list[Note]:
    """The notes of a synthetic/ folder, validated by the corpus layer's reader."""
    return read_notes(folder / NOTES)
