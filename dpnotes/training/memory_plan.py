"""Per-GPU memory planner for DP fine-tuning of LLaMA-family models (LoRA or full), by ZeRO stage.

    dpnotes train --dry-run --config train/configs/demo_smollm2.yaml   # plan for the run's config
    dpnotes train --dry-run model=llama-70b max_length=2048 dtype=bfloat16 privacy.micro_batch_size=1 \
        trainable.lora_rank=16 privacy.clipping=ghost                 # any preset (PRESETS) or HF folder
    dpnotes train --dry-run --gpu-memory-gb h200 ...                  # the card: h100 (80 GB), h200 (141 GB), or GB

Estimates, per GPU, in bytes (bf16 compute, fp32 master weights and Adam states):
  weights        2·P                   (ZeRO-3: /N; offload_param: 0)
  grads          2·P_t                 (ZeRO-2/3: /N)
  optimizer      12·P_t  fp32 master + Adam m, v   (ZeRO-1/2/3: /N; offload_optimizer: 0)
  activations    (no activation checkpointing unless asked) per token per layer 2·(8h + 3·kv + 4·I) bytes (inputs of norms, q/k/v/o, rotary
                 copies, SDPA output, SwiGLU gate/up/act/product; flash/SDPA attention, no
                 checkpointing) + logits b·T·V·(2 + 4 + 4) (bf16 logits, fp32 copy, fp32 grad)
  DP norm pass   the backprops of one clipped layer at a time (each is reduced as the pass reaches
                 it): max b·T·d_out·2, plus, under book-keeping on the DDP path, what every clipped
                 layer keeps for the clipped sum: the smaller of its per-example gradients
                 b·d_in·d_out·4 (LoRA factors) and its inputs and backprops b·T·(d_in + d_out)·2; plus the largest per-layer transient: ghost Gram matrices
                 2·b·T²·4 or the instantiated per-example gradient b·p·d·4, whichever the rule
                 picks (the smaller)
  ZeRO-3 gathers 2 layers of bf16 weights in flight (prefetch) + the embedding matrix
  overhead       CUDA context + allocator slack: 2 GiB + 10 %
  loading        held while the model loads, before training (the total is the larger of the two):
                 ZeRO-3 with zero3_init builds it partitioned and rank 0 copies the checkpoint in one
                 module at a time: 2·P/N + the largest module (the embedding, V·h) per GPU, and the
                 checkpoint (2·P) in rank 0's host RAM only. Otherwise every rank builds the whole
                 model in host RAM (2·P per rank; `host_load_per_node` sums a node's) and DeepSpeed
                 moves it to the GPU (2·P)

These are planning estimates (±20 %), not guarantees; measure before a long run.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

GiB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each linear in one decoder layer."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def params(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * per_layer + self.hidden


PRESETS = {
    "smollm2-135m": ModelShape(30, 576, 49152, 1536, 9, 3, tied=True),
    "llama-7b": ModelShape(32, 4096, 32000, 11008, 32, 32),
    "llama-13b": ModelShape(40, 5120, 32000, 13824, 40, 40),
    "llama-70b": ModelShape(80, 8192, 32000, 28672, 64, 8),
    "llama3-8b": ModelShape(32, 4096, 128256, 14336, 32, 8),
}


@dataclass(frozen=True)
class RunShape:
    seq: int = 2048
    micro_batch: int = 1
    lora_rank: int | None = 16  # None: full fine-tuning (untied embeddings, all params)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    clipping: str = "ghost"  # under DeepSpeed the norm pass is always ghost-style (+ one engine.backward)
    zero: int = 3  # 0 = DDP-style (replicated)
    offload: bool = False  # ZeRO-3 offload of params and optimizer states to CPU
    gpus: int = 8
    weight_bytes: int = 2  # bf16
    activation_checkpointing: bool = False  # TrainConfig.activation_checkpointing (non-reentrant, exact norms)
    zero3_init: bool = True  # ZeRO-3 builds the model partitioned (accelerate's zero3_init_flag)
    gpus_per_node: int = 8


def trainable_params(model: ModelShape, run: RunShape) -> int:
    if run.lora_rank is None:
        return model.params if not model.tied else model.params + model.vocab * model.hidden
    shapes = model.linear_shapes()
    return model.layers * sum(run.lora_rank * (shapes[t][0] + shapes[t][1]) for t in run.lora_targets)


def clipped_layers(model: ModelShape, run: RunShape) -> list[tuple[int, int]]:
    """(d_in, d_out) of every layer that has a norm rule to run, for one decoder layer."""
    shapes = model.linear_shapes()
    if run.lora_rank is None:
        return list(shapes.values())
    r = run.lora_rank
    return [pair for t in run.lora_targets for pair in ((shapes[t][0], r), (r, shapes[t][1]))]


def loading(model: ModelShape, run: RunShape) -> tuple[float, float]:
    """(bytes per GPU, host bytes per node) held while the model loads, before anything trains."""
    wb, p = run.weight_bytes, model.params
    ranks_here = min(run.gpus, run.gpus_per_node)
    if run.zero == 3 and run.zero3_init:
        # One module at a time is gathered whole while rank 0 copies its checkpoint values in.
        largest = max(model.vocab * model.hidden, *(a * b for a, b in model.linear_shapes().values()))
        partitions = wb * p / run.gpus
        if run.offload:  # zero.Init puts the partitions in host RAM straight away
            return wb * largest, wb * p + ranks_here * partitions
        return partitions + wb * largest, wb * p
    return wb * p, ranks_here * wb * p


def estimate(model: ModelShape, run: RunShape) -> dict[str, float]:
    """Bytes per GPU by component, and `total`."""
    n = run.gpus
    b, t, wb = run.micro_batch, run.seq, run.weight_bytes
    p, pt = model.params, trainable_params(model, run)
    stage = run.zero
    weights = 0.0 if run.offload else wb * p / (n if stage == 3 else 1)
    grads = wb * pt / (n if stage >= 2 else 1)
    optimizer = 0.0 if run.offload else 12 * pt / (n if stage >= 1 else 1)
    h, kv, i = model.hidden, model.kv_dim, model.intermediate
    per_layer_act = b * t * 2 * (8 * h + 3 * kv + 4 * i)
    if run.activation_checkpointing:  # layer inputs kept, one layer recomputed at a time
        layer_acts = model.layers * b * t * h * wb + per_layer_act
    else:
        layer_acts = model.layers * per_layer_act
    activations = layer_acts + b * t * model.vocab * (2 + 4 + 4)
    layers = clipped_layers(model, run)
    backprops = max(b * t * d_out * wb for _, d_out in layers)
    kept = 0.0
    if run.clipping == "bk" and stage == 0:  # rules.linear.LinearRule.per_example_grads decides
        kept = model.layers * sum(min(b * d_in * d_out * 4, b * t * (d_in + d_out) * wb) for d_in, d_out in layers)
    transient = max(min(2 * b * t * t * 4, b * d_in * d_out * 4) for d_in, d_out in layers)
    norm_pass = backprops + kept + transient
    gathers = 0.0
    if stage == 3:
        per_layer = sum(a * c for a, c in model.linear_shapes().values())
        gathers = wb * (2 * per_layer + model.vocab * h)
    subtotal = weights + grads + optimizer + activations + norm_pass + gathers
    load, host_load = loading(model, run)
    peak = max(subtotal, load)
    overhead = 2 * GiB + 0.10 * peak
    return {
        "weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations,
        "dp_norm_pass": norm_pass, "zero3_gathers": gathers, "load": load, "overhead": overhead,
        "total": peak + overhead, "host_load_per_node": host_load, "trainable_params": pt, "params": p,
    }


TOPOLOGIES = {"1x{gb}GB": 1, "8x{gb}GB": 8, "2 nodes x 8x{gb}GB": 16}  # labels, by the card's memory
STAGES = [(0, False), (1, False), (2, False), (3, False), (3, True)]
GPU_MEMORY_GB = {"h100": 80.0, "h200": 141.0}  # memory per card, as sold (10^9 bytes)


def gpu_memory_gb(text: str) -> float:
    """A card's memory from a preset name (GPU_MEMORY_GB) or a number of GB (argparse type)."""
    if text.lower() in GPU_MEMORY_GB:
        return GPU_MEMORY_GB[text.lower()]
    try:
        gb = float(text)
    except ValueError:
        gb = 0.0
    if not gb > 0:
        raise argparse.ArgumentTypeError(f"GPU memory must be a number of GB > 0 or one of {', '.join(GPU_MEMORY_GB)}, got {text!r}")
    return gb


