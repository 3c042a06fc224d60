"""nn.Embedding: grad_E(b)[v] = Σ_{t: id_t = v} g_t, so ||grad_E(b)||² = Σ_{t,s: id_t = id_s} g_t·g_s.

Rows of `padding_idx` receive no gradient in torch, so their backprops are dropped. Subclasses
that change the forward have rules of their own below.
"""
from __future__ import annotations

import torch
from torch import nn

from dpnotes.privacy.rules.registry import NormRule, UnsupportedParameterError, register_norm_rule


@register_norm_rule(nn.Embedding)
class EmbeddingRule(NormRule):
    param_names = ("weight",)

    def capture(self, module, layer_input):
        if module.sparse or module.scale_grad_by_freq or module.max_norm is not None:
            raise UnsupportedParameterError(
                f"{type(module).__name__} with sparse/scale_grad_by_freq/max_norm has no exact per-example rule"
            )
        ids = layer_input.detach()
        return ids.unsqueeze(1) if ids.dim() == 1 else ids.flatten(1)

    def output_scale(self, module) -> float | torch.Tensor:
        """d output / d W[id]: 1 for a plain embedding."""
        return 1.0

    def _backprops(self, module, ids, grad_output):
        g = grad_output.float().reshape(ids.shape[0], ids.shape[1], -1) * self.output_scale(module)
        if module.padding_idx is not None:
            g = g * (ids != module.padding_idx).unsqueeze(-1)
        return g

    def per_example_sq_norms(self, module, saved, grad_output, trainable):
        g = self._backprops(module, saved, grad_output)
        same_token = saved.unsqueeze(2) == saved.unsqueeze(1)
        return (torch.bmm(g, g.transpose(1, 2)) * same_token).sum(dim=(1, 2))

    def clipped_grads(self, module, saved, grad_output, coef, trainable):
        g = self._backprops(module, saved, grad_output) * coef.float()[:, None, None]
        weight_grad = torch.zeros(module.num_embeddings, g.shape[-1], device=g.device, dtype=torch.float32)
        weight_grad.index_add_(0, saved.reshape(-1), g.reshape(-1, g.shape[-1]))
        return {"weight": weight_grad}


@register_norm_rule(
    "transformers.models.gemma.modeling_gemma.GemmaTextScaledWordEmbedding",
    "transformers.models.gemma2.modeling_gemma2.Gemma2TextScaledWordEmbedding",
    "transformers.models.gemma3.modeling_gemma3.Gemma3TextScaledWordEmbedding",
)
class ScaledEmbeddingRule(EmbeddingRule):
    """Gemma: output = W[id] · s with s = √hidden cast to the weight's dtype (a buffer, never the
    partitioned weight), so each backprop is scaled by s."""

    def output_scale(self, module):
        return module.embed_scale.to(module.weight.dtype).float()


@register_norm_rule("transformers.models.opt.modeling_opt.OPTLearnedPositionalEmbedding")
class OPTPositionRule(EmbeddingRule):
    """OPT's learned positions: forward(attention_mask, cache_length=0, position_ids=None) looks up
    ids = position_ids + 2, with position_ids = cumsum(mask)·mask − 1 (cut at cache_length) when
    none are given. The ids are rebuilt here exactly as that forward builds them."""

    def layer_input(self, module, args, kwargs):
        names = ("attention_mask", "cache_length", "position_ids")
        bound = {**dict(zip(names, args)), **kwargs}
        position_ids = bound.get("position_ids")
        if position_ids is None:
            mask = bound["attention_mask"]
            position_ids = (torch.cumsum(mask, dim=1) * mask - 1).long()[:, bound.get("cache_length", 0) :]
        return position_ids + module.offset
