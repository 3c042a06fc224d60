"""Training data at scale, side by side in one run: note-by-note tokenization into Python lists (the
old path) against the Arrow table (first preparation, then a cached re-launch that memory-maps it),
on a default corpus of --notes notes at each --max-length, with SmolLM2's tokenizer.

    python bench/data.py --notes 300000 --max-length 512 2048

Each measurement runs in a fresh process, as a launch would: "ready" is from the Parquet corpus to
a table training can sample from (lists: read and tokenize; Arrow, first: stream the file into the
corpus cache, tokenize by batched map into the token cache; Arrow, cached: find the tokens by the
file's fingerprint and memory-map them, reading no note). "iterate" collates --batches random batches of 8; "RSS added" is the process's
peak resident memory above what it held with the tokenizer loaded, "private" the anonymous part of
it at the end: the rest is pages of the memory-mapped cache, page cache that the ranks share.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from dpnotes.corpus import corpus_fingerprint, corpus_table, generate_default_corpus, read_notes, write_notes
from dpnotes.models import resolve_model
from dpnotes.prompting import prompt_format_for
from dpnotes.testing.reference_tokenization import tokenize_note_by_note
from dpnotes.prompting import IGNORE_INDEX
from dpnotes.tokenized_notes import load_tokenized

VARIANTS = ("lists", "arrow, first", "arrow, cached")


def memory_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def collate_lists(examples, indices, pad: int) -> dict:
    width = max(len(examples[i][0]) for i in indices)
    ids = torch.full((len(indices), width), pad, dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
    for row, index in enumerate(indices):
        tokens, targets = examples[index]
        ids[row, : len(tokens)], labels[row, : len(tokens)] = torch.tensor(tokens), torch.tensor(targets)
    return {"input_ids": ids, "labels": labels}


def measure(variant: str, corpus: Path, max_length: int, cache: Path, batches: int) -> dict:
    """One measurement, in this (fresh) process: from the corpus file to a training-ready table."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    prompt = prompt_format_for("default")
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts here: the tokenizer is not counted
    baseline, baseline_private = memory_mb("VmRSS"), memory_mb("RssAnon")
    started = time.perf_counter()
    if variant == "lists":
        examples = tokenize_note_by_note(read_notes(corpus), tokenizer, max_length, prompt)
        size, fetch = len(examples), lambda indices: collate_lists(examples, indices, tokenizer.pad_token_id)
    else:  # the training path: the caches are keyed by the file's fingerprint, the notes read on a miss only
        data = load_tokenized(corpus_fingerprint(str(corpus)), lambda: corpus_table(str(corpus), cache / "corpus"),
                              tokenizer, max_length, prompt, cache / "tokenized")
        size, fetch = len(data), data.collate
    prepared = time.perf_counter()
    rng = random.Random(0)
    tokens = 0
    for _ in range(batches):
        tokens += int((fetch(rng.sample(range(size), 8))["labels"] != IGNORE_INDEX).sum())
    iterated = time.perf_counter()
    peak = memory_mb("VmHWM")
    return {"variant": variant, "max_length": max_length, "ready_s": prepared - started,
            "iterate_s": iterated - prepared, "rss_added_mb": peak - baseline,
            "private_added_mb": memory_mb("RssAnon") - baseline_private, "notes": size}


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notes", type=int, default=300_000)
    parser.add_argument("--max-length", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement as JSON
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.corpus, args.max_length[0], args.cache, args.batches)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.parquet"
        started = time.perf_counter()
        notes = generate_default_corpus(n_patients=args.notes // 2 + 1000, seed=0)[: args.notes]
        write_notes(notes, corpus)
        print(f"{len(notes):,} default-corpus notes written to Parquet in {time.perf_counter() - started:.0f} s", flush=True)
        del notes
        rows = []
        for max_length in args.max_length:
            cache = scratch / f"cache_{max_length}"
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--worker", variant, "--corpus", str(corpus), "--cache", str(cache),
                           "--max-length", str(max_length), "--batches", str(args.batches)]
                result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                result["cache_mb"] = folder_mb(cache) if variant != "lists" else None
                rows.append(result)
                print(json.dumps(result), flush=True)
    print(f"\n| max_length | path | ready s | iterate {args.batches}×8 s | RSS added MB (peak) | private MB (end) | cache MB | ready ÷ lists |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        reference = next(r for r in rows if r["max_length"] == row["max_length"] and r["variant"] == "lists")
        cache = f"{row['cache_mb']:.0f}" if row["cache_mb"] is not None else "–"
        print(f"| {row['max_length']} | {row['variant']} | {row['ready_s']:.1f} | {row['iterate_s']:.2f} | "
              f"{row['rss_added_mb']:.0f} | {row['private_added_mb']:.0f} | {cache} | {row['ready_s'] / reference['ready_s']:.2f} |")


if __name__ == "__main__":
    main()
