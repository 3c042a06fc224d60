"""Measured figures for the eval issue (not a test; CPU, minutes).

  MTSamples (top-10 specialties, document-type pseudo-specialties excluded, one note per distinct
  text, split by text 80/10/10): TF-IDF coder and MiniLM coder micro-F1 with 95% bootstrap CIs.
  CMC-2007 radiology (ICD-9-CM, split by patient 80/10/10): DP-LoRA MiniLM at ε ∈ {1, 10, ∞},
  weighted-F1 on the real test notes.

  python bench/eval_mtsamples.py --part all --out-dir /tmp/dpnotes_eval_bench
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from dpnotes.evaluation.cli import _jsonable
from dpnotes.evaluation.coders import EncoderCoder, TfidfCoder, evaluate_coder
from dpnotes.evaluation.dp_sweep import dp_epsilon_sweep, parse_epsilon

from dpnotes.corpus import read_cmc2007, read_mtsamples, split_by_patient
from dpnotes.corpus.code_lists import public_label_space

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def summary(result: dict, metric: str = "micro_f1") -> str:
    lo, hi = result.get("ci", {}).get(metric, (float("nan"), float("nan")))
    return f"{metric} {result['metrics'][metric]:.4f} [95% CI {lo:.4f}, {hi:.4f}]"


def mtsamples(args) -> dict:
    notes = read_mtsamples(args.data / "mtsamples.csv", top_k_labels=10, exclude_document_types=True)
    split = split_by_patient(notes, seed=0)  # each distinct text is its own patient: a split by text
    train, dev, test = split["train"], split["dev"], split["test"]
    log(f"MTSamples: {len(notes)} notes → {len(train)}/{len(dev)}/{len(test)}")
    out = {"data": {"notes": len(notes), "train": len(train), "dev": len(dev), "test": len(test)}}
    started = time.perf_counter()
    tfidf_coder = TfidfCoder()
    tfidf = evaluate_coder(tfidf_coder, train, dev, test, n_bootstrap=1000)
    tfidf["seconds"], tfidf["C"] = time.perf_counter() - started, tfidf_coder.c_
    log(f"TF-IDF: {summary(tfidf)}; C={tfidf['C']} ({tfidf['seconds']:.0f}s)")
    out["tfidf"] = tfidf
    if not args.skip_minilm:
        started = time.perf_counter()
        coder = EncoderCoder("minilm", head="mean", max_length=args.max_length, epochs=args.epochs, batch_size=16,
                             lr=args.lr, head_lr=1e-3, log=log)
        minilm = evaluate_coder(coder, train, dev, test, n_bootstrap=1000)
        minilm["seconds"] = time.perf_counter() - started
        minilm["history"] = coder.history_
        minilm["config"] = {"max_length": args.max_length, "epochs": args.epochs, "lr": args.lr, "head": "mean"}
        log(f"MiniLM: {summary(minilm)} ({minilm['seconds']:.0f}s)")
        out["minilm"] = minilm
    return out


def cmc(args) -> dict:
    notes = read_cmc2007(args.data / "cmc2007_radiology_icd9.xml")
    split = split_by_patient(notes, seed=0)
    train, dev, test = split["train"], split["dev"], split["test"]
    log(f"CMC-2007: {len(notes)} notes → {len(train)}/{len(dev)}/{len(test)}")
    started = time.perf_counter()
    sweep = dp_epsilon_sweep(train, dev, test, public_label_space("cmc2007"),
                             [parse_epsilon(e) for e in args.epsilons.split(",")], n_bootstrap=1000,
                             log=log, model="minilm", steps=args.dp_steps, expected_batch_size=args.dp_batch,
                             micro_batch_size=32, learning_rate=args.dp_lr, max_length=64, max_grad_norm=1.0)
    sweep["seconds"] = time.perf_counter() - started
    for eps, result in sweep["by_epsilon"].items():
        log(f"DP-LoRA ε={eps}: {summary(result, 'weighted_f1')} σ={result['privacy']['noise_multiplier']:.3g} "
            f"ε spent={result['privacy']['epsilon_spent']:.3g} ({result['privacy']['train_seconds_nonprivate']:.0f}s train)")
    sweep["data"] = {"notes": len(notes), "train": len(train), "dev": len(dev), "test": len(test)}
    return sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("mtsamples", "cmc", "all"), default="all")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/dpnotes_eval_bench"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on busy shared cores)")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epsilons", default="1,10,inf")
    parser.add_argument("--dp-steps", type=int, default=60)
    parser.add_argument("--dp-batch", type=int, default=64)
    parser.add_argument("--dp-lr", type=float, default=5e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.part in ("mtsamples", "all"):
        result = mtsamples(args)
        (args.out_dir / "mtsamples.json").write_text(json.dumps(_jsonable(result), indent=2))
    if args.part in ("cmc", "all"):
        result = cmc(args)
        (args.out_dir / "cmc_dp.json").write_text(json.dumps(_jsonable(result), indent=2))
    log(f"results in {args.out_dir}")


if __name__ == "__main__":
    main()
