"""Every norm rule against a batch-size-1 oracle: norms, clipped sums, both clipping modes,
batches of 0 and 1, T = 1, masked tokens, shared modules and per-patient units."""
import importlib

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

from dpnotes.testing.dp_oracle import clipped_sum_reference, flat_clipped_sum, per_example_gradients
from dpnotes.privacy.clipping import PerExampleClipper
from dpnotes.privacy.rules import UnsupportedParameterError, rule_for
from dpnotes.privacy.rules.normalization import HF_RMS_NORMS


def load_class(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)

FEATURES = 6


class Probe(nn.Module):
    """Runs `body` on batch["x"]; the loss is a fixed nonlinear read-out of masked tokens."""

    def __init__(self, body: nn.Module, seed: int = 0):
        super().__init__()
        self.body = body
        gen = torch.Generator().manual_seed(seed)
        for p in self.body.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 1 else 0.0))

    def forward(self, x):
        return self.body(x)


def probe_losses(model, batch):
    out = torch.tanh(model(batch["x"]))
    if out.dim() == 2:
        return out.sum(dim=1) * batch["mask"][:, 0]
    mask = batch["mask"].reshape(out.shape[0], out.shape[1], *([1] * (out.dim() - 2)))
    return (out * mask).flatten(1).sum(dim=1)


def float_tokens(batch, tokens, gen):
    return torch.randn(batch, tokens, FEATURES, generator=gen)


def float_rows(batch, tokens, gen):
    return torch.randn(batch, FEATURES, generator=gen)


def token_ids(batch, tokens, gen):
    ids = torch.randint(0, 7, (batch, tokens), generator=gen)  # small vocab: repeated ids
    return ids


def head_tokens(batch, tokens, gen):
    return torch.randn(batch, tokens, 3, FEATURES, generator=gen)


def attention_masks(batch, tokens, gen):
    """Right-padded 0/1 masks (OPT's positional embedding takes the mask, not ids)."""
    lengths = torch.randint(1, tokens + 1, (batch,), generator=gen)
    return (torch.arange(tokens)[None, :] < lengths[:, None]).long()


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, FEATURES, padding_idx=0)
        self.proj = nn.Linear(FEATURES, 32)
        self.norm = nn.LayerNorm(32)
        self.rms = LlamaRMSNorm(32)
        self.out = Conv1D(5, 32)

    def forward(self, ids):
        return self.out(self.rms(self.norm(torch.relu(self.proj(self.embed(ids))))))


CASES = {
    "linear": (lambda: nn.Linear(FEATURES, 5), float_tokens),
    "linear_no_bias": (lambda: nn.Linear(FEATURES, 5, bias=False), float_tokens),
    "linear_2d_input": (lambda: nn.Linear(FEATURES, 5), float_rows),
    "linear_ghost_path": (lambda: nn.Linear(FEATURES, 64), float_tokens),  # 2T² < p·d
    "conv1d": (lambda: Conv1D(5, FEATURES), float_tokens),
    "embedding_padding_idx": (lambda: nn.Embedding(7, FEATURES, padding_idx=0), token_ids),
    "layernorm": (lambda: nn.LayerNorm(FEATURES), float_tokens),
    "layernorm_no_bias": (lambda: nn.LayerNorm(FEATURES, bias=False), float_tokens),
    "torch_rmsnorm": (lambda: nn.RMSNorm(FEATURES, eps=1e-5), float_tokens),
    "llama_rmsnorm": (lambda: LlamaRMSNorm(FEATURES), float_tokens),
    "rmsnorm_per_head": (lambda: LlamaRMSNorm(FEATURES), head_tokens),
    "shared_module_called_twice": (Shared, float_tokens),
    "stack_of_families": (Stack, token_ids),
    # Classes registered by name: each forward differs from its base's, each has its own check here.
    "gemma_scaled_embedding": (
        lambda: load_class("transformers.models.gemma3.modeling_gemma3.Gemma3TextScaledWordEmbedding")(
            7, FEATURES, padding_idx=0, embed_scale=FEATURES**0.5), token_ids),
    "opt_learned_positions": (
        lambda: load_class("transformers.models.opt.modeling_opt.OPTLearnedPositionalEmbedding")(8, FEATURES),
        attention_masks),
    "falcon_linear": (lambda: load_class("transformers.models.falcon.modeling_falcon.FalconLinear")(FEATURES, 5),
                      float_tokens),
    **{f"rms:{path.rsplit('.', 1)[1]}": (lambda path=path: load_class(path)(FEATURES), float_tokens)
       for path in HF_RMS_NORMS},
}


