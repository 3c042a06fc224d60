"""nn.Embedding: grad_E(b)[v] = Σ_{t: id_t = v} g_t, so ||grad_E(b)||² = Σ_{t,s: id_t = id_s} g_t·g_s.

Rows of `padding_idx` receive no gradient in torch, so their backprops are dropped.
"""
from __future__ import annotations

import torch
from torch import nn

from dpnotes.train.dp.rules.registry import NormRule, UnsupportedParameterError, register_norm_rule


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

    def _backprops(self, module, ids, grad_output):
        g = grad_output.float().reshape(ids.shape[0], ids.shape[1], -1)
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
