"""LayerNorm and RMSNorm: y = w ⊙ n(x) (+ b), so grad_w(b) = Σ_t g_t ⊙ n(x_t) and grad_b(b) = Σ_t g_t.

n(x) is recomputed from the input and the module's eps, never from the weight. The same holds for
Gemma-style (1 + w) ⊙ n(x). Every HF model family declares its own RMSNorm class: each one below
was read (its forward is w ⊙ n(x) or (1 + w) ⊙ n(x) with n(x) = x / √(mean(x²) + eps) over the
weight's shape) and is checked against the batch-size-1 oracle in tests/test_norm_rules.py. A
family not listed is refused until it is added here and to that test.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpnotes.privacy.rules.registry import NormRule, full_shape, register_norm_rule


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


HF_RMS_NORMS = tuple(
    f"transformers.models.{name}"
    for name in (
        "llama.modeling_llama.LlamaRMSNorm",
        "qwen2.modeling_qwen2.Qwen2RMSNorm",
        "qwen3.modeling_qwen3.Qwen3RMSNorm",
        "mistral.modeling_mistral.MistralRMSNorm",
        "mixtral.modeling_mixtral.MixtralRMSNorm",
        "phi3.modeling_phi3.Phi3RMSNorm",
        "olmo2.modeling_olmo2.Olmo2RMSNorm",
        "qwen2_moe.modeling_qwen2_moe.Qwen2MoeRMSNorm",
        "qwen3_moe.modeling_qwen3_moe.Qwen3MoeRMSNorm",
        "olmoe.modeling_olmoe.OlmoeRMSNorm",
        "smollm3.modeling_smollm3.SmolLM3RMSNorm",
        "granite.modeling_granite.GraniteRMSNorm",
        "gemma.modeling_gemma.GemmaRMSNorm",
        "gemma2.modeling_gemma2.Gemma2RMSNorm",
        "gemma3.modeling_gemma3.Gemma3RMSNorm",
    )
)


@register_norm_rule(nn.RMSNorm, *HF_RMS_NORMS)
class RMSNormRule(ElementwiseAffineRule):
    param_names = ("weight",)

    def normalize(self, module, x):
        eps = getattr(module, "variance_epsilon", None)
        if eps is None:
            eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        features = full_shape(module.weight)
        dims = tuple(range(-len(features), 0))
        return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
