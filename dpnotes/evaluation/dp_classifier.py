"""DP-LoRA multi-label classification: an encoder (MiniLM) with LoRA on "query"/"value" and a
trainable classifier head, trained with `dpnotes.privacy.engine.PrivacyEngine` (DP-SGD with
per-example clipping, Poisson sampling, calibrated noise) at a target ε.

ε = ∞ is the non-private reference: σ = 0 but clipping (and Poisson sampling) are kept, so the
ε-sweep isolates the effect of noise. The privacy unit is the patient by default (all notes of a
patient are one unit), the project's convention.

What the trained coder releases besides its DP weights is public by construction: the label space
(head width and label list) is a public list (dpnotes.corpus.code_lists), never the codes found in
the training notes, which would reveal rare codes; the model seed only initialises weights, while
sampling and noise use secret keys (a fixed `privacy_seed` is for tests and audits and marks the
result "not private: fixed seed").

`DPCoder` holds what every DP coder shares (public labels, privacy units, the DP training loop
and its `privacy_` report); `DPLoRACoder` here and the linear coders of `dp_linear` build on it.
They implement the `Coder` interface, so they are scored by `evaluate_coder` exactly like the
non-private coders; `dp_epsilon_sweep` runs one of them (`DP_CODERS`) at several ε and reports
weighted-F1 per ε.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from dpnotes.corpus import Note, examples_by_patient
from dpnotes.evaluation.coders import Coder, EvalInputError, _require_notes
from dpnotes.evaluation.metrics import binarize
from dpnotes.models import load_sequence_classifier
from dpnotes.privacy.backends import ReplicatedBackend
from dpnotes.privacy.engine import PrivacyConfig, PrivacyEngine
from dpnotes.privacy.losses import multilabel_classification_losses

DEFAULT_EPSILONS = (0.01, 0.1, 1.0, 10.0, math.inf)

ModelFactory = Callable[[int], tuple[nn.Module, Any]]  # num_labels -> (sequence classifier, tokenizer)


def _load_classifier(name: str) -> ModelFactory:
    def build(num_labels: int):
        return load_sequence_classifier(name, num_labels)

    return build


def _classifier_output(model: nn.Module) -> nn.Linear:
    head = model.classifier
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]  # e.g. RoBERTa's dense → out_proj
    if not linears:
        raise ValueError("cannot find the classifier's output layer")
    return linears[-1]


@dataclass(frozen=True)
class DPTraining:
    """The DP training settings every DP coder takes; each coder class has its own defaults."""

    steps: int
    expected_batch_size: int | None  # None: the coder's choice from the number of units
    micro_batch_size: int
    max_grad_norm: float
    learning_rate: float | None  # None: the coder derives it (DPLinearCoder: from the noise)
    delta: float | None = None  # None: 1 / (10 · units)
    privacy_unit: str = "patient"
    head_bias_init: float | None = -3.0
    seed: int = 0  # model initialisation and dropout: public randomness
    privacy_seed: int | None = None  # sampling and noise; None: secret keys from OS entropy


class DPCoder(Coder):
    """What every DP coder shares: the public label space, the privacy units and the DP training
    loop through `PrivacyEngine`, which records the `privacy_` report. Subclasses build a model
    whose trainable parameters all have norm rules, and a `fetch` that collates examples.

    `training`: fields of `DPTraining` that replace the subclass's `TRAINING` defaults."""

    TRAINING: ClassVar[DPTraining]

    def __init__(self, epsilon: float, labels: Sequence[str], *, clipping: str, log: Callable[[str], None] | None,
                 **training):
        if not labels:
            raise EvalInputError("the DP coder needs a public label list (dpnotes.corpus.code_lists)")
        unknown = sorted(set(training) - {f.name for f in fields(DPTraining)})
        if unknown:
            raise EvalInputError(f"{type(self).__name__} has no setting {', '.join(unknown)}")
        settings = replace(self.TRAINING, **training)
        self.epsilon, self.public_labels, self.clipping = epsilon, sorted(set(labels)), clipping
        for setting in fields(settings):
            setattr(self, setting.name, getattr(settings, setting.name))
        self.log = log or (lambda message: None)

    def _public_targets(self, train: Sequence[Note]) -> torch.Tensor:
        """(notes, labels) multi-hot over the public label list; codes outside it are ignored."""
        _require_notes(train, "train")
        self.labels = self.public_labels
        y_train = binarize([n.codes for n in train], self.labels)
        if not y_train.any():
            raise EvalInputError("no training note carries a code of the public label list")
        return torch.tensor(y_train, dtype=torch.float32)

    def _units(self, train: Sequence[Note]) -> tuple[list[list[int]] | None, int]:
        """(example indices of each unit or None, number of units) for the privacy unit."""
        if self.privacy_unit == "patient":
            groups = examples_by_patient([note.patient_id for note in train])
            return groups, len(groups)
        if self.privacy_unit == "sequence":
            return None, len(train)
        raise ValueError(f"privacy_unit must be 'patient' or 'sequence', got {self.privacy_unit!r}")

    def _expected_batch(self, num_units: int) -> int:
        """The configured expected batch, at most every unit (None: every unit, q = 1)."""
        return num_units if self.expected_batch_size is None else min(self.expected_batch_size, num_units)

    def _train_private(self, model: nn.Module, fetch: Callable[[list[int]], dict], loss_fn, train: Sequence[Note],
                       optimizer: torch.optim.Optimizer) -> None:
        """DP training of `model`'s trainable parameters at the target ε; sets `privacy_`."""
        examples_of_unit, num_units = self._units(train)
        config = PrivacyConfig(
            target_epsilon=self.epsilon, delta=self.delta, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self._expected_batch(num_units), steps=self.steps,
            micro_batch_size=self.micro_batch_size, clipping=self.clipping, privacy_unit=self.privacy_unit,
            seed=self.privacy_seed,
        )
        model.train()
        engine = PrivacyEngine(model, config, num_units, examples_of_unit)
        backend = ReplicatedBackend(model, optimizer)
        started = time.perf_counter()
        losses = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # dropout masks: public randomness, like initialisation
            while engine.budget_allows_step():
                stats = engine.step(backend, fetch, loss_fn)
                if stats.examples:
                    losses.append(stats.loss_sum / stats.examples)
                if engine.steps_taken % 10 == 0:
                    self.log(f"ε={self.epsilon} step {engine.steps_taken}/{self.steps} [not private: loss {np.mean(losses[-10:]) if losses else float('nan'):.4f}]")
        model.eval()
        summary = engine.summary()
        self.privacy_ = {
            "target_epsilon": self.epsilon, "epsilon_spent": engine.epsilon(), "delta": engine.delta,
            "noise_multiplier": engine.noise_multiplier, "sample_rate": engine.sample_rate,
            "steps_taken": engine.steps_taken, "steps_planned": self.steps, "privacy_units": num_units,
            "privacy_unit": self.privacy_unit, "max_grad_norm": self.max_grad_norm,
            "expected_batch_size": summary["expected_batch_size"], **engine.privacy_status(),
            "labels": len(self.labels),
            # Measured on the private batches, not covered by DP: for trusted logs only.
            "train_seconds_nonprivate": time.perf_counter() - started,
            "final_train_loss_nonprivate": float(np.mean(losses[-10:])) if losses else None,
        }


