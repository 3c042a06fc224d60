"""Automatic clinical coders trained on real and/or synthetic notes, scored on real test notes.

One interface: ``coder.fit(train_notes, dev_notes) -> coder``; ``coder.predict_proba(notes)``
returns (notes, len(coder.labels)) probabilities; ``coder.labels`` is the label space, the sorted
codes of train ∪ dev. Codes seen in dev but never in training have no positive example: their
probability is the training prevalence (0). Gold codes of the evaluated notes that the coder
never saw are kept by `evaluate_coder` as always-missed columns (they cost recall; dropping
them would flatter a coder trained on a set that lacks them, e.g. a synthetic one).

* `TfidfCoder`: TF-IDF uni+bigrams, one-vs-rest logistic regression; C picked on dev micro-F1.
* `EncoderCoder`: any HF encoder (MiniLM on CPU) fine-tuned with BCE, with a mean-pooling head
  or a label-attention head (PLM-ICD style: per-label attention over token states) for many codes;
  the epoch with the best dev micro-F1 is kept.
"""
from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dpnotes.corpus.schema import Note
from dpnotes.evaluation.metrics import binarize, evaluate_scores, f1_scores, tune_threshold
from dpnotes.errors import UserError
from dpnotes.models import compute_device, load_encoder


class EvalInputError(UserError):
    """Input the evaluation cannot use (empty sets, no labels in common, ...)."""


def label_space(*note_sets: Sequence[Note]) -> list[str]:
    return sorted({code for notes in note_sets for note in notes for code in note.codes})


def _require_notes(notes: Sequence[Note], name: str) -> None:
    if not notes:
        raise EvalInputError(f"{name} set is empty")


class Coder:
    """Base: label bookkeeping shared by every coder."""

    labels: list[str]

    def fit(self, train: Sequence[Note], dev: Sequence[Note] | None = None) -> "Coder":
        raise NotImplementedError

    def predict_proba(self, notes: Sequence[Note]) -> np.ndarray:
        raise NotImplementedError

    def _set_labels(self, train: Sequence[Note], dev: Sequence[Note] | None) -> tuple[np.ndarray, np.ndarray | None]:
        _require_notes(train, "train")
        self.labels = label_space(train, dev or [])
        if not label_space(train):
            raise EvalInputError("train notes carry no codes")
        y_train = binarize([n.codes for n in train], self.labels)
        y_dev = binarize([n.codes for n in dev], self.labels) if dev else None
        return y_train, y_dev


def _dev_micro_f1(y_dev: np.ndarray, scores: np.ndarray) -> float:
    if y_dev.sum() == 0:
        return float("nan")
    threshold = tune_threshold(y_dev, scores)
    return f1_scores(y_dev, (scores >= threshold).astype(int))["micro_f1"]


class TfidfCoder(Coder):
    """TF-IDF + one-vs-rest logistic regression (liblinear, class-balanced off)."""

    def __init__(self, c_grid: Sequence[float] = (1.0, 10.0, 100.0), max_features: int = 50_000,
                 ngram_range: tuple[int, int] = (1, 2), min_df: int = 2):
        self.c_grid = tuple(c_grid)
        self.max_features, self.ngram_range, self.min_df = max_features, ngram_range, min_df

    def _fit_one(self, x, y_train: np.ndarray, c: float):
        from sklearn.linear_model import LogisticRegression

        models = []
        for j in range(y_train.shape[1]):
            column = y_train[:, j]
            if 0 < column.sum() < len(column):
                models.append(LogisticRegression(C=c, solver="liblinear", max_iter=1000).fit(x, column))
            else:
                models.append(float(column.mean()) if len(column) else 0.0)  # constant: prevalence
        return models

    @staticmethod
    def _proba(models, x) -> np.ndarray:
        columns = [m.predict_proba(x)[:, 1] if not isinstance(m, float) else np.full(x.shape[0], m) for m in models]
        return np.stack(columns, axis=1)

    def fit(self, train, dev=None):
        from sklearn.feature_extraction.text import TfidfVectorizer

        y_train, y_dev = self._set_labels(train, dev)
        min_df = self.min_df if len(train) >= 10 else 1
        self.vectorizer = TfidfVectorizer(ngram_range=self.ngram_range, max_features=self.max_features,
                                          min_df=min_df, sublinear_tf=True, strip_accents="unicode")
        x_train = self.vectorizer.fit_transform([n.text for n in train])
        grid = self.c_grid if dev and y_dev.sum() and len(self.c_grid) > 1 else self.c_grid[:1]
        best = None
        for c in grid:
            models = self._fit_one(x_train, y_train, c)
            score = _dev_micro_f1(y_dev, self._proba(models, self.vectorizer.transform([n.text for n in dev]))) if len(grid) > 1 else 0.0
            if best is None or score > best[0]:
                best = (score, c, models)
        _, self.c_, self.models_ = best
        return self

    def predict_proba(self, notes):
        _require_notes(notes, "prediction")
        return self._proba(self.models_, self.vectorizer.transform([n.text for n in notes]))