def stage_name(stage: int, offload: bool) -> str:
    return "DDP-style" if stage == 0 else f"ZeRO-{stage}" + ("+offload" if offload else "")


def plan(model: ModelShape, run: RunShape, gpu_gb: float = 80.0, usable: float = 0.9) -> list[dict]:
    """For each topology of `gpu_gb` cards, every stage with its per-GPU total and whether it fits;
    `choice` is the cheapest fitting one (lowest stage: least communication; offload last)."""
    rows = []
    gpu_bytes = gpu_gb * 1e9
    for label, gpus in TOPOLOGIES.items():
        topo = label.format(gb=f"{gpu_gb:g}")
        options = []
        for stage, offload in STAGES:
            if gpus == 1 and stage in (1, 2, 3) and not offload:
                continue  # nothing to shard over on one GPU
            est = estimate(model, replace(run, zero=stage, offload=offload, gpus=gpus))
            options.append({"stage": stage_name(stage, offload), "total": est["total"], "fits": est["total"] <= usable * gpu_bytes})
        choice = next((o["stage"] for o in options if o["fits"]), None)
        rows.append({"topology": topo, "gpus": gpus, "options": options, "choice": choice})
    return rows


def format_plan(name: str, model: ModelShape, run: RunShape, gpu_gb: float = 80.0) -> str:
    pt = trainable_params(model, run)
    what = "full fine-tuning" if run.lora_rank is None else f"LoRA r={run.lora_rank} on {','.join(run.lora_targets)}"
    lines = [
        f"{name}: {model.params / 1e9:.2f}B params, {what} ({pt / 1e6:.1f}M trainable), "
        f"seq {run.seq}, micro-batch {run.micro_batch}, clipping {run.clipping}"
    ]
    for row in plan(model, run, gpu_gb):
        cells = ", ".join(f"{o['stage']} {o['total'] / GiB:.1f}G{'' if o['fits'] else ' ✗'}" for o in row["options"])
        lines.append(f"  {row['topology']:<17} -> {row['choice'] or 'does not fit'}   [{cells}]")
    detail = estimate(model, replace(run))
    parts = ", ".join(f"{k} {v / GiB:.2f}G" for k, v in detail.items() if k not in ("params", "trainable_params"))
    lines.append(f"  breakdown at {stage_name(run.zero, run.offload)} on {run.gpus} GPU(s): {parts}")
    return "\n".join(lines)


