"""DP-LoRA multi-label classification: an encoder (MiniLM) with LoRA on "query"/"value", mean-pooled,
and a linear head that starts from the code titles, trained with `dpnotes.privacy.engine.PrivacyEngine` (DP-SGD with
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from dpnotes.corpus import Note, examples_by_patient
from dpnotes.evaluation.coders import Coder, EvalInputError, _require_notes, mean_pool
from dpnotes.evaluation.metrics import binarize
from dpnotes.models import load_encoder
from dpnotes.privacy.backends import ReplicatedBackend
from dpnotes.privacy.engine import PrivacyConfig, PrivacyEngine

DEFAULT_EPSILONS = (0.01, 0.1, 1.0, 10.0, math.inf)

EncoderFactory = Callable[[], tuple[nn.Module, Any]]  # () -> (encoder, tokenizer), e.g. a tiny BERT in tests


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


class PooledClassifier(nn.Module):
    """An encoder, mean-pooled over the note's tokens and L2-normalised (the probe's features, here
    trainable through the encoder's adapters), then a linear head: logits (B, labels)."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(mean_pool(states.float(), attention_mask), dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))


def start_from_titles(head: nn.Linear, labels: Sequence[str], titles: Mapping[str, str], scale: float,
                      bias: float | None, encode: Callable[[list[str]], torch.Tensor]) -> None:
    """A zero-shot coder of the code titles as the head's start: each titled code's weight row is
    scale · φ(title), `encode` the model's own (unit-norm) features of the title, so before any private
    step a note scores each code by its similarity to the code's title. Untitled codes start at 0. The
    titles are public (`prompting.label_titles`), so the start costs no ε. The biases start at `bias`
    (p ≈ 0.05 at -3: codes are rare), else 0."""
    with torch.no_grad():
        head.weight.zero_()
        titled = [row for row, code in enumerate(labels) if code in titles]
        if titled:
            head.weight[titled] = scale * encode([titles[labels[row]] for row in titled])
        head.bias.fill_(bias if bias is not None else 0.0)


def multilabel_summed_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) binary cross-entropy summed over labels, of `model(**inputs)` logits. Summed, not averaged
    as in `losses.multilabel_classification_losses`: a note's gradient then has norm O(1) whatever the
    number of labels, so one clipping norm C suits every label list, and C can be set below the
    gradients so that every unit is clipped (the noise is σC whatever the gradients)."""
    logits = model(**{name: value for name, value in batch.items() if name != "labels"})
    return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"], reduction="none").sum(dim=1)


class DPLoRACoder(DPCoder):
    """The DP probe's model made deeper: MiniLM with LoRA adapters on "query"/"value", mean-pooled and
    L2-normalised, and a linear head that starts as the zero-shot coder of the code titles
    (`start_from_titles`, TITLE_SCALE as the probe's). The adapters start at zero (peft's B = 0), so
    before any private step this is exactly the probe's start; DP-Adam then moves the adapters and the
    head together.

    Why this shape (docs/utility.md section 4c): the first recipe scored weighted F1 0.11 at ε = 10 on a
    CMC-2007 train partition where this one scores 0.66 (0.73 at ε = ∞). That recipe put a random head
    on BERT's CLS pooler, which MiniLM's sentence training (mean pooling) never tuned, and averaged the
    loss over the 45 labels, so with C = 1 the per-note gradients sat far below C and the noise σC
    swamped them. Here the features are those the encoder was trained for, the head starts where the
    probe starts, the loss is summed over labels and C = 0.1 clips nearly every unit.
    """

    TRAINING = DPTraining(steps=100, expected_batch_size=64, micro_batch_size=32, max_grad_norm=0.1, learning_rate=2e-3)
    TITLE_SCALE = 40.0

    def __init__(self, epsilon: float, labels: Sequence[str], model: str | EncoderFactory = "minilm", lora_rank: int = 8,
                 lora_alpha: int = 16, target_modules: Sequence[str] = ("query", "value"), max_length: int = 128,
                 titles: Mapping[str, str] | None = None, title_scale: float = TITLE_SCALE, clipping: str = "bk",
                 log: Callable[[str], None] | None = None, **training):
        super().__init__(epsilon, labels, clipping=clipping, log=log, **training)
        self.model_spec, self.lora_rank, self.lora_alpha = model, lora_rank, lora_alpha
        self.target_modules, self.max_length = list(target_modules), max_length
        self.titles, self.title_scale = dict(titles or {}), title_scale

    def _tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _build(self, num_labels: int) -> PooledClassifier:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # LoRA's A factors: public randomness
            encoder, self.tokenizer = self.model_spec() if callable(self.model_spec) else load_encoder(self.model_spec)
            config = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, target_modules=self.target_modules,
                                lora_dropout=0.0)
            model = PooledClassifier(get_peft_model(encoder, config), nn.Linear(encoder.config.hidden_size, num_labels))
        model.eval()  # the title features without dropout; B = 0, so the adapted encoder is the base one
        start_from_titles(model.head, self.labels, self.titles, self.title_scale, self.head_bias_init,
                          lambda texts: model.features(**self._tokens(texts)))
        return model

    def fit(self, train, dev=None):
        targets = self._public_targets(train)
        self.model_ = self._build(len(self.labels))
        tokens = self._tokens([n.text for n in train])

        def fetch(indices: list[int]) -> dict[str, torch.Tensor]:
            rows = torch.tensor(indices, dtype=torch.long)
            mask = tokens["attention_mask"][rows]
            width = max(1, int(mask.sum(1).max()))  # trim the padding this micro-batch does not need
            return {"input_ids": tokens["input_ids"][rows, :width], "attention_mask": mask[:, :width], "labels": targets[rows]}

        trainable = [p for p in self.model_.parameters() if p.requires_grad]
        self._train_private(self.model_, fetch, multilabel_summed_losses, train,
                            torch.optim.Adam(trainable, lr=self.learning_rate))
        return self

    @torch.no_grad()
    def predict_proba(self, notes, batch_size: int = 64):
        _require_notes(notes, "prediction")
        self.model_.eval()
        out = [torch.sigmoid(self.model_(**self._tokens([n.text for n in notes[start : start + batch_size]]))).numpy()
               for start in range(0, len(notes), batch_size)]
        return np.concatenate(out, axis=0)
