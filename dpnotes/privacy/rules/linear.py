"""nn.Linear (also the LoRA A/B factors, which are nn.Linear) and GPT-2's Conv1D (transposed weight).

grad_W(b) = Σ_t g_bt a_btᵀ. Its squared norm is either the ghost norm Σ_ts (a_t·a_s)(g_t·g_s),
costing O(T²) memory per example, or the instantiated (p × d) gradient; we pick the smaller,
as in mixed ghost clipping (Bu et al. 2022): ghost when 2T² < p·d.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dpnotes.privacy.rules.registry import NormRule, as_tokens, register_norm_rule


def weight_sq_norms(activations: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Per-example ||Σ_t g_t a_tᵀ||²_F for activations (B, T, d) and backprops (B, T, p), fp32."""
    a, g = activations.float(), backprops.float()
    tokens, d, p = a.shape[1], a.shape[2], g.shape[2]
    if 2 * tokens * tokens < p * d:
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
    return torch.bmm(g.transpose(1, 2), a).square().sum(dim=(1, 2))


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
            sq += grad_output.float().sum(dim=1).square().sum(dim=1)
        return sq

    def clipped_grads(self, module, saved, grad_output, coef, trainable):
        g = as_tokens(grad_output).float() * coef.float()[:, None, None]
        grads = {}
        if "weight" in trainable:
            weight_grad = torch.einsum("btp,btd->pd", g, saved.float())
            grads["weight"] = weight_grad.t() if isinstance(module, Conv1D) else weight_grad
        if "bias" in trainable:
            grads["bias"] = g.sum(dim=(0, 1))
        return grads