def shape_from_hf_config(cfg) -> ModelShape:
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = text.num_attention_heads
    return ModelShape(
        layers=text.num_hidden_layers, hidden=text.hidden_size, vocab=text.vocab_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        tied=bool(getattr(text, "tie_word_embeddings", False)),
    )


def shape_for(model: str) -> ModelShape:
    """A preset name, or anything `transformers.AutoConfig` can read (a folder, a hub id in cache)."""
    if model in PRESETS:
        return PRESETS[model]
    from transformers import AutoConfig

    from dpnotes.models import resolve_model

    try:
        source = resolve_model(model)
    except Exception:
        source = model
    return shape_from_hf_config(AutoConfig.from_pretrained(source))


def dry_run(config, gpus: int = 8, zero: int = 3, gpu_gb: float = 80.0) -> str:
    """The plan for a TrainConfig on cards of `gpu_gb` (dpnotes train --dry-run)."""
    trainable = config.trainable
    run = RunShape(
        seq=config.max_length, micro_batch=config.privacy.micro_batch_size,
        lora_rank=None if trainable.full_finetune else trainable.lora_rank,
        lora_targets=tuple(trainable.lora_targets), clipping=config.privacy.clipping, zero=zero, gpus=gpus,
        weight_bytes=2 if config.dtype == "bfloat16" else 4, activation_checkpointing=config.activation_checkpointing,
    )
    return format_plan(config.model, shape_for(config.model), run, gpu_gb)
