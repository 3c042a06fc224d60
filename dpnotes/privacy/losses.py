"""Per-example losses: one scalar per sequence, so each example's gradient can be clipped."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpnotes.prompting import IGNORE_INDEX


LOSS_BLOCK_TOKENS = 1024


def causal_lm_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each sequence over its unmasked labels (-100 masked).

    A sequence with no unmasked label has loss 0 and so a zero gradient.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"][:, 1:]
    token_losses = token_cross_entropy(logits[:, :-1], labels)
    counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_losses.sum(dim=1) / counts


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) cross-entropy of each token, computed in fp32 whatever the logits' dtype. Low-precision
    logits are upcast LOSS_BLOCK_TOKENS tokens at a time, each block's fp32 copy recomputed in
    backward: the fp32 copy of all (B, T, V) logits and its gradient would otherwise live at once
    (16.8 GB at T = 4,096 with a 128k vocabulary, 4 times the bf16 logits)."""
    if logits.dtype == torch.float32 or logits.shape[1] <= LOSS_BLOCK_TOKENS:
        return _fp32_cross_entropy(logits, labels)
    # split, not slicing: its backward concatenates the blocks' gradients once
    blocks = zip(logits.split(LOSS_BLOCK_TOKENS, dim=1), labels.split(LOSS_BLOCK_TOKENS, dim=1))
    return torch.cat([checkpoint(_fp32_cross_entropy, block, block_labels, use_reentrant=False)
                      for block, block_labels in blocks], dim=1)


def _fp32_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)


def multilabel_classification_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) mean binary cross-entropy over labels of each example (`labels`: (B, L) multi-hot)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].float(), reduction="none").mean(dim=1)
