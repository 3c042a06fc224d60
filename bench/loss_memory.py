"""Peak memory of the per-token fp32 cross-entropy over bf16 logits: all tokens upcast at once
against LOSS_BLOCK_TOKENS at a time (dpnotes/privacy/losses.py), each in a fresh process.

    python bench/loss_memory.py                 # T = 4,096, V = 49,152 (SmolLM2's vocabulary)
    python bench/loss_memory.py --tokens 8192 --vocab 128256
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys


def measure(mode: str, tokens: int, vocab: int) -> None:
    import torch

    from dpnotes.privacy import losses

    if mode == "whole":
        losses.LOSS_BLOCK_TOKENS = 10**9
    logits = torch.randn(1, tokens, vocab, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.autograd.grad(losses.token_cross_entropy(logits, labels).sum(), logits)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--measure", choices=["whole", "blocks"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.tokens, args.vocab)
        return
    peaks = {}
    for mode in ("whole", "blocks"):
        out = subprocess.run([sys.executable, __file__, "--measure", mode, "--tokens", str(args.tokens),
                              "--vocab", str(args.vocab)], capture_output=True, text=True, check=True)
        peaks[mode] = float(out.stdout.split()[-1])
    logits_mb = args.tokens * args.vocab * 2 / 2**20
    print(f"bf16 logits (1, {args.tokens}, {args.vocab}): {logits_mb:.0f} MB; peak above them, loss + backward:")
    print(f"  fp32 copy of all tokens at once: {peaks['whole']:.0f} MB")
    print(f"  fp32 copy by blocks:             {peaks['blocks']:.0f} MB ({peaks['blocks'] / peaks['whole']:.2f}x)")


if __name__ == "__main__":
    main()
