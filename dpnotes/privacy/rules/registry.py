"""Registry of norm rules, bound fail-closed.

A rule is written for one forward: the one of the class it is registered for. It applies to a
module whose class is that class, or a subclass that inherits its forward unchanged. A subclass
that overrides forward (Gemma's embedding scales its output, OPT's positional embedding computes
its own ids) gets no rule unless one is registered for it: an approximated norm would silently
break the sensitivity bound, a refusal only costs a registration.

Classes of libraries we do not import eagerly (each HF model family declares its own RMSNorm) are
registered by their dotted name, which binds exactly that class, not look-alikes.
"""
from __future__ import annotations

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

    def layer_input(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """The tensor `capture` reads, from the arguments of the module's forward."""
        return args[0] if args else next(iter(kwargs.values()))

    def capture(self, module: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_example_sq_norms(
        self, module: nn.Module, saved: torch.Tensor, grad_output: torch.Tensor, trainable: frozenset[str]
    ) -> torch.Tensor:
        """(B,) squared norms of the per-example gradients of the `trainable` parameters, fp32."""
        raise NotImplementedError

    def per_example_grads(
        self, module: nn.Module, saved: torch.Tensor, grad_output: torch.Tensor, trainable: frozenset[str]
    ) -> dict[str, torch.Tensor] | None:
        """{name: (B, *shape)} per-example gradients of the `trainable` parameters, fp32, where they
        take less memory than `saved` and `grad_output` (book-keeping then keeps them instead, and
        the norms are theirs); None where they would not, or the rule does not instantiate them."""
        return None

    def clipped_grads(
        self,
        module: nn.Module,
        saved: torch.Tensor,
        grad_output: torch.Tensor,
        coef: torch.Tensor,
        trainable: frozenset[str],
    ) -> dict[str, torch.Tensor]:
        """Σ_b coef_b · grad_b for each trainable parameter (book-keeping clipping), fp32."""
        raise NotImplementedError


_BY_TYPE: dict[type, NormRule] = {}
_BY_NAME: dict[str, NormRule] = {}
_FLAT_TOKENS: dict[str, frozenset[str]] = {}
_DIRECT_READERS: set[str] = set()


def class_path(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def register_norm_rule(*module_types: type | str):
    """Class decorator: register one instance of the rule for these classes (or dotted class names)."""

    def decorate(rule_cls: type[NormRule]) -> type[NormRule]:
        rule = rule_cls()
        for module_type in module_types:
            if isinstance(module_type, str):
                _BY_NAME[module_type] = rule
            else:
                _BY_TYPE[module_type] = rule
        return rule_cls

    return decorate


def register_flat_tokens(parent: str, *children: str) -> None:
    """Declare that the forward of class `parent` (dotted name) calls its `children` on its input
    reshaped from (B, T, d) to (B·T, d) in batch-major order, so row b·T + t is token t of example
    b. Only these modules (and modules inside them) may see flattened tokens: elsewhere a leading
    dimension other than the batch size is refused, since a reordering (routing, transposes)
    would attribute one example's gradient to another."""
    _FLAT_TOKENS[parent] = _FLAT_TOKENS.get(parent, frozenset()) | frozenset(children)


def register_direct_reader(parent: str) -> None:
    """Declare that class `parent` (dotted name) reads its submodules' parameters as tensors instead
    of calling the submodules, so no rule can see those uses: their parameters are refused by name
    when the clipper is built (the first recorded forward is audited for undeclared cases)."""
    _DIRECT_READERS.add(parent)


def reads_children_directly(parent: nn.Module) -> bool:
    return any(class_path(k) in _DIRECT_READERS for k in type(parent).__mro__)


def flattens_tokens(parent: nn.Module, child_name: str) -> bool:
    return any(child_name in _FLAT_TOKENS.get(class_path(k), ()) for k in type(parent).__mro__)


def _registered(klass: type) -> NormRule | None:
    return _BY_TYPE.get(klass) or _BY_NAME.get(class_path(klass))


def _binding(module: nn.Module) -> tuple[NormRule | None, str]:
    """(rule, why none) for a module: the rule of its class, or of the nearest registered base whose
    forward the class inherits unchanged, provided the instance does not replace forward either."""
    cls = type(module)
    for klass in cls.__mro__:
        rule = _registered(klass)
        if rule is None:
            continue
        if cls.forward is not klass.forward:
            return None, f"{cls.__name__} overrides the forward of {klass.__name__} that the rule was written for"
        if "forward" in vars(module):
            return None, f"this {cls.__name__} instance has its forward replaced (a wrapper or patch)"
        return rule, ""
    return None, f"no rule for {cls.__name__}"


def rule_for(module: nn.Module) -> NormRule | None:
    return _binding(module)[0]


def why_no_rule(module: nn.Module) -> str:
    return _binding(module)[1]


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
