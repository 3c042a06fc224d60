"""Per-example losses: one scalar per sequence, so each example's gradient can be clipped."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpnotes.prompting import IGNORE_INDEX


def causal_lm_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each sequence over its unmasked labels (-100 masked).

    A sequence with no unmasked label has loss 0 and so a zero gradient.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"][:, 1:]
    token_losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_losses.sum(dim=1) / counts


def multilabel_classification_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) mean binary cross-entropy over labels of each example (`labels`: (B, L) multi-hot)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].float(), reduction="none").mean(dim=1)
