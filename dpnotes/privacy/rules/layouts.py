"""How some parents call their children: on tokens flattened to (B·T, d) batch-major (see
register_flat_tokens), or not at all, reading the children's parameters directly (see
register_direct_reader). Each entry was read in the library's source and is checked by the family
sweep (tests/test_dp_families.py).
"""
from dpnotes.privacy.rules.registry import register_direct_reader, register_flat_tokens

# OPTDecoderLayer: hidden_states.reshape(-1, hidden_states.size(-1)) before the feed-forward block.
register_flat_tokens("transformers.models.opt.modeling_opt.OPTDecoderLayer", "final_layer_norm", "fc1", "fc2")

# peft's LoRA on a bare nn.Parameter (MoE routers and fused experts under target_modules="all-linear")
# adds lora_B.weight @ lora_A.weight to the wrapped parameter instead of calling lora_A / lora_B.
register_direct_reader("peft.tuners.lora.layer.ParamWrapper")
# peft's LoRA on nn.MultiheadAttention merges lora_B.weight @ lora_A.weight into the projection weights.
register_direct_reader("peft.tuners.lora.layer.MultiheadAttention")
