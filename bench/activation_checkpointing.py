"""Activation checkpointing under DP: memory a step adds and time per step, with and without it,
side by side in one run (non-private, book-keeping, ghost), on SmolLM2-135M at 512 tokens.

    python bench/activation_checkpointing.py
    python bench/activation_checkpointing.py --model tiny-llama --seq 128 --batch 4

Each row runs in its own process. "Step memory" is the peak resident memory above what the process
held with the model, optimizer and batch in place after a warm-up step (the peak is reset there
through /proc/self/clear_refs), so the weights, identical in every row, do not dilute the ratio.
Checkpointing is transformers' non-reentrant one (TrainConfig.activation_checkpointing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("nonprivate", "bk", "ghost")
# Every tensor buffer mmap'ed, so a freed one leaves the resident set at once: without this glibc
# keeps freed heap for reuse, and a step after the warm-up would show no memory at all.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def memory_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(model_name: str, setup: str, variant: str, checkpointing: bool, batch_size: int, seq: int, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the model and step of bench/dp_step.py
    from dp_step import build_model, make_step
    from dpnotes.training.model_setup import enable_activation_checkpointing
    from dpnotes.testing.tiny_models import random_batch

    torch.manual_seed(0)
    model = build_model(model_name, setup)
    if checkpointing:
        enable_activation_checkpointing(model)
    batch = random_batch(vocab=model.config.vocab_size, batch=batch_size, seq_len=seq, seed=0, pad_fraction=0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = make_step("nonprivate" if variant == "nonprivate" else f"dpnotes_{variant}", model, optimizer, batch)
    step()  # warm-up: optimizer state and the clipper's first-batch check are allocated here
    Path("/proc/self/clear_refs").write_text("5")
    baseline = memory_mb("VmRSS")
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"step_s": statistics.median(times), "step_mb": memory_mb("VmHWM") - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--setup", default="lora", choices=["lora", "full"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "CHECKPOINTING"))
    args = parser.parse_args()
    if args.worker:
        variant, checkpointing = args.worker[0], args.worker[1] == "on"
        print(json.dumps(worker(args.model, args.setup, variant, checkpointing, args.batch, args.seq, args.steps)))
        return
    rows = {}
    for variant in VARIANTS:
        for checkpointing in ("off", "on"):
            command = [sys.executable, __file__, "--worker", variant, checkpointing, "--model", args.model,
                       "--setup", args.setup, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True, env=WORKER_ENV)
            if done.returncode != 0:
                sys.exit(f"{variant}/{checkpointing} failed: {done.stderr.strip().splitlines()[-1]}")
            rows[variant, checkpointing] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps({"variant": variant, "checkpointing": checkpointing, **rows[variant, checkpointing]}), flush=True)
    print(f"\n{args.model} {args.setup}, batch {args.batch} × {args.seq} tokens, CPU\n")
    print("| step | checkpointing | s/step | step memory MB | memory ÷ without | time ÷ without |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (variant, checkpointing), row in rows.items():
        without = rows[variant, "off"]
        print(f"| {variant} | {checkpointing} | {row['step_s']:.2f} | {row['step_mb']:.0f} | "
              f"{row['step_mb'] / without['step_mb']:.2f} | {row['step_s'] / without['step_s']:.2f} |")


if __name__ == "__main__":
    main()
