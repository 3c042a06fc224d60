"""Slow, obviously-correct references for the DP engine: per-example gradients by a batch-size-1 loop."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dpnotes.privacy.clipping import PerExampleClipper

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def per_example_gradients(model: nn.Module, loss_fn: LossFn, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, P) flattened gradient of each example's loss w.r.t. all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    size = next(iter(batch.values())).shape[0]
    rows = []
    for b in range(size):
        example = {k: v[b : b + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(loss_fn(model, example).sum(), params, allow_unused=True, materialize_grads=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    total = sum(p.numel() for p in params)
    return torch.stack(rows) if rows else torch.zeros(0, total)


def clipped_sum_reference(
    per_example: torch.Tensor, max_grad_norm: float, group_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit norms, Σ_units clip(unit gradient)) with unit gradient = sum of its examples' gradients."""
    units = per_example
    if group_index is not None and len(group_index):
        units = torch.zeros(int(group_index.max()) + 1, per_example.shape[1], dtype=per_example.dtype)
        units.index_add_(0, group_index, per_example)
    norms = units.norm(dim=1)
    coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return norms, (coef[:, None] * units).sum(dim=0)


def flat_clipped_sum(clipper) -> torch.Tensor:
    """A PerExampleClipper's clipped sums, flattened in the model's parameter order (the oracle's)."""
    by_param = {id(p): s for p, s in zip(clipper.parameters, clipper.summed())}
    return torch.cat([by_param[id(p)].reshape(-1) for p in clipper.model.parameters() if p.requires_grad])


def assert_clipper_matches_oracle(model: nn.Module, loss_fn: LossFn, batch: dict[str, torch.Tensor], mode: str,
                                  max_grad_norm: float | None = None, rtol: float = 1e-4) -> None:
    """The clipper's per-example norms and clipped sum equal the batch-size-1 oracle's. The default
    clipping norm is the median per-example norm, so some examples are clipped and some are not."""
    per_example = per_example_gradients(model, loss_fn, batch)
    if max_grad_norm is None:
        max_grad_norm = float(per_example.norm(dim=1).median())
    ref_norms, ref_sum = clipped_sum_reference(per_example, max_grad_norm)
    clipper = PerExampleClipper(model, max_grad_norm, mode=mode)
    model.zero_grad(set_to_none=True)
    with clipper.recording(len(next(iter(batch.values())))):
        losses = loss_fn(model, batch)
    result = clipper.backward(losses)
    torch.testing.assert_close(result.norms, ref_norms, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(flat_clipped_sum(clipper), ref_sum, rtol=rtol, atol=1e-6)
