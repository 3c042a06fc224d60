"""Generation throughput: transformers vs vLLM on the same merged model and prompts, as a ratio.

    python bench/generate.py --model runs/demo/eps_inf/merged --prompts 64 --max-new-tokens 128

The vLLM side runs where vLLM is installed (the optional `vllm` extra, CUDA); otherwise the
transformers figure is printed alone and the reason is said.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time

from dpnotes.corpus.default_code_bank import CODE_BANK
from dpnotes.generate.backends import SamplingConfig, make_backend
from dpnotes.prompting import prompt_format_for


def prompts(count: int, model: str) -> list[str]:
    from transformers import AutoTokenizer

    codes, tokenizer = [profile.code for profile in CODE_BANK], AutoTokenizer.from_pretrained(model)
    prompt = prompt_format_for("default")
    return [prompt.render(sorted({codes[i % len(codes)], codes[(3 * i + 1) % len(codes)]}), tokenizer) for i in range(count)]


def throughput(backend: str, model: str, texts: list[str], sampling: SamplingConfig, **options) -> dict:
    engine = make_backend(backend, model, **options)
    engine.generate(texts[: min(2, len(texts))], 0, 0, SamplingConfig(max_new_tokens=8, batch_size=sampling.batch_size))
    start = time.perf_counter()
    outputs = engine.generate(texts, 0, 0, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(o.new_tokens for o in outputs)
    return {"backend": backend, "prompts": len(texts), "new_tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="merged model folder (python -m dpnotes.generate.merge)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="transformers backend")
    args = parser.parse_args()
    texts = prompts(args.prompts, args.model)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    results = [throughput("transformers", args.model, texts, sampling)]
    if importlib.util.find_spec("vllm") is None:
        print("vLLM not installed (optional extra, CUDA only): transformers side only")
    else:
        results.append(throughput("vllm", args.model, texts, sampling))
    for row in results:
        print(json.dumps(row))
    if len(results) == 2:
        print(f"vLLM / transformers tokens/s: {results[1]['tokens_per_second'] / results[0]['tokens_per_second']:.1f}x")


if __name__ == "__main__":
    main()
