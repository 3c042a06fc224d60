"""Per-example (or per-privacy-unit) gradient clipping without per-example gradients.

One forward pass is recorded by hooks on the layers that own trainable parameters: each keeps
its input (through its rule) and its output tensor. The gradient of the summed per-example
losses with respect to those outputs gives every layer's backprops at once, with
`torch.autograd.grad`, so no parameter `.grad` is touched and no engine backward runs. From
activations and backprops the rules give per-example norms, hence clip coefficients c_i. Then:

- ghost:  a second backward of Σ c_i L_i through the recorded graph writes Σ c_i g_i;
- bk:     book-keeping: Σ c_i g_i is assembled from the stored activations and backprops,
          so there is a single backward pass.

With privacy unit = patient, a patient's examples are concatenated along the token axis before
the rules run: the norm is then the norm of the patient's summed gradient, as the guarantee needs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from torch import nn

from dpnotes.train.dp.rules import NormRule, UnsupportedParameterError, rule_for

ClippingMode = Literal["ghost", "bk"]
NORM_FLOOR = 1e-6


@dataclass
class ClippedLayer:
    name: str
    module: nn.Module
    rule: NormRule
    params: dict[str, nn.Parameter]
    saved: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def trainable(self) -> frozenset[str]:
        return frozenset(self.params)


@dataclass
class ClipResult:
    """Per-unit gradient norms before clipping and the clip coefficients (both private data)."""

    norms: torch.Tensor
    coefficients: torch.Tensor

    @property
    def clipped_count(self) -> int:
        return int((self.coefficients < 1).sum())


def clipped_layers(model: nn.Module) -> list[ClippedLayer]:
    """Bind every trainable parameter to the rule of the module that owns it, or refuse naming it.

    A module called several times (shared) is fine: its calls are concatenated on the token axis.
    One parameter owned by two modules (tied weights) is refused.
    """
    owners: dict[int, list[str]] = {}
    layers, uncovered = [], []
    for module_name, module in model.named_modules():
        trainable = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not trainable:
            continue
        for param_name, param in trainable.items():
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}".lstrip("."))
        rule = rule_for(module)
        missing = [n for n in trainable if rule is None or n not in rule.param_names]
        uncovered += [f"{module_name}.{n} ({type(module).__name__})".lstrip(".") for n in missing]
        if rule is not None and not missing:
            layers.append(ClippedLayer(module_name, module, rule, trainable))
    if uncovered:
        raise UnsupportedParameterError(
            "no per-example clipping rule for trainable parameter(s): " + ", ".join(uncovered)
            + ". Freeze them or register a rule (dpnotes.train.dp.rules.register_norm_rule)."
        )
    tied = [names for names in owners.values() if len(names) > 1]
    if tied:
        raise UnsupportedParameterError(
            "tied trainable parameters are not supported (the per-example gradient of a tied weight is the "
            f"sum over its uses): {tied}. Freeze them, untie them, or train LoRA adapters instead."
        )
    return layers


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def _join_calls(per_call: list[torch.Tensor]) -> torch.Tensor:
    """Several calls of one module count as one longer sequence (their gradients add up)."""
    return per_call[0] if len(per_call) == 1 else torch.cat(per_call, dim=1)


def group_tokens(x: torch.Tensor, group_index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(B, T, ...) -> (U, K·T, ...): each unit's examples side by side on the token axis, zero-padded.

    Zero activations/backprops contribute nothing to any rule, so padding is exact.
    """
    counts = torch.bincount(group_index, minlength=n_groups)
    order = torch.argsort(group_index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(group_index)
    slot[order] = torch.arange(len(group_index), device=group_index.device) - starts[group_index[order]]
    grouped = x.new_zeros((n_groups, int(counts.max()), *x.shape[1:]))
    grouped[group_index, slot] = x
    return grouped.flatten(1, 2)


class PerExampleClipper:
    """Clips each privacy unit's gradient to `max_grad_norm` and accumulates the sum in `.grad`."""

    def __init__(self, model: nn.Module, max_grad_norm: float, mode: ClippingMode = "bk"):
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if mode not in ("ghost", "bk"):
            raise ValueError(f"clipping mode must be 'ghost' or 'bk', got {mode!r}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.mode = mode
        self.layers = clipped_layers(model)
        if not self.layers:
            raise ValueError("the model has no trainable parameters")

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.params.values()]

    @contextlib.contextmanager
    def recording(self, batch_size: int) -> Iterator[None]:
        """Record the forward passes of a batch of `batch_size` examples run inside (hooks are
        removed on exit)."""
        handles = [
            layer.module.register_forward_hook(self._recorder(layer, batch_size), with_kwargs=True)
            for layer in self.layers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _recorder(layer: ClippedLayer, batch_size: int):
        def record(module, args, kwargs, output):
            if not (torch.is_tensor(output) and output.requires_grad):
                return None
            layer_input = _layer_input(args, kwargs)
            if output.shape[0] != batch_size:
                # Inputs shared by the batch (e.g. position ids of shape (1, T)) give an output that
                # broadcasts later; its gradient would be summed over examples. Expand it here so
                # each example keeps its own backprop.
                if output.shape[0] != 1 or layer_input.shape[0] != 1:
                    raise UnsupportedParameterError(
                        f"{layer.name}: output batch dimension {output.shape[0]} is neither the batch size "
                        f"{batch_size} nor 1; cannot attribute its gradient to examples"
                    )
                output = output.expand(batch_size, *output.shape[1:])
                layer_input = layer_input.expand(batch_size, *layer_input.shape[1:])
            layer.saved.append(layer.rule.capture(module, layer_input))
            layer.outputs.append(output)
            return output

        return record

    def _release(self) -> None:
        for layer in self.layers:
            layer.saved.clear()
            layer.outputs.clear()

    def backward(self, losses: torch.Tensor, group_index: torch.Tensor | None = None) -> ClipResult:
        """Clip and accumulate Σ_units c_u · grad_u into `.grad` for the forward recorded last.

        `losses`: (B,) per-example losses. `group_index`: (B,) privacy unit of each example in
        0..U-1 (None: each example is its own unit). Returns per-unit norms and coefficients.
        """
        return self._clip(losses, group_index, accumulate=True)

    def coefficients(self, losses: torch.Tensor, group_index: torch.Tensor | None = None) -> ClipResult:
        """Norm pass only, for the forward recorded last: per-unit norms and clip coefficients from
        `torch.autograd.grad` w.r.t. the recorded layer outputs. No parameter `.grad` is touched:
        an engine that owns the backward (DeepSpeed) then back-propagates Σ c_i L_i itself."""
        return self._clip(losses, group_index, accumulate=False)

    def _clip(self, losses: torch.Tensor, group_index: torch.Tensor | None, accumulate: bool) -> ClipResult:
        try:
            if losses.shape[0] == 0:
                empty = losses.new_zeros(0, dtype=torch.float32)
                return ClipResult(empty, empty)
            ghost = accumulate and self.mode == "ghost"
            per_layer, norms, unit_coef, example_coef = self._norms(losses, group_index, retain_graph=ghost)
            if ghost:
                (losses * example_coef.to(losses.dtype)).sum().backward()
            elif accumulate:
                self._accumulate_clipped(per_layer, example_coef)
            return ClipResult(norms.detach(), unit_coef.detach())
        finally:
            self._release()

    @staticmethod
    def _accumulate_clipped(per_layer, example_coef: torch.Tensor) -> None:
        """Book-keeping: Σ_b c_b · grad_b from the stored activations and backprops."""
        for layer, saved, grad_output in per_layer:
            grads = layer.rule.clipped_grads(layer.module, saved, grad_output, example_coef, layer.trainable)
            for name, grad in grads.items():
                param = layer.params[name]
                grad = grad.to(param.dtype)
                param.grad = grad if param.grad is None else param.grad.add_(grad)

    def _norms(self, losses: torch.Tensor, group_index: torch.Tensor | None, retain_graph: bool):
        batch = losses.shape[0]
        n_units = batch if group_index is None else int(group_index.max()) + 1
        recorded = [layer for layer in self.layers if layer.outputs]
        outputs = [out for layer in recorded for out in layer.outputs]
        backprops = torch.autograd.grad(
            losses.sum(), outputs, retain_graph=retain_graph, allow_unused=True, materialize_grads=True
        )
        per_layer, start = [], 0
        for layer in recorded:
            grads = backprops[start : start + len(layer.outputs)]
            start += len(layer.outputs)
            saved = _join_calls(layer.saved)
            grad_output = _join_calls([g.reshape(batch, -1, g.shape[-1]) for g in grads])
            per_layer.append((layer, saved, grad_output))

        sq_norms = torch.zeros(n_units, device=losses.device, dtype=torch.float32)
        for layer, saved, grad_output in per_layer:
            if group_index is not None:
                saved = group_tokens(saved, group_index, n_units)
                grad_output = group_tokens(grad_output, group_index, n_units)
            sq_norms += layer.rule.per_example_sq_norms(layer.module, saved, grad_output, layer.trainable)
        norms = sq_norms.sqrt()
        unit_coef = (self.max_grad_norm / (norms + NORM_FLOOR)).clamp(max=1.0)
        example_coef = unit_coef if group_index is None else unit_coef[group_index]
        return per_layer, norms, unit_coef, example_coef
