"""Per-example gradient-norm rules, one file per layer family, registered by module class.

A rule turns what a layer saw in the forward pass (its input) and in the backward pass (the
gradient of its output) into per-example squared gradient norms and, for book-keeping clipping,
into the clipped-and-summed gradient. Rules never read the weight tensor: under ZeRO-3 it is
partitioned, while inputs and output gradients are always whole.
"""
from dpnotes.privacy.rules.registry import (
    NormRule,
    UnsupportedParameterError,
    flattens_tokens,
    reads_children_directly,
    register_direct_reader,
    register_flat_tokens,
    register_norm_rule,
    rule_for,
    why_no_rule,
)

# Importing the families registers them.
from dpnotes.privacy.rules import embedding, layouts, linear, normalization  # noqa: E402,F401

__all__ = [
    "NormRule", "UnsupportedParameterError", "flattens_tokens", "reads_children_directly", "register_direct_reader",
    "register_flat_tokens", "register_norm_rule", "rule_for", "why_no_rule",
]
