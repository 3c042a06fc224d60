"""nn.Linear (also the LoRA A/B factors, which are nn.Linear) and GPT-2's Conv1D (transposed weight).

grad_W(b) = Σ_t g_bt a_btᵀ. Its squared norm is either the ghost norm Σ_ts (a_t·a_s)(g_t·g_s),
costing O(T²) memory per example, or the instantiated (p × d) gradient; we pick the smaller,
as in mixed ghost clipping (Bu et al. 2022): ghost when 2T² < p·d. For book-keeping, a layer whose
per-example gradients take fewer bytes than its activations and backprops (4·p·d in fp32 against
T·(p + d) in the model's dtype: LoRA factors) has them instantiated in the norm pass, which then
frees the rest.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dpnotes.privacy.rules.registry import NormRule, as_tokens, register_norm_rule

# fp32 copies of bf16/fp16 activations and backprops are made a few examples at a time, at most about
# this many bytes: an LM head's (B, T, V) backprop is never copied whole (16.8 GB in fp32 at B = 8,
# T = 4,096, V = 128k). The upcast is exact and the chunks only split the sum over examples.
FP32_CHUNK_BYTES = 2**28


def example_chunks(*tensors: torch.Tensor, extra: int = 0) -> Iterator[slice]:
    """Slices of the leading (example) axis whose fp32 copies of `tensors`, plus `extra` fp32 numbers
    per example, take ~FP32_CHUNK_BYTES."""
    per_example = 4 * (sum(t[0].numel() for t in tensors) + extra)
    step = max(1, FP32_CHUNK_BYTES // max(per_example, 1))
    for start in range(0, tensors[0].shape[0], step):
        yield slice(start, start + step)


def tensor_cores(*operands: torch.Tensor) -> bool:
    """bf16/fp16 operands on CUDA: matmuls take them as they are and accumulate in fp32."""
    return all(t.is_cuda and t.dtype == operands[0].dtype for t in operands) and operands[0].dtype in (torch.bfloat16, torch.float16)


def fp32_bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batched x @ y with an fp32 result, from the operands as they are. bf16/fp16 operands on CUDA
    go to the tensor cores with fp32 accumulation (bmm's out_dtype) instead of being copied to fp32
    first; elsewhere (CPU has no such kernel) they are upcast. The product of two bf16 (or fp16)
    numbers is exact in fp32, so both ways give the fp32 product of the same numbers."""
    if tensor_cores(x, y):
        return torch.bmm(x, y, out_dtype=torch.float32)
    return torch.bmm(x.float(), y.float())


def weight_sq_norms(activations: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Per-example ||Σ_t g_t a_tᵀ||²_F for activations (B, T, d) and backprops (B, T, p), fp32."""
    tokens, d, p = activations.shape[1], activations.shape[2], backprops.shape[2]
    out = torch.empty(activations.shape[0], device=activations.device, dtype=torch.float32)
    for rows in example_chunks(activations, backprops):
        a, g = activations[rows], backprops[rows]
        if 2 * tokens * tokens < p * d:
            out[rows] = (fp32_bmm(a, a.transpose(1, 2)) * fp32_bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
        else:
            out[rows] = fp32_bmm(g.transpose(1, 2), a).square().sum(dim=(1, 2))
    return out


# FalconLinear overrides forward with `input @ W.T (+ b)`: the same map as nn.Linear.
@register_norm_rule(nn.Linear, Conv1D, "transformers.models.falcon.modeling_falcon.FalconLinear")
class LinearRule(NormRule):
    def capture(self, module, layer_input):
        return as_tokens(layer_input.detach())

    def per_example_sq_norms(self, module, saved, grad_output, trainable):
        grad_output = as_tokens(grad_output)
        sq = torch.zeros(saved.shape[0], device=saved.device, dtype=torch.float32)
        if "weight" in trainable:
            sq += weight_sq_norms(saved, grad_output)
        if "bias" in trainable:
            sq += _token_sums(grad_output).square().sum(dim=1)
        return sq

    def per_example_grads(self, module, saved, grad_output, trainable):
        grad_output = as_tokens(grad_output)
        tokens, d, p = saved.shape[1], saved.shape[2], grad_output.shape[2]
        fp32_bytes = 4 * (("weight" in trainable) * p * d + ("bias" in trainable) * p)
        if fp32_bytes > tokens * (d * saved.element_size() + p * grad_output.element_size()):
            return None  # a full-size layer: its inputs and backprops are the smaller
        grads = {}
        if "weight" in trainable:
            weight = grad_output.new_empty(saved.shape[0], p, d, dtype=torch.float32)
            for rows in example_chunks(saved, grad_output):
                weight[rows] = fp32_bmm(grad_output[rows].transpose(1, 2), saved[rows])
            grads["weight"] = weight.transpose(1, 2) if isinstance(module, Conv1D) else weight
        if "bias" in trainable:
            grads["bias"] = _token_sums(grad_output)
        return grads

    def clipped_grads(self, module, saved, grad_output, coef, trainable):
        grad_output = as_tokens(grad_output)
        exact_per_example = "weight" in trainable and tensor_cores(grad_output, saved)
        sums = {}
        extra = grad_output.shape[2] * saved.shape[2] if exact_per_example else 0  # each example's (p, d) gradient
        for rows in example_chunks(saved, grad_output, extra=extra):
            c = coef[rows].float()
            if "weight" in trainable:
                if exact_per_example:
                    # Scaling a bf16 backprop by c would round it: each example's gradient is formed
                    # exactly (fp32 accumulation) and scaled in fp32 instead.
                    part = torch.tensordot(c, fp32_bmm(grad_output[rows].transpose(1, 2), saved[rows]), dims=1)
                else:
                    part = torch.einsum("btp,btd->pd", grad_output[rows].float() * c[:, None, None], saved[rows].float())
                sums["weight"] = sums["weight"] + part if "weight" in sums else part
            if "bias" in trainable:
                part = (grad_output[rows].float().sum(dim=1) * c[:, None]).sum(dim=0)
                sums["bias"] = sums["bias"] + part if "bias" in sums else part
        if "weight" in sums and isinstance(module, Conv1D):
            sums["weight"] = sums["weight"].t()
        return sums


def _token_sums(grad_output: torch.Tensor) -> torch.Tensor:
    """(B, p) fp32 sums over tokens: the per-example bias gradients."""
    sums = grad_output.new_empty(grad_output.shape[0], grad_output.shape[2], dtype=torch.float32)
    for rows in example_chunks(grad_output):
        sums[rows] = grad_output[rows].float().sum(dim=1)
    return sums