def make_batch(make_input, batch, tokens, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, tokens, generator=gen) > 0.3).float()
    if batch and tokens > 1:
        mask[0] = 1.0
    return {"x": make_input(batch, tokens, gen), "mask": mask}


def run_clipper(model, batch, mode, max_grad_norm, group_index=None):
    clipper = PerExampleClipper(model, max_grad_norm, mode=mode)
    model.zero_grad(set_to_none=True)
    with clipper.recording(len(batch["x"])):
        losses = probe_losses(model, batch) if len(batch["x"]) else torch.zeros(0)
    result = clipper.backward(losses, group_index)
    return result, flat_clipped_sum(clipper)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
@pytest.mark.parametrize("batch,tokens", [(4, 5), (1, 5), (3, 1)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_matches_oracle(case, batch, tokens, mode):
    build, make_input = CASES[case]
    model = Probe(build()).double()
    data = make_batch(make_input, batch, tokens)
    data["x"] = data["x"].double() if data["x"].is_floating_point() else data["x"]
    per_example = per_example_gradients(model, probe_losses, data)
    max_grad_norm = float(per_example.norm(dim=1).median()) if batch > 1 else 1e3
    ref_norms, ref_sum = clipped_sum_reference(per_example, max_grad_norm)

    result, clipped_sum = run_clipper(model, data, mode, max_grad_norm)

    torch.testing.assert_close(result.norms.double(), ref_norms, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(clipped_sum, ref_sum, rtol=1e-4, atol=1e-7)
    if batch > 1:
        assert 0 < result.clipped_count < batch


@pytest.mark.parametrize("mode", ["ghost", "bk"])
@pytest.mark.parametrize("case", ["linear", "embedding_padding_idx", "stack_of_families"])
def test_patient_units_clip_the_summed_gradient(case, mode):
    build, make_input = CASES[case]
    model = Probe(build()).double()
    data = make_batch(make_input, 5, 4)
    data["x"] = data["x"].double() if data["x"].is_floating_point() else data["x"]
    patients = torch.tensor([2, 0, 2, 1, 2])
    per_example = per_example_gradients(model, probe_losses, data)
    ref_norms, ref_sum = clipped_sum_reference(per_example, 0.5, patients)

    result, clipped_sum = run_clipper(model, data, mode, 0.5, patients)

    torch.testing.assert_close(result.norms.double(), ref_norms, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(clipped_sum, ref_sum, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_empty_batch_adds_nothing(mode):
    model = Probe(nn.Linear(FEATURES, 5))
    data = make_batch(float_tokens, 0, 3)
    result, clipped_sum = run_clipper(model, data, mode, 1.0)
    assert result.norms.shape == (0,)
    assert torch.count_nonzero(clipped_sum) == 0


def test_parameter_without_rule_is_named():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

    model = nn.Sequential(nn.Linear(3, 3), Scale())
    with pytest.raises(UnsupportedParameterError, match=r"1\.gain \(no rule for Scale\)"):
        PerExampleClipper(model, 1.0)
    model[1].gain.requires_grad_(False)
    assert len(PerExampleClipper(model, 1.0).layers) == 1  # frozen parameters are no concern


def test_tied_trainable_weights_are_refused():
    embed, head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
    head.weight = embed.weight
    with pytest.raises(UnsupportedParameterError, match="tied"):
        PerExampleClipper(nn.ModuleDict({"embed": embed, "head": head}), 1.0)


def test_a_subclass_that_overrides_forward_is_refused_by_name():
    class Doubled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    class Renamed(nn.Embedding):
        pass

    assert rule_for(Renamed(7, 4)) is rule_for(nn.Embedding(7, 4))  # inherits forward: same rule
    with pytest.raises(UnsupportedParameterError, match=r"embed\.weight \(Doubled overrides the forward of Embedding"):
        PerExampleClipper(nn.ModuleDict({"embed": Doubled(7, 4)}), 1.0)


class ReadsChildWeight(nn.Module):
    """Uses its child's weight without calling the child: invisible to the child's rule."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        return self.inner(x) + x @ self.inner.weight.t()


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_a_parameter_used_outside_its_module_is_refused_at_the_first_forward(mode):
    model = Probe(ReadsChildWeight())
    clipper = PerExampleClipper(model, 1.0, mode=mode)
    data = make_batch(float_tokens, 3, 4)
    with pytest.raises(UnsupportedParameterError, match=r"body\.inner \(.*ReadsChildWeight"):
        with clipper.recording(3):
            probe_losses(model, data)


class Flattens(nn.Module):
    """Calls a Linear on (B·T, d): not declared batch-major, so refused."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        return self.inner(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def test_undeclared_flattened_tokens_are_refused():
    model = Probe(Flattens())
    clipper = PerExampleClipper(model, 1.0)
    with pytest.raises(UnsupportedParameterError, match=r"body\.inner \(Linear\): output leading dimension 12"):
        with clipper.recording(3):
            probe_losses(model, make_batch(float_tokens, 3, 4))


def test_a_bound_module_returning_a_tuple_is_refused(monkeypatch):
    """A rule sees the gradient of its module's output tensor: a tuple output cannot be recorded."""
    from dpnotes.privacy.rules import registry
    from dpnotes.privacy.rules.linear import LinearRule

    class Pair(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(x, self.weight, self.bias), x

    monkeypatch.setitem(registry._BY_TYPE, Pair, LinearRule())

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair(FEATURES, FEATURES)

        def forward(self, x):
            return self.pair(x)[0]

    model = Probe(Body())
    clipper = PerExampleClipper(model, 1.0)
    with pytest.raises(UnsupportedParameterError, match=r"body\.pair \(Pair\) returns tuple"):
        with clipper.recording(3):
            probe_losses(model, make_batch(float_tokens, 3, 4))


class ThroughCustomFunction(nn.Module):
    """Feeds its child's weight to a custom autograd.Function: the ops inside run without grad."""

    class Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(x, weight)
            return nn.functional.linear(x, weight)

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            return grad @ weight, (grad.unsqueeze(-1) * x.unsqueeze(-2)).flatten(0, -3).sum(0)

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        return self.inner(x) + self.Matmul.apply(x, self.inner.weight)


def test_a_parameter_used_inside_a_custom_autograd_function_is_refused():
    model = Probe(ThroughCustomFunction())
    clipper = PerExampleClipper(model, 1.0, mode="ghost")
    with pytest.raises(UnsupportedParameterError, match=r"body\.inner \(linear in ThroughCustomFunction"):
        with clipper.recording(3):
            probe_losses(model, make_batch(float_tokens, 3, 4))


class SometimesReadsChildWeight(nn.Module):
    """Uses its child's weight outside the child only when told to: a path the first forward misses."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(FEATURES, FEATURES)
        self.other = nn.Linear(FEATURES, FEATURES)
        self.late = False

    def forward(self, x):
        return x @ self.inner.weight.t() if self.late else self.other(x)


def test_ghost_refuses_a_gradient_no_rule_saw_on_any_step():
    model = Probe(SometimesReadsChildWeight())
    clipper = PerExampleClipper(model, 1.0, mode="ghost")
    data = make_batch(float_tokens, 3, 4)
    with clipper.recording(3):
        losses = probe_losses(model, data)
    clipper.backward(losses)  # first forward: audited, clean
    model.body.late = True
    with clipper.recording(3):
        losses = probe_losses(model, data)
    with pytest.raises(UnsupportedParameterError, match=r"gradient reached body\.inner"):
        clipper.backward(losses)


def test_an_instance_with_a_replaced_forward_is_refused():
    layer = nn.Linear(FEATURES, 2)
    layer.forward = lambda x: nn.functional.linear(x, layer.weight * 2.0, layer.bias)
    with pytest.raises(UnsupportedParameterError, match=r"layer\.weight \(this Linear instance has its forward replaced"):
        PerExampleClipper(nn.ModuleDict({"layer": layer}), 1.0)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_a_hook_that_rescales_an_output_is_caught_by_the_first_batch_check(mode):
    """A forward hook registered before the clipper's doubles a Linear's output: the rule then sees
    the gradient of 2·(Wa + b) and would report half the true norm. Autograd disagrees: refused."""
    model = Probe(nn.Linear(FEATURES, 5))
    model.body.register_forward_hook(lambda module, args, output: output * 2.0)
    clipper = PerExampleClipper(model, 1.0, mode=mode)
    with clipper.recording(3):
        losses = probe_losses(model, make_batch(float_tokens, 3, 4))
    with pytest.raises(UnsupportedParameterError, match=r"disagree with autograd on the first batch: body \(rule"):
        clipper.backward(losses)


class _Marker(torch.autograd.Function):
    """Identity whose backward logs that the backward pass reached it."""

    @staticmethod
    def forward(ctx, x, events):
        ctx.events = events
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.events.append("reached the bottom layer")
        return grad, None


class _Tower(nn.Module):
    """Four trainable Linear layers in a row; the backward logs when it gets below the second."""

    def __init__(self, events: list):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(FEATURES, FEATURES) for _ in range(4))
        self.events = events

    def forward(self, x):
        x = self.layers[0](x)
        x = _Marker.apply(x, self.events)
        for layer in self.layers[1:]:
            x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_each_layer_is_reduced_as_the_norm_pass_reaches_it(mode, monkeypatch):
    """The norm pass hands each layer's backprops to its rule while the backward is still above the
    layers below, and drops them then: one layer's backprops are alive at a time (one autograd.grad
    returning every layer's at once held a model's worth of (B, T, p) tensors). bk keeps per-unit
    gradients instead where they are smaller (here: 6·6 + 6 numbers per example against T·12)."""
    from dpnotes.privacy.rules.linear import LinearRule

    events = []
    for name in ("per_example_sq_norms", "per_example_grads"):
        def spy(self, module, saved, grad_output, trainable, _original=getattr(LinearRule, name), _name=name):
            events.append(_name)
            return _original(self, module, saved, grad_output, trainable)

        monkeypatch.setattr(LinearRule, name, spy)
    model = _Tower(events).double()
    data = make_batch(float_tokens, 3, 5)
    data["x"] = data["x"].double()
    per_example = per_example_gradients(model, probe_losses, data)
    ref_norms, ref_sum = clipped_sum_reference(per_example, 0.5)
    events.clear()

    result, clipped_sum = run_clipper(model, data, mode, 0.5)

    rule_call = "per_example_sq_norms" if mode == "ghost" else "per_example_grads"
    assert events[:4] == [rule_call] * 3 + ["reached the bottom layer"], events
    assert events[4] == rule_call
    torch.testing.assert_close(result.norms.double(), ref_norms, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(clipped_sum, ref_sum, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["ghost", "bk"])
@pytest.mark.parametrize("case", ["linear", "linear_ghost_path", "conv1d", "stack_of_families"])
def test_fp32_copies_made_one_example_at_a_time_change_nothing(case, mode, monkeypatch):
    """The linear rule upcasts activations and backprops a few examples at a time (an LM head's
    backprop is never copied to fp32 whole): with one example per chunk, norms and sums still
    equal the oracle, per example and per patient."""
    from dpnotes.privacy.rules import linear

    monkeypatch.setattr(linear, "FP32_CHUNK_BYTES", 1)
    build, make_input = CASES[case]
    model = Probe(build()).double()
    data = make_batch(make_input, 5, 4)
    data["x"] = data["x"].double() if data["x"].is_floating_point() else data["x"]
    per_example = per_example_gradients(model, probe_losses, data)
    for units in (None, torch.tensor([2, 0, 2, 1, 2])):
        ref_norms, ref_sum = clipped_sum_reference(per_example, 0.5, units)
        result, clipped_sum = run_clipper(model, data, mode, 0.5, units)
        torch.testing.assert_close(result.norms.double(), ref_norms, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(clipped_sum, ref_sum, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", ["linear", "linear_no_bias", "linear_ghost_path", "conv1d"])
def test_the_tensor_core_branch_of_the_bookkeeping_sum_equals_the_oracle(case, monkeypatch):
    """bf16 operands on CUDA form each example's gradient with fp32 accumulation and scale it by c_b in
    fp32 (scaling the bf16 backprop first would round it). CPU has no such matmul: here the branch
    runs with an fp32 stand-in for it, on layers that keep their inputs and backprops."""
    from dpnotes.privacy.rules import linear

    monkeypatch.setattr(linear, "tensor_cores", lambda *operands: True)
    monkeypatch.setattr(linear, "fp32_bmm", lambda x, y: torch.bmm(x.float(), y.float()))
    monkeypatch.setattr(linear.LinearRule, "per_example_grads", lambda self, *args: None)
    build, make_input = CASES[case]
    model = Probe(build()).double()
    data = make_batch(make_input, 5, 4)
    data["x"] = data["x"].double()
    per_example = per_example_gradients(model, probe_losses, data)
    for units in (None, torch.tensor([2, 0, 2, 1, 2])):
        ref_norms, ref_sum = clipped_sum_reference(per_example, 0.5, units)
        result, clipped_sum = run_clipper(model, data, "bk", 0.5, units)
        torch.testing.assert_close(result.norms.double(), ref_norms, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(clipped_sum, ref_sum, rtol=1e-4, atol=1e-7)
