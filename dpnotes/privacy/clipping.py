"""Per-example (or per-privacy-unit) gradient clipping without per-example gradients.

One forward pass is recorded by hooks on the layers that own trainable parameters: each keeps
its input (through its rule) and taps its output. The norm pass is one `torch.autograd.grad` of
the summed per-example losses with respect to a zero scalar added to every tapped output, so no
parameter `.grad` is touched and no engine backward runs. Each tap hands its layer's backprops to
the layer's rule as the pass reaches it, and the pass then drops them: one layer's backprops are
alive at a time, not the whole model's. The rules give per-example norms, hence clip
coefficients c_i. Then:

- ghost:  a second backward of Σ c_i L_i through the recorded graph writes Σ c_i g_i;
- bk:     book-keeping: Σ c_i g_i is assembled from what the norm pass kept of each layer: its
          per-unit gradients where they take fewer bytes than its activations and backprops
          (LoRA factors: 4·r·d per unit in fp32 against T·(r + d) in the model's dtype), else the
          activations and backprops.
          There is a single backward pass.

With privacy unit = patient, a patient's examples are concatenated along the token axis before
the rules run: the norm is then the norm of the patient's summed gradient, as the guarantee needs.

The clipped sums are accumulated in fp32 whatever the parameters' dtype (a bf16 running sum drifts
and can exceed the bound C); the privacy engine adds noise to them in fp32 and casts once.

Checks make the rules' assumptions hold, not just likely: a rule binds only to the forward it was
written for (see rules.registry); the first recorded forward is audited (every use of a trainable
parameter must happen inside its own module's forward, where the rule sees it; peft's ParamWrapper,
for one, reads LoRA factors outside their forward); ghost mode checks every step that no gradient
reached a layer that recorded nothing; and the first batch's largest unit is checked against its
real autograd gradient, layer by layer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from dpnotes.privacy.rules import (
    NormRule,
    UnsupportedParameterError,
    flattens_tokens,
    reads_children_directly,
    rule_for,
    why_no_rule,
)

ClippingMode = Literal["ghost", "bk"]
NORM_FLOOR = 1e-6


@dataclass
class ClippedLayer:
    name: str
    module: nn.Module
    rule: NormRule
    params: dict[str, nn.Parameter]
    flat_tokens: bool = False  # an ancestor feeds it (B·T, d) batch-major (rules.register_flat_tokens)
    saved: list[torch.Tensor] = field(default_factory=list)  # per recorded call: what the rule captured
    calls: list[tuple] = field(default_factory=list)  # per recorded call: (shape, dtype, device) of its output
    backprops: list[torch.Tensor | None] = field(default_factory=list)  # per call, filled by the norm pass

    @property
    def trainable(self) -> frozenset[str]:
        return frozenset(self.params)


@dataclass
class _NormPass:
    """What the norm pass gathers from the taps, layer by layer."""

    batch: int
    group_index: torch.Tensor | None
    n_units: int
    keep: bool  # bk: keep what the clipped sum needs
    layer_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name -> (U,) squared norms
    # bk, per layer: (layer, {param: (U, *shape) per-unit gradients}, None, None) or (layer, None, saved, backprops)
    kept: list[tuple] = field(default_factory=list)


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
    flat_prefixes = _descendant_prefixes(model, flattens_tokens)
    read_prefixes = _descendant_prefixes(model, lambda parent, child: reads_children_directly(parent))
    for module_name, module in model.named_modules():
        trainable = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not trainable:
            continue
        for param_name, param in trainable.items():
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}".lstrip("."))
        rule = rule_for(module)
        reader = next((reader for prefix, reader in read_prefixes.items() if _is_under(module_name, prefix)), None)
        missing = [n for n in trainable if rule is None or reader is not None or n not in rule.param_names]
        if reader is not None:
            reason = f"{type(reader).__name__} reads it without calling {type(module).__name__}"
        elif rule is None:
            reason = why_no_rule(module)
        else:
            reason = f"{type(module).__name__}'s rule has no such parameter"
        uncovered += [f"{module_name}.{n} ({reason})".lstrip(".") for n in missing]
        if not missing:
            flat = any(_is_under(module_name, prefix) for prefix in flat_prefixes)
            layers.append(ClippedLayer(module_name, module, rule, trainable, flat))
    if uncovered:
        raise UnsupportedParameterError(
            "no per-example clipping rule for trainable parameter(s): " + ", ".join(uncovered)
            + ". Freeze them or register a rule (dpnotes.privacy.rules.register_norm_rule)."
        )
    tied = [names for names in owners.values() if len(names) > 1]
    if tied:
        raise UnsupportedParameterError(
            "tied trainable parameters are not supported (the per-example gradient of a tied weight is the "
            f"sum over its uses): {tied}. Freeze them, untie them, or train LoRA adapters instead."
        )
    return layers


def _descendant_prefixes(model: nn.Module, declared) -> dict[str, nn.Module]:
    """{child's full name: parent} for every child whose parent's registration `declared(parent,
    child_name)` covers it (the declaration then holds for everything under that child)."""
    prefixes = {}
    for name, parent in model.named_modules():
        for child_name, _ in parent.named_children():
            if declared(parent, child_name):
                prefixes[f"{name}.{child_name}".lstrip(".")] = parent
    return prefixes


def _is_under(module_name: str, prefix: str) -> bool:
    return module_name == prefix or module_name.startswith(prefix + ".")


class ParameterUseAudit(TorchFunctionMode):
    """Records every use of a bound trainable parameter, as an input of an op that returns a tensor,
    made outside the forward of the module that owns it: the rules would not see such a use, so
    the norm would miss it (and in ghost mode, or under ZeRO, its unclipped gradient would be
    written). Uses inside a custom autograd.Function run without grad and still count; metadata
    reads (dtype, shape, device) return no tensor and do not, nor do `.data`, `.grad`, `.detach()`.
    What it cannot see: a custom autograd.Function whose forward reads only `.data` of a parameter
    it received (Function.apply itself never reaches a TorchFunctionMode)."""

    def __init__(self, layers: list[ClippedLayer]):
        super().__init__()
        self.owner = {id(p): layer for layer in layers for p in layer.params.values()}
        self.running: list[nn.Module] = []
        self.outside: dict[str, str] = {}

    # Reads that give a tensor through which no gradient can flow (DeepSpeed's ZeRO-3 hooks read
    # `.data` of the parameters they gather).
    NON_DIFFERENTIABLE = frozenset({"data", "grad", "detach"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(getattr(func, "__self__", None), "__name__", None) or getattr(func, "__name__", None)
        if name not in self.NON_DIFFERENTIABLE and any(torch.is_tensor(r) for r in tree_flatten(result)[0]):
            for value in tree_flatten((args, kwargs or {}))[0]:
                layer = self.owner.get(id(value)) if isinstance(value, nn.Parameter) else None
                if layer is not None and (not self.running or self.running[-1] is not layer.module):
                    where = type(self.running[-1]).__name__ if self.running else "code outside any module"
                    self.outside.setdefault(layer.name, f"{getattr(func, '__qualname__', func)} in {where}")
        return result

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        def enter(module, args):
            self.running.append(module)

        def leave(module, args, output):
            self.running.pop()

        # Global module hooks: the innermost running module of any kind names where a use happened.
        handles = [
            nn.modules.module.register_module_forward_pre_hook(enter),
            nn.modules.module.register_module_forward_hook(leave, always_call=True),
        ]
        try:
            with self:
                yield
        finally:
            for handle in handles:
                handle.remove()
        if self.outside:
            raise UnsupportedParameterError(
                "trainable parameter(s) used outside the forward of the module that owns them, where no "
                "per-example rule sees them: " + ", ".join(f"{name} ({how})" for name, how in sorted(self.outside.items()))
                + ". Freeze them or train other modules (e.g. LoRA target_modules without these layers)."
            )


def _join_calls(per_call: list[torch.Tensor]) -> torch.Tensor:
    """Several calls of one module count as one longer sequence (their gradients add up)."""
    return per_call[0] if len(per_call) == 1 else torch.cat(per_call, dim=1)


def _batch_major(layer: ClippedLayer, output: torch.Tensor, layer_input: torch.Tensor, batch_size: int):
    """Give a call whose leading dimension is not the batch one example per row, or refuse.

    Inputs shared by the batch (position ids of shape (1, T)) give an output that broadcasts later,
    whose gradient would be summed over examples: it is expanded so each example keeps its own
    backprop. Tokens flattened to (B·T, d) are regrouped, where the parent is known to flatten
    batch-major (layer.flat_tokens).
    """
    rows = output.shape[0]
    if rows == 1 and layer_input.shape[0] == 1:
        return output.expand(batch_size, *output.shape[1:]), layer_input.expand(batch_size, *layer_input.shape[1:])
    if layer.flat_tokens and rows % batch_size == 0 and layer_input.shape[0] == rows:
        return output, layer_input.reshape(batch_size, rows // batch_size, *layer_input.shape[1:])
    raise UnsupportedParameterError(
        f"{layer.name} ({type(layer.module).__name__}): output leading dimension {rows} is neither the batch size "
        f"{batch_size} nor 1, and its parent is not registered as flattening tokens batch-major "
        "(rules.register_flat_tokens): cannot attribute its gradient to examples"
    )


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


def refuse_reentrant_checkpointing(model: nn.Module) -> None:
    """Reentrant activation checkpointing runs a layer's forward without a graph and again inside
    backward: the recorded outputs would carry no gradient and no rule would see the layer. The
    non-reentrant kind keeps the forward's graph (its saved activations are recomputed), so the
    recording stays exact (tests/test_activation_checkpointing.py). DeepSpeed's checkpoint functions
    are refused too: `checkpoint` is reentrant, and `non_reentrant_checkpoint` raises on the norm
    pass's torch.autograd.grad (and on backward(inputs=...): only a plain backward, which writes the
    parameters' gradients, passes its check)."""
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            checkpoint = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(checkpoint, "keywords", {}).get("use_reentrant") is not False:
                what = getattr(checkpoint, "__qualname__", None) or getattr(getattr(checkpoint, "func", None), "__qualname__", "?")
                raise UnsupportedParameterError(
                    f"{name} ({type(module).__name__}) uses reentrant or unknown activation checkpointing ({what}): "
                    "per-example norms need torch's non-reentrant kind (gradient_checkpointing_kwargs={'use_reentrant': False})"
                )


REDUCED_PRECISION_REDUCTIONS = ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")


@contextlib.contextmanager
def exact_fp32_matmuls() -> Iterator[None]:
    """Norms and clipped sums with full fp32 products and sums. TF32 (on for the model's own matmuls on
    GPUs, models.compute_device) keeps 10 mantissa bits: a norm off by 1e-3 would let a clipped
    gradient exceed C, and bk's sums would disagree with the norms they were clipped by."""
    saved = torch.get_float32_matmul_precision()
    matmul = torch.backends.cuda.matmul
    reduced = {name: getattr(matmul, name) for name in REDUCED_PRECISION_REDUCTIONS}
    torch.set_float32_matmul_precision("highest")
    # bf16/fp16 operands (rules.linear.fp32_bmm) accumulate in fp32 only if cuBLAS may not reduce in 16 bits.
    for name in REDUCED_PRECISION_REDUCTIONS:
        setattr(matmul, name, False)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)
        for name, allowed in reduced.items():
            setattr(matmul, name, allowed)


