"""Canary exposure, side by side in one run: every candidate scored as a full sequence (context +
candidate) against the context run once and its KV cache reused (`nll_after_context`), on
SmolLM2-135M and the default corpus's canary notes with the training prompt.

    python bench/exposure.py --candidates 200 --canaries 2

Prints seconds per canary for both, the speed-up, the largest NLL difference and whether the
ranks (hence the exposures) agree.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dpnotes.corpus import generate_default_corpus
from dpnotes.evaluation.leakage import canary_contexts, digit_candidates, nll_after_context, sequence_nll
from dpnotes.models import load_causal_lm
from dpnotes.prompting import prompt_format_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--canaries", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_causal_lm("smollm2-135m", dtype=torch.float32)
    prompt = prompt_format_for("default")
    notes = generate_default_corpus(n_patients=100, canaries=args.canaries, seed=0)
    canaries, contexts = canary_contexts(notes, lambda codes: prompt.render(codes, tokenizer))
    rows = []
    for index, (canary, context) in enumerate(zip(canaries, contexts)):
        texts = [canary] + digit_candidates(canary, args.candidates, index)
        started = time.perf_counter()
        full, _ = sequence_nll(model, tokenizer, texts, [context] * len(texts), args.batch_size)
        full_seconds = time.perf_counter() - started
        started = time.perf_counter()
        cached = nll_after_context(model, tokenizer, texts, context, args.batch_size)
        cached_seconds = time.perf_counter() - started
        same_rank = int((full[1:] <= full[0]).sum()) == int((cached[1:] <= cached[0]).sum())
        context_tokens = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        rows.append((index, context_tokens, full_seconds, cached_seconds, float(np.abs(full - cached).max()), same_rank))
    print(f"{'canary':>6} {'context tokens':>14} {'full s':>8} {'cached s':>9} {'speed-up':>9} {'max |ΔNLL|':>11} same rank")
    for index, tokens, full_s, cached_s, diff, same in rows:
        print(f"{index:>6} {tokens:>14} {full_s:>8.2f} {cached_s:>9.2f} {full_s / cached_s:>8.1f}× {diff:>11.2e} {same}")


if __name__ == "__main__":
    main()
