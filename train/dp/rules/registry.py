"""Registry of norm rules keyed by module type, with structural matchers for families that
libraries re-declare per model (every HF model family ships its own RMSNorm class)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class UnsupportedParameterError(TypeError):
    """A trainable parameter has no per-example clipping rule: training it would leak privacy."""


class NormRule:
    """Per-example gradient algebra of one layer family.

    `capture` keeps what the rule needs from the layer input, shaped (B, T, ...): T is the
    token axis (1 for non-sequence inputs). `grad_output` has shape (B, T, out_features).
    Both may hold several calls of the same module concatenated along T.
    """

    param_names: tuple[str, ...] = ("weight", "bias")

    def capture(self, module: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_example_sq_norms(
        self, module: nn.Module, saved: torch.Tensor, grad_output: torch.Tensor, trainable: frozenset[str]
    ) -> torch.Tensor:
        """(B,) squared norms of the per-example gradients of the `trainable` parameters, fp32."""
        raise NotImplementedError

    def clipped_grads(
        self,
        module: nn.Module,
        saved: torch.Tensor,
        grad_output: torch.Tensor,
        coef: torch.Tensor,
        trainable: frozenset[str],
    ) -> dict[str, torch.Tensor]:
        """Σ_b coef_b · grad_b for each trainable parameter (book-keeping clipping)."""
        raise NotImplementedError


_BY_TYPE: dict[type, NormRule] = {}
_MATCHERS: list[tuple[Callable[[nn.Module], bool], NormRule]] = []


def register_norm_rule(*module_types: type, matcher: Callable[[nn.Module], bool] | None = None):
    """Class decorator: register one instance of the rule for these types and/or a matcher."""

    def decorate(rule_cls: type[NormRule]) -> type[NormRule]:
        rule = rule_cls()
        for module_type in module_types:
            _BY_TYPE[module_type] = rule
        if matcher is not None:
            _MATCHERS.append((matcher, rule))
        return rule_cls

    return decorate


def rule_for(module: nn.Module) -> NormRule | None:
    for klass in type(module).__mro__:
        if klass in _BY_TYPE:
            return _BY_TYPE[klass]
    for matches, rule in _MATCHERS:
        if matches(module):
            return rule
    return None


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's logical shape, also when ZeRO-3 has partitioned it away (`ds_shape`)."""
    return getattr(param, "ds_shape", param.shape)


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, d) -> (B, 1, d); (B, T, d) unchanged; (B, ..., d) -> (B, prod(...), d)."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() > 3:
        return x.flatten(1, -2)
    return x