class PerExampleClipper:
    """Clips each privacy unit's gradient to `max_grad_norm` and accumulates the clipped sum, in
    fp32 (fp64 for fp64 parameters): `summed()` gives one tensor per parameter of `parameters`."""

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
        self.parameters = [p for layer in self.layers for p in layer.params.values()]
        self._position = {id(p): k for k, p in enumerate(self.parameters)}
        self.audited = False
        self.verified = False
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._pass: _NormPass | None = None
        self.clipped_sums: list[torch.Tensor | None] = []
        self.reset_sums()

    def reset_sums(self) -> None:
        # Allocated on first use: under ZeRO only coefficients() runs, and full fp32 copies of the
        # trainable parameters would be wasted memory.
        self.clipped_sums = [None] * len(self.parameters)

    def _add_to_sum(self, k: int, grad: torch.Tensor) -> None:
        if self.clipped_sums[k] is None:
            param = self.parameters[k]
            # ds_shape: ZeRO-3 partitions a parameter outside its module's hooks (shape (0,) there).
            self.clipped_sums[k] = torch.zeros(getattr(param, "ds_shape", param.shape), device=param.device,
                                               dtype=torch.promote_types(param.dtype, torch.float32))
        self.clipped_sums[k].add_(grad)

    def summed(self) -> list[torch.Tensor]:
        """The clipped sums, zeros for parameters nothing was added to."""
        for k, param in enumerate(self.parameters):
            if self.clipped_sums[k] is None:
                self._add_to_sum(k, torch.zeros((), device=param.device))
        return self.clipped_sums

    @contextlib.contextmanager
    def recording(self, batch_size: int) -> Iterator[None]:
        """Record the forward passes of a batch of `batch_size` examples run inside (hooks are
        removed on exit). The first recording that reaches the model is also audited."""
        refuse_reentrant_checkpointing(self.model)
        handles = [
            layer.module.register_forward_hook(self._recorder(layer, batch_size), with_kwargs=True)
            for layer in self.layers
        ]
        audit = contextlib.nullcontext() if self.audited else ParameterUseAudit(self.layers).watching()
        try:
            with audit:
                yield
            self.audited = self.audited or any(layer.calls for layer in self.layers)
        finally:
            for handle in handles:
                handle.remove()

    def _anchor(self, device: torch.device) -> torch.Tensor:
        """The zero scalar added to every tapped output on `device` (one per device: a CPU scalar in a
        CUDA op would cost a device-to-host copy per layer in the norm pass)."""
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self._anchors[device]

    def _recorder(self, layer: ClippedLayer, batch_size: int):
        def record(module, args, kwargs, output):
            if not torch.is_tensor(output):
                raise UnsupportedParameterError(
                    f"{layer.name} ({type(module).__name__}) returns {type(output).__name__}, not a tensor: its rule "
                    "cannot see the gradient of its output"
                )
            if not output.requires_grad:
                return None
            layer_input = layer.rule.layer_input(module, args, kwargs)
            if output.shape[0] != batch_size:
                output, layer_input = _batch_major(layer, output, layer_input, batch_size)
            layer.saved.append(layer.rule.capture(module, layer_input))
            layer.calls.append((output.shape, output.dtype, output.device))
            layer.backprops.append(None)
            # x + 0 is x exactly. The sum puts every tapped output on a path from the losses to the anchor,
            # so the norm pass (a gradient w.r.t. the anchors) reaches each tap, and nothing below the lowest.
            tapped = output + self._anchor(output.device)
            tapped.register_hook(self._tap(layer, len(layer.calls) - 1))
            return tapped

        return record

    def _tap(self, layer: ClippedLayer, call: int):
        """The hook of one call's output: in the norm pass it hands the backprops over, and the layer
        is reduced once all its calls are in. Other backwards through the graph (ghost's second,
        the verification, DeepSpeed's) pass through untouched."""

        def hand_over(grad: torch.Tensor) -> None:
            if self._pass is not None:
                layer.backprops[call] = grad
                if all(b is not None for b in layer.backprops):
                    self._reduce(layer)

        return hand_over

    def _reduce(self, layer: ClippedLayer) -> None:
        """A layer's backprops are all in: its per-unit squared norms, and for bk what its clipped sum
        needs. The backprops are released unless bk must keep them, and so are the activations."""
        state = self._pass
        saved = _join_calls(layer.saved)
        grad_output = _join_calls([g.reshape(state.batch, -1, g.shape[-1]) for g in layer.backprops])
        layer.saved.clear()
        layer.backprops = [None] * len(layer.calls)
        unit_saved, unit_grad = saved, grad_output
        if state.group_index is not None:
            unit_saved = group_tokens(saved, state.group_index, state.n_units)
            unit_grad = group_tokens(grad_output, state.group_index, state.n_units)
        grads = layer.rule.per_example_grads(layer.module, unit_saved, unit_grad, layer.trainable) if state.keep else None
        if grads is not None:
            state.layer_sq[layer.name] = sum(g.flatten(1).square().sum(dim=1) for g in grads.values())
            state.kept.append((layer, grads, None, None))
            return
        state.layer_sq[layer.name] = layer.rule.per_example_sq_norms(layer.module, unit_saved, unit_grad, layer.trainable)
        if state.keep:
            state.kept.append((layer, None, saved, grad_output))

    def _release(self) -> None:
        for layer in self.layers:
            layer.saved.clear()
            layer.calls.clear()
            layer.backprops.clear()
        self._anchors.clear()

    def backward(self, losses: torch.Tensor, group_index: torch.Tensor | None = None, verify: bool = True) -> ClipResult:
        """Clip and add Σ_units c_u · grad_u to the clipped sums for the forward recorded last.

        `losses`: (B,) per-example losses. `group_index`: (B,) privacy unit of each example in
        0..U-1 (None: each example is its own unit). Returns per-unit norms and coefficients.
        `verify=False` skips the first batch's check against autograd, which back-propagates into
        the parameters themselves (ZeRO-3 partitions them: see _verify_against_autograd).
        """
        return self._clip(losses, group_index, accumulate=True, verify=verify)

    def coefficients(self, losses: torch.Tensor, group_index: torch.Tensor | None = None) -> ClipResult:
        """Norm pass only, for the forward recorded last: per-unit norms and clip coefficients from
        `torch.autograd.grad` w.r.t. the recorded layer outputs. No parameter `.grad` is touched:
        an engine that owns the backward (DeepSpeed) then back-propagates Σ c_i L_i itself."""
        return self._clip(losses, group_index, accumulate=False, verify=False)

    @exact_fp32_matmuls()
    def _clip(self, losses: torch.Tensor, group_index: torch.Tensor | None, accumulate: bool, verify: bool) -> ClipResult:
        try:
            if losses.shape[0] == 0:
                empty = losses.new_zeros(0, dtype=torch.float32)
                return ClipResult(empty, empty)
            ghost = accumulate and self.mode == "ghost"
            verify = verify and not self.verified
            state, norms, unit_coef, example_coef = self._norms(
                losses, group_index, retain_graph=ghost or verify, keep=accumulate and not ghost
            )
            if verify:
                self._verify_against_autograd(losses, group_index, norms, state.layer_sq)
            if ghost:
                self._ghost_backward(losses, example_coef)
            elif accumulate:
                self._accumulate_clipped(state.kept, unit_coef, example_coef)
            return ClipResult(norms.detach(), unit_coef.detach())
        finally:
            self._release()

    def _ghost_backward(self, losses: torch.Tensor, example_coef: torch.Tensor) -> None:
        """Second backward of Σ c_i L_i; its `.grad` is moved into the fp32 sums at once. Autograd
        forms this micro-batch's sum in the parameters' dtype (bk sums in fp32 throughout).

        Every step checks that no parameter of a layer that recorded nothing got a gradient: such a
        gradient came from a use no rule saw (the audit covers the first forward's paths only)."""
        params = self.parameters
        for param in params:
            param.grad = None
        (losses * example_coef.to(losses.dtype)).sum().backward(inputs=params)
        unseen = [layer.name for layer in self.layers if not layer.calls
                  and any(p.grad is not None and p.grad.any() for p in layer.params.values())]
        if unseen:
            for param in params:
                param.grad = None
            raise UnsupportedParameterError(
                f"gradient reached {', '.join(unseen)} although no call of the module was recorded: its "
                "parameters are used outside their module's forward; freeze them or train other modules"
            )
        for k, param in enumerate(params):
            if param.grad is not None:
                self._add_to_sum(k, param.grad)
            param.grad = None

    def _accumulate_clipped(self, kept: list[tuple], unit_coef: torch.Tensor, example_coef: torch.Tensor) -> None:
        """Book-keeping: Σ_u c_u · grad_u from what the norm pass kept of each layer."""
        for layer, unit_grads, saved, grad_output in kept:
            if unit_grads is not None:
                grads = {name: torch.tensordot(unit_coef.to(g.dtype), g, dims=1) for name, g in unit_grads.items()}
            else:
                grads = layer.rule.clipped_grads(layer.module, saved, grad_output, example_coef, layer.trainable)
            for name, grad in grads.items():
                self._add_to_sum(self._position[id(layer.params[name])], grad)

    def _norms(self, losses: torch.Tensor, group_index: torch.Tensor | None, retain_graph: bool, keep: bool):
        """The norm pass: every recorded layer reduced (`_reduce`) as the gradient reaches its taps."""
        batch = losses.shape[0]
        n_units = batch if group_index is None else int(group_index.max()) + 1
        state = self._pass = _NormPass(batch, group_index, n_units, keep)
        try:
            if self._anchors:  # none: no bound module ran, every unit's norm is 0 (ghost then checks the gradient)
                torch.autograd.grad(losses.sum(), list(self._anchors.values()), retain_graph=retain_graph,
                                    allow_unused=True)
            for layer in self.layers:  # calls the losses do not depend on have zero backprops
                if layer.calls and layer.name not in state.layer_sq:
                    layer.backprops = [b if b is not None else torch.zeros(shape, dtype=dtype, device=device)
                                       for b, (shape, dtype, device) in zip(layer.backprops, layer.calls)]
                    self._reduce(layer)
        finally:
            self._pass = None
        sq_norms = torch.zeros(n_units, device=losses.device, dtype=torch.float32)
        for layer in self.layers:  # in model order, whatever order the pass reached them in
            if layer.name in state.layer_sq:
                sq_norms = sq_norms + state.layer_sq[layer.name]
        norms = sq_norms.sqrt()
        unit_coef = (self.max_grad_norm / (norms + NORM_FLOOR)).clamp(max=1.0)
        example_coef = unit_coef if group_index is None else unit_coef[group_index]
        return state, norms, unit_coef, example_coef

    def _verify_against_autograd(self, losses, group_index, norms, layer_sq) -> None:
        """Once per clipper, on the first batch: the largest unit's gradient, computed by autograd
        for real, must have the norm the rules give, layer by layer. This checks the rules on the
        model actually trained (hooks that rescale outputs, patched code, anything the binding and
        the audit cannot see), at the cost of one backward. Not under ZeRO-3 nor ghost clipping under
        ZeRO (coefficients()): ZeRO-3 parameters are partitioned outside their module's hooks, and a
        backward into them there fails; ZeRO-1/2 keep them whole and verify."""
        unit = int(norms.argmax())
        members = slice(unit, unit + 1) if group_index is None else group_index == unit
        grads = torch.autograd.grad(losses[members].sum(), self.parameters, retain_graph=True, allow_unused=True)
        by_param = {id(p): g for p, g in zip(self.parameters, grads)}
        exact = all(p.dtype in (torch.float32, torch.float64) for p in self.parameters)
        tolerance = 1e-3 if exact else 5e-2  # autograd's own gradient is rounded in bf16/fp16
        wrong = []
        for layer in self.layers:
            true = sum(float(by_param[id(p)].double().square().sum()) for p in layer.params.values()
                       if by_param[id(p)] is not None) ** 0.5
            ours = float(layer_sq[layer.name][unit]) ** 0.5 if layer.name in layer_sq else 0.0
            if abs(true - ours) > tolerance * max(true, ours) + 1e-6 * float(norms[unit]) + 1e-12:
                wrong.append(f"{layer.name} (rule {ours:.4g}, autograd {true:.4g})")
        if wrong:
            raise UnsupportedParameterError(
                "per-example norms disagree with autograd on the first batch: " + ", ".join(wrong)
                + ". Something changes these modules' computation (a hook that rescales an output, a patch): "
                "no rule is exact for them; freeze them or remove the change."
            )
        self.verified = True
