"""Choosing what a DP run trains: LoRA adapters (default) or all parameters."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from dpnotes.privacy.deepspeed import whole


@dataclass
class TrainableConfig:
    full_finetune: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Adapt only the top N decoder layers (None: all). Below the lowest adapted layer nothing needs a
    # gradient, so backward stops there (no activation gradients through the frozen lower layers).
    lora_top_layers: int | None = None
    untie_embeddings: bool = True  # full fine-tuning only: tied weights have no per-example rule


def untie_word_embeddings(model: PreTrainedModel) -> None:
    """Give the output head its own copy of the input embedding matrix.

    The per-example gradient of a tied matrix is the sum over both uses, which the norm rules do
    not cover; after untying each copy is clipped as its own parameter (same start, and both
    still count towards one per-example norm).
    """
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    if head is None or head.weight is not embeddings.weight:
        return
    with whole([embeddings.weight]):  # DeepSpeed partitions the new copy when it takes the model over
        head.weight = nn.Parameter(embeddings.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def prepare_trainable(model: PreTrainedModel, config: TrainableConfig) -> nn.Module:
    """Wrap with LoRA adapters, or unfreeze everything (untying embeddings if asked)."""
    if config.full_finetune:
        if config.untie_embeddings:
            untie_word_embeddings(model)
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    layers = None
    if config.lora_top_layers is not None:
        depth = model.config.get_text_config().num_hidden_layers
        if not 0 < config.lora_top_layers <= depth:
            raise ValueError(f"trainable.lora_top_layers must be in [1, {depth}] for this model, got {config.lora_top_layers}")
        layers = list(range(depth - config.lora_top_layers, depth))
    lora = LoraConfig(
        r=config.lora_rank,
        layers_to_transform=layers,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets,
        task_type="CAUSAL_LM",
    )
    return require_fp32_trainable(get_peft_model(model, lora))


def require_fp32_trainable(model: nn.Module) -> nn.Module:
    """LoRA adapters are the optimizer's only copy of what is trained: in bf16, Adam's small updates
    would round away. peft keeps them fp32 over a bf16 base (autocast_adapter_dtype); this fails
    loudly should a version stop doing so."""
    low = [name for name, param in model.named_parameters() if param.requires_grad and param.dtype != torch.float32]
    if low:
        raise RuntimeError(f"trainable parameters must be float32, these are not: {', '.join(low[:5])}")
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant: the forward keeps its graph (only the
    saved activations are dropped and recomputed in backward), so the clipper's recorded outputs
    and layer inputs are those of the forward and the norms stay exact. The reentrant kind runs the
    forward without a graph and is refused by the clipper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, also when ZeRO-3 has partitioned them (ds_numel)."""

    def numel(param: nn.Parameter) -> int:
        return getattr(param, "ds_numel", param.numel())

    return sum(numel(p) for p in model.parameters() if p.requires_grad), sum(numel(p) for p in model.parameters())


__all__ = ["TrainableConfig", "count_trainable", "prepare_trainable", "untie_word_embeddings"]
