"""Time per DP step and peak memory: non-private vs dpnotes (ghost, book-keeping) vs Opacus 1.6,
in float32 and/or bfloat16 (the base model's dtype; LoRA adapters stay fp32).

    python bench/dp_step.py                               # tiny LLaMA + SmolLM2-135M, LoRA and full
    python bench/dp_step.py --models tiny-llama --steps 5
    python bench/dp_step.py --models smollm2-135m --setups demo --variants nonprivate dpnotes_bk \
        --dtypes float32 bfloat16 --batch 32 --seq 160 --micro-batch 16 --steps 2   # the demo's step

Each (model, setup, variant) runs in its own process so peak RSS is its own; variants of one
model/setup run back to back, in alternating order over rounds, and the table reports the
median over rounds as ratios to the non-private step of the same dtype measured in the same run.
Setups: "lora" (r 8 on q/v of every layer), "demo" (the trainable part of
train/configs/demo_smollm2.yaml: r 4 on q/v of the top 8 layers), "full" (every weight; SmolLM2's
embeddings are untied first: per-example norms of tied weights are refused).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ["nonprivate", "dpnotes_bk", "dpnotes_ghost", "opacus_ghost", "opacus_hooks"]
LORA_TARGETS = ["q_proj", "v_proj"]
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "demo_smollm2.yaml"


def build_model(name: str, setup: str, dtype: str):
    import torch
    from peft import LoraConfig, get_peft_model

    from dpnotes.models import load_causal_lm
    from dpnotes.training.config import load_config
    from dpnotes.training.model_setup import prepare_trainable, untie_word_embeddings
    from dpnotes.testing.tiny_models import tiny_llama

    if name == "tiny-llama":
        model = tiny_llama(vocab=512, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=256).to(getattr(torch, dtype))
    else:
        model, _ = load_causal_lm(name, dtype=getattr(torch, dtype), attn_implementation="eager")
    model.train()
    if setup == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0)
        return get_peft_model(model, config)
    if setup == "demo":
        return prepare_trainable(model, load_config(DEMO_CONFIG).trainable)
    untie_word_embeddings(model)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def token_losses(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="mean")


def worker(name: str, setup: str, variant: str, dtype: str, steps: int, batch_size: int, seq_len: int,
           micro_batch: int) -> dict:
    import torch

    from dpnotes.testing.tiny_models import random_batch

    torch.manual_seed(0)
    model = build_model(name, setup, dtype)
    vocab = model.config.vocab_size
    batch = random_batch(vocab=vocab, batch=batch_size, seq_len=seq_len, seed=0, pad_fraction=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step = make_step(variant, model, optimizer, batch, micro_batch)
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"step_s": statistics.median(times), "peak_rss_gb": peak_gb}


def make_step(variant, model, optimizer, batch, micro_batch):

    batch_size = batch["input_ids"].shape[0]
    if variant == "nonprivate":
        return mean_loss_step(model, optimizer, batch)
    if variant.startswith("dpnotes"):
        from dpnotes.privacy.backends import ReplicatedBackend
        from dpnotes.privacy.engine import PrivacyConfig, PrivacyEngine
        from dpnotes.privacy.losses import causal_lm_losses

        # q = 1: every step's logical batch is the whole batch, as for the others.
        config = PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size, steps=10**6,
                               clipping=variant.split("_")[1], micro_batch_size=micro_batch or batch_size, seed=0)
        engine = PrivacyEngine(model, config, num_units=batch_size)
        backend = ReplicatedBackend(model, optimizer)

        def fetch(indices):
            return {k: v[indices] for k, v in batch.items()}

        return lambda: engine.step(backend, fetch, causal_lm_losses)
    return make_opacus_step(variant, model, optimizer, batch)


def make_opacus_step(variant, model, optimizer, batch):
    import torch
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    batch_size = batch["input_ids"].shape[0]
    if variant == "opacus_ghost":
        module = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                      max_grad_norm=1.0, use_ghost_clipping=True)
        dp_optimizer = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
                                                       expected_batch_size=batch_size, loss_reduction="mean")
        criterion = DPLossFastGradientClipping(module, dp_optimizer, torch.nn.CrossEntropyLoss(), "mean")

        def step():
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            loss = criterion(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), shape=logits.shape)
            loss.backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)

        return step
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size)
    return mean_loss_step(module, dp_optimizer, batch)


def mean_loss_step(model, optimizer, batch):
    """A step on the batch-mean loss (non-private, or Opacus hooks whose optimizer clips and noises)."""

    def step():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_losses(logits, batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_variant(args, name, setup, variant, dtype) -> dict:
    command = [sys.executable, __file__, "--worker", name, setup, variant, dtype, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--micro-batch", str(args.micro_batch or args.batch)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    parser.add_argument("--setups", nargs="+", default=["lora", "full"], choices=["lora", "demo", "full"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, help="dpnotes' physical batch (default: the whole batch)")
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "SETUP", "VARIANT", "DTYPE"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.batch, args.seq, args.micro_batch)))
        return

    results = {}
    print(f"batch {args.batch} x {args.seq} tokens (micro-batches of {args.micro_batch or args.batch}), "
          f"{args.steps} timed steps, {args.rounds} rounds, CPU")
    print(f"{'model':14} {'setup':5} {'variant':14} {'dtype':9} {'s/step':>8} {'x non-priv':>10} {'peak GB':>8} {'x non-priv':>10}")
    cases = [(variant, dtype) for dtype in args.dtypes for variant in args.variants]
    for name in args.models:
        for setup in args.setups:
            runs: dict[tuple, list[dict]] = {case: [] for case in cases}
            for round_ in range(args.rounds):
                for case in cases if round_ % 2 == 0 else list(reversed(cases)):
                    runs[case].append(run_variant(args, name, setup, *case))
            for variant, dtype in cases:
                summary = summarize(runs[variant, dtype])
                results[f"{name}/{setup}/{variant}/{dtype}"] = summary
                base = summarize(runs.get(("nonprivate", dtype), []))
                print(format_row(name, setup, variant, dtype, summary, base), flush=True)
    if len(args.dtypes) == 2:
        print_speedups(results)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


def summarize(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"] if runs else "not run"}
    return {"step_s": statistics.median(r["step_s"] for r in good),
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in good)}


def format_row(name, setup, variant, dtype, summary, base) -> str:
    if "error" in summary:
        return f"{name:14} {setup:5} {variant:14} {dtype:9} failed: {summary['error']}"
    time_ratio = summary["step_s"] / base["step_s"] if "step_s" in base else float("nan")
    mem_ratio = summary["peak_rss_gb"] / base["peak_rss_gb"] if "peak_rss_gb" in base else float("nan")
    return (f"{name:14} {setup:5} {variant:14} {dtype:9} {summary['step_s']:8.3f} {time_ratio:10.2f} "
            f"{summary['peak_rss_gb']:8.2f} {mem_ratio:10.2f}")


def print_speedups(results: dict) -> None:
    """float32 and bfloat16 of each (model, setup, variant) side by side."""
    print(f"\n{'model / setup / variant':40} {'fp32 s/step':>11} {'bf16 s/step':>11} {'speed-up':>9}")
    for key in [k.removesuffix("/float32") for k in results if k.endswith("/float32")]:
        fp32, bf16 = results[f"{key}/float32"], results[f"{key}/bfloat16"]
        if "step_s" in fp32 and "step_s" in bf16:
            print(f"{key:40} {fp32['step_s']:11.2f} {bf16['step_s']:11.2f} {fp32['step_s'] / bf16['step_s']:8.2f}×")


if __name__ == "__main__":
    main()
