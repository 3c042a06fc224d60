"""Step time of DP vs non-private training under DeepSpeed ZeRO-2/3, measured side by side in one
launch (same processes, same engine, same micro-batches, alternating steps), printed as ratios.

    python bench/scale.py                       # ZeRO-2 and ZeRO-3 on 2 CPU processes, book-keeping, without and with activation checkpointing
    python bench/scale.py --clipping bk,ghost   # also the two-forward ghost path
    accelerate launch --config_file accelerate_configs/zero3.yaml bench/scale.py --worker --model PATH

A DP step = Poisson-sampled logical batch padded to the ranks' max micro-batch count; per
micro-batch with book-keeping ONE forward (autograd.grad to the layer outputs gives norms and
clipped sums) and one engine backward of the surrogate Σ_p <p, S_p>; with ghost a norm pass
(forward + autograd.grad) then the engine forward/backward of Σ c_i L_i; then the noisy
engine.step(). A non-private step = the same micro-batches, one engine forward/backward of the
mean loss each, engine.step() without noise.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIGS = {"zero2": "accelerate_configs/zero2_cpu_2proc.yaml", "zero3": "accelerate_configs/zero3_cpu_2proc.yaml"}


def worker(args) -> None:
    import torch

    from dpnotes.privacy.collectives import barrier
    from dpnotes.privacy.deepspeed import DeepSpeedBackend, zero_stage
    from dpnotes.privacy.engine import PrivacyConfig, PrivacyEngine
    from dpnotes.privacy.losses import causal_lm_losses
    from dpnotes.privacy.randomness import NormalDraws
    from dpnotes.training.config import TrainConfig
    from dpnotes.training.model_setup import TrainableConfig
    from dpnotes.training.setup import load_model, make_accelerator, make_backend, make_optimizer

    units = 512
    privacy = PrivacyConfig(
        target_epsilon=float("inf"), noise_multiplier=1.0, expected_batch_size=args.batch, steps=10**6,
        micro_batch_size=args.micro_batch, clipping=args.clipping, seed=0,
    )
    config = TrainConfig(model=args.model, output_dir=tempfile.mkdtemp(), report_to="none", learning_rate=1e-4,
                         trainable=TrainableConfig(lora_rank=8, lora_targets=["q_proj", "v_proj"]), privacy=privacy,
                         activation_checkpointing=args.activation_checkpointing == "on")
    accelerator = make_accelerator(config)
    model, _ = load_model(config, accelerator)
    engine = PrivacyEngine(model, privacy, units)
    backend = make_backend(accelerator, model, make_optimizer(model, config), privacy.micro_batch_size)
    assert isinstance(backend, DeepSpeedBackend), "launch with a DeepSpeed accelerate config"
    ds_model = backend.ds_engine
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (units, args.seq), generator=gen)

    def fetch(indices):
        ids = data[indices].to(accelerator.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def nonprivate_step():
        """The DP step's micro-batches (and padding), without norm pass, coefficients or noise."""
        local = list(engine.micro_batches(backend.rank, backend.world_size))
        count = backend.micro_batch_count(len(local))
        for k in range(count):
            indices = local[k][0] if k < len(local) else [0]
            ds_model.set_gradient_accumulation_boundary(k == count - 1)
            losses = causal_lm_losses(ds_model, fetch(indices))
            ds_model.backward(losses.mean() * (0.0 if k >= len(local) else 1.0), scale_wrt_gas=False)
        backend.optimizer.arm(0.0, NormalDraws(0, 0))  # σ = 0: nothing is drawn
        ds_model.step()
        backend.optimizer.disarm()

    def dp_step():
        engine.step(backend, fetch, causal_lm_losses)

    times = {"nonprivate": [], "dp": []}
    for step in range(args.warmup + args.steps):
        order = [("nonprivate", nonprivate_step), ("dp", dp_step)]
        if step % 2:
            order.reverse()
        for name, fn in order:
            barrier()
            start = time.perf_counter()
            fn()
            barrier()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    if backend.rank == 0:
        non, dpt = statistics.median(times["nonprivate"]), statistics.median(times["dp"])
        print(f"RESULT zero{zero_stage(accelerator)} {args.clipping} checkpointing {args.activation_checkpointing}: nonprivate {non:.4f} "
              f"s/step dp {dpt:.4f} s/step ratio {dpt / non:.2f}", flush=True)


def tiny_model(folder: Path, hidden: int, layers: int) -> str:
    from transformers import AutoTokenizer

    from dpnotes.models import resolve_model
    from dpnotes.testing.tiny_models import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    tiny_llama(vocab=len(tokenizer), hidden=hidden, layers=layers, heads=4, kv_heads=2,
               intermediate=2 * hidden, max_positions=512).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="run inside `accelerate launch`")
    parser.add_argument("--model", default=None, help="model folder/name (default: a tiny LLaMA built here)")
    parser.add_argument("--stages", default="zero2,zero3")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="expected logical batch (all ranks)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clipping", default="bk", help="bk, ghost or both (bk,ghost)")
    parser.add_argument("--activation-checkpointing", default="off,on",
                        help="off, on or both (off,on): rows without and with activation checkpointing")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp) / "tiny", args.hidden, args.layers)
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
        print(f"model {model} | seq {args.seq} | expected batch {args.batch} | micro-batch {args.micro_batch} | 2 CPU processes")
        rows = [(s, k, c) for s in args.stages.split(",") for k in args.clipping.split(",")
                for c in args.activation_checkpointing.split(",")]
        for stage, clipping, checkpointing in rows:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cmd = [
                str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", CPU_CONFIGS[stage],
                "--main_process_port", str(port), "bench/scale.py", "--worker", "--model", model,
                "--seq", str(args.seq), "--batch", str(args.batch), "--micro-batch", str(args.micro_batch),
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--activation-checkpointing", checkpointing,
                "--clipping", clipping,
            ]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("RESULT")]
            print(lines[0][7:] if lines else f"{stage} failed:\n{(proc.stdout + proc.stderr)[-3000:]}", flush=True)


if __name__ == "__main__":
    main()