class LabelAttentionHead(nn.Module):
    """PLM-ICD label-wise attention: A = softmax_T(U tanh(W H)); V = A H; logit_l = <V_l, w_l> + b_l."""

    def __init__(self, hidden: int, num_labels: int, attention_dim: int = 256):
        super().__init__()
        self.project = nn.Linear(hidden, attention_dim, bias=False)
        self.label_queries = nn.Linear(attention_dim, num_labels, bias=False)
        self.output = nn.Linear(hidden, num_labels)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.label_queries(torch.tanh(self.project(states)))  # (B, T, L)
        scores = scores.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(scores.dtype).min)
        attention = scores.softmax(dim=1)  # over tokens
        pooled = torch.einsum("btl,bth->blh", attention, states)  # (B, L, H)
        return (pooled * self.output.weight).sum(-1) + self.output.bias


class MeanPoolHead(nn.Module):
    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden, num_labels)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(mean_pool(states, mask)))


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class _EncoderClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(states, attention_mask)


class EncoderCoder(Coder):
    """Fine-tune a HF encoder with BCE. `encoder`: a model alias/path for `load_encoder`, or a
    zero-argument factory returning (encoder, tokenizer) (tests pass a tiny random BERT)."""

    def __init__(
        self,
        encoder: str | Callable[[], tuple[nn.Module, object]] = "minilm",
        head: str = "mean",
        max_length: int = 256,
        epochs: int = 3,
        batch_size: int = 16,
        lr: float = 5e-5,
        head_lr: float = 1e-3,
        attention_dim: int = 256,
        seed: int = 0,
        device: str | None = None,  # None: the GPU when there is one, else the CPU
        log: Callable[[str], None] | None = None,
    ):
        if head not in ("mean", "label_attention"):
            raise ValueError(f"head must be 'mean' or 'label_attention', got {head!r}")
        self.encoder_spec, self.head_kind = encoder, head
        self.max_length, self.epochs, self.batch_size = max_length, epochs, batch_size
        self.lr, self.head_lr, self.attention_dim = lr, head_lr, attention_dim
        self.seed, self.log = seed, log or (lambda message: None)
        self.device = torch.device(device) if device is not None else compute_device()

    def _load(self):
        if callable(self.encoder_spec):
            return self.encoder_spec()
        return load_encoder(self.encoder_spec)

    def _encode(self, notes: Sequence[Note]) -> dict[str, torch.Tensor]:
        return self.tokenizer([n.text for n in notes], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")

    def fit(self, train, dev=None):
        y_train, y_dev = self._set_labels(train, dev)
        torch.manual_seed(self.seed)
        encoder, self.tokenizer = self._load()
        hidden = encoder.config.hidden_size
        head = (LabelAttentionHead(hidden, len(self.labels), self.attention_dim) if self.head_kind == "label_attention"
                else MeanPoolHead(hidden, len(self.labels)))
        self.model_ = _EncoderClassifier(encoder, head).to(self.device)
        optimizer = torch.optim.AdamW([
            {"params": self.model_.encoder.parameters(), "lr": self.lr},
            {"params": self.model_.head.parameters(), "lr": self.head_lr},
        ], weight_decay=0.01)
        steps_total = self.epochs * math.ceil(len(train) / self.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / max(1, steps_total)))
        loss_fn = nn.BCEWithLogitsLoss()
        targets = torch.tensor(y_train, dtype=torch.float32)
        order = list(range(len(train)))
        rng = random.Random(self.seed)
        best_score, best_state = -math.inf, None
        self.history_ = []
        for epoch in range(self.epochs):
            self.model_.train()
            rng.shuffle(order)
            total = 0.0
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = self._encode([train[i] for i in rows])
                logits = self.model_(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
                loss = loss_fn(logits, targets[rows].to(self.device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model_.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                total += loss.item() * len(rows)
            record = {"epoch": epoch + 1, "train_loss": total / len(train)}
            if dev and y_dev.sum():
                record["dev_micro_f1"] = _dev_micro_f1(y_dev, self.predict_proba(dev))
                if record["dev_micro_f1"] > best_score:
                    best_score, best_state = record["dev_micro_f1"], copy.deepcopy(self.model_.state_dict())
            self.history_.append(record)
            self.log(f"epoch {record}")
        if best_state is not None:
            self.model_.load_state_dict(best_state)
        return self

    @torch.no_grad()
    def predict_proba(self, notes, batch_size: int | None = None):
        _require_notes(notes, "prediction")
        self.model_.eval()
        size = batch_size or 2 * self.batch_size
        out = []
        for start in range(0, len(notes), size):
            batch = self._encode(notes[start : start + size])
            logits = self.model_(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            out.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(out, axis=0)


def align_scores(scores: np.ndarray, from_labels: Sequence[str], to_labels: Sequence[str]) -> np.ndarray:
    """Columns of `scores` (over `from_labels`) re-ordered onto `to_labels`; missing labels score 0."""
    index = {label: j for j, label in enumerate(from_labels)}
    out = np.zeros((scores.shape[0], len(to_labels)))
    for k, label in enumerate(to_labels):
        if label in index:
            out[:, k] = scores[:, index[label]]
    return out


def evaluate_coder(
    coder: Coder,
    train: Sequence[Note],
    dev: Sequence[Note],
    test: Sequence[Note],
    labels: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    fit: bool = True,
) -> dict:
    """Fit on `train` (dev for model selection), tune the threshold on dev, score on real `test`.

    Evaluation labels: `labels` (default: the coder's label space) plus any test gold code outside
    them, appended as columns the coder always scores 0 (counted as misses). Dev and test must
    share at least one label with the coder.
    """
    for name, notes in (("train", train), ("dev", dev), ("test", test)):
        _require_notes(notes, name)
    if not set(label_space(train)) & set(label_space(test)):  # checked before an expensive fit
        raise EvalInputError("no label in common between the training notes and the test notes")
    if fit:
        coder.fit(train, dev)
    eval_labels = list(labels) if labels is not None else list(coder.labels)
    eval_labels += sorted(set(label_space(test)) - set(eval_labels))
    y_dev = binarize([n.codes for n in dev], eval_labels)
    if y_dev.sum() == 0:
        raise EvalInputError("dev notes carry none of the evaluation labels: cannot tune the threshold")
    scores_dev = align_scores(coder.predict_proba(dev), coder.labels, eval_labels)
    threshold = tune_threshold(y_dev, scores_dev)
    y_test = binarize([n.codes for n in test], eval_labels)
    scores_test = align_scores(coder.predict_proba(test), coder.labels, eval_labels)
    result = evaluate_scores(y_test, scores_test, threshold, labels=eval_labels, n_bootstrap=n_bootstrap, seed=seed)
    result.update({"coder": type(coder).__name__, "n_train": len(train), "n_dev": len(dev), "n_test": len(test),
                   "labels": eval_labels, "test_codes_unseen_by_coder": sorted(set(label_space(test)) - set(coder.labels))})
    return result


def compare_train_sets(
    make_coder: Callable[[], Coder],
    real_train: Sequence[Note],
    synthetic: Sequence[Note],
    dev: Sequence[Note],
    test: Sequence[Note],
    n_bootstrap: int = 1000,
    seed: int = 0,
    train_sets: Sequence[str] = ("real", "synthetic", "real+synthetic"),
) -> dict[str, dict]:
    """`evaluate_coder` with train = real, synthetic and real+synthetic, one fixed label space
    (codes of real train ∪ dev) so the three rows are comparable."""
    _require_notes(real_train, "real train")
    sets = {"real": list(real_train), "synthetic": list(synthetic), "real+synthetic": list(real_train) + list(synthetic)}
    unknown = set(train_sets) - set(sets)
    if unknown:
        raise ValueError(f"unknown train set(s) {sorted(unknown)}; choose from {sorted(sets)}")
    labels = label_space(real_train, dev)
    return {name: evaluate_coder(make_coder(), sets[name], dev, test, labels=labels, n_bootstrap=n_bootstrap, seed=seed)
            for name in train_sets}