class DPLoRACoder(DPCoder):
    """A MiniLM sequence classifier fine-tuned with DP-LoRA (adapters on query/value, the head in full)."""

    TRAINING = DPTraining(steps=100, expected_batch_size=64, micro_batch_size=32, max_grad_norm=1.0, learning_rate=2e-3)

    def __init__(self, epsilon: float, labels: Sequence[str], model: str | ModelFactory = "minilm", lora_rank: int = 8,
                 lora_alpha: int = 16, target_modules: Sequence[str] = ("query", "value"), max_length: int = 128,
                 clipping: str = "bk", log: Callable[[str], None] | None = None, **training):
        super().__init__(epsilon, labels, clipping=clipping, log=log, **training)
        self.model_spec, self.lora_rank, self.lora_alpha = model, lora_rank, lora_alpha
        self.target_modules, self.max_length = list(target_modules), max_length

    def _build(self, num_labels: int):
        factory = self.model_spec if callable(self.model_spec) else _load_classifier(self.model_spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            base, tokenizer = factory(num_labels)
            if self.head_bias_init is not None:
                # A data-independent prior (codes are rare): without it DP-Adam spends most of a short
                # run walking the output biases from 0 (p = 0.5) down, at ~lr per step.
                with torch.no_grad():
                    _classifier_output(base).bias.fill_(self.head_bias_init)
            config = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, target_modules=self.target_modules,
                                lora_dropout=0.0, modules_to_save=["classifier"])
            model = get_peft_model(base, config)
        return model, tokenizer

    def fit(self, train, dev=None):
        targets = self._public_targets(train)
        self.model_, self.tokenizer = self._build(len(self.labels))
        encoded = self.tokenizer([n.text for n in train], padding="longest", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]

        def fetch(indices: list[int]) -> dict[str, torch.Tensor]:
            rows = torch.tensor(indices, dtype=torch.long)
            mask = attention_mask[rows]
            width = max(1, int(mask.sum(1).max()))  # trim the padding this micro-batch does not need
            return {"input_ids": input_ids[rows, :width], "attention_mask": mask[:, :width], "labels": targets[rows]}

        trainable = [p for p in self.model_.parameters() if p.requires_grad]
        self._train_private(self.model_, fetch, multilabel_classification_losses, train,
                            torch.optim.Adam(trainable, lr=self.learning_rate))
        return self

    @torch.no_grad()
    def predict_proba(self, notes, batch_size: int = 64):
        _require_notes(notes, "prediction")
        self.model_.eval()
        out = []
        for start in range(0, len(notes), batch_size):
            batch = self.tokenizer([n.text for n in notes[start : start + batch_size]], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            logits = self.model_(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out.append(torch.sigmoid(logits.float()).numpy())
        return np.concatenate(out, axis=0)
