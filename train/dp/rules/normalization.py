"""LayerNorm and RMSNorm: y = w ⊙ n(x) (+ b), so grad_w(b) = Σ_t g_t ⊙ n(x_t) and grad_b(b) = Σ_t g_t.

n(x) is recomputed from the input and the module's eps, never from the weight. The same holds for
Gemma-style (1 + w) ⊙ n(x). RMSNorm classes are re-declared by every HF model family (LlamaRMSNorm,
Qwen2RMSNorm, ...), so they are matched by structure rather than listed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpnotes.train.dp.rules.registry import NormRule, full_shape, register_norm_rule


class ElementwiseAffineRule(NormRule):
    def normalize(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def capture(self, module, layer_input):
        x = layer_input.detach().float()
        features = full_shape(module.weight)
        normalized = self.normalize(module, x)
        return normalized.reshape(x.shape[0], -1, *features).flatten(2)

    def _per_example_grads(self, saved, grad_output, trainable):
        g = grad_output.float().reshape(saved.shape)
        grads = {}
        if "weight" in trainable:
            grads["weight"] = (g * saved).sum(dim=1)
        if "bias" in trainable:
            grads["bias"] = g.sum(dim=1)
        return grads

    def per_example_sq_norms(self, module, saved, grad_output, trainable):
        grads = self._per_example_grads(saved, grad_output, trainable)
        return sum(grad.square().sum(dim=1) for grad in grads.values())

    def clipped_grads(self, module, saved, grad_output, coef, trainable):
        grads = self._per_example_grads(saved, grad_output, trainable)
        shape = full_shape(module.weight)
        return {name: (coef.float() @ grad).reshape(shape) for name, grad in grads.items()}


@register_norm_rule(nn.LayerNorm)
class LayerNormRule(ElementwiseAffineRule):
    def normalize(self, module, x):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, nn.Parameter)
        and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))
    )


@register_norm_rule(nn.RMSNorm, matcher=_is_rms_norm)
class RMSNormRule(ElementwiseAffineRule):
    param_names = ("weight",)

    def normalize(self, module, x):
        eps = getattr(module, "variance_epsilon", None)
        if eps is None:
            eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        features = full_shape(module.weight)
        dims = tuple(range(-len(features), 0))
        return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
