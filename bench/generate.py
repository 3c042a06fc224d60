"""Generation throughput, side by side in one run: transformers vs vLLM (server, and the offline
engine in the vLLM environment), new tokens/s at several concurrencies, on the same model and prompts.

    python bench/generate.py --model ~/.cache/dpnotes/models/smollm2-135m --prompts 64 --max-new-tokens 128

`make vllm` builds the vLLM environment; without it the transformers rows are printed alone. For
transformers "concurrency" is the batch size of `generate`; for the server it is the number of
requests in flight; the offline engine takes every prompt at once. Each engine is warmed up before
it is timed; its start-up time is printed separately (with --compile it includes torch.compile).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the offline worker runs in the vLLM environment, where dpnotes is not installed

from dpnotes.generation.backends import SamplingConfig, make_backend  # noqa: E402


def prompts(count: int, model: str) -> list[str]:
    """Default-corpus prompts in the chat format training uses (two public code titles each)."""
    from transformers import AutoTokenizer

    from dpnotes.corpus.default_code_bank import CODE_BANK
    from dpnotes.prompting import prompt_format_for

    codes, tokenizer = [profile.code for profile in CODE_BANK], AutoTokenizer.from_pretrained(model)
    prompt = prompt_format_for("default")
    return [prompt.render(sorted({codes[i % len(codes)], codes[(3 * i + 1) % len(codes)]}), tokenizer) for i in range(count)]


def timed(engine, texts: list[str], sampling: SamplingConfig) -> dict:
    engine.generate(texts[:2], 0, 0, SamplingConfig(max_new_tokens=8, batch_size=2))  # warm-up
    start = time.perf_counter()
    outputs = engine.generate(texts, 0, 0, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(o.new_tokens for o in outputs)
    return {"prompts": len(texts), "new_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 1)}


def started(backend: str, model: str, **options):
    start = time.perf_counter()
    engine = make_backend(backend, model, **options)
    return engine, round(time.perf_counter() - start, 1)


def offline_worker(args) -> None:
    """Runs inside the vLLM environment: the offline engine (`LLM`) through the project's backend."""
    texts = json.loads(Path(args.offline_worker).read_text())
    engine, startup = started("vllm", args.model, dtype="float32", max_model_len=1024, enforce_eager=False if args.compile else None)
    row = timed(engine, texts, SamplingConfig(max_new_tokens=args.max_new_tokens))
    print("RESULT " + json.dumps({"backend": "vllm offline" + (" (compiled)" if args.compile else ""),
                                  "concurrency": len(texts), "startup_s": startup, **row}), flush=True)


def offline(args, texts: list[str], python: Path, workdir: Path) -> dict | None:
    path = workdir / "prompts.json"
    path.write_text(json.dumps(texts))
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [str(python), __file__, "--model", args.model, "--max-new-tokens", str(args.max_new_tokens),
               "--offline-worker", str(path)] + (["--compile"] if args.compile else [])
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=workdir)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"offline engine failed (exit {done.returncode}):\n" + "\n".join(done.stderr.splitlines()[-15:]))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an HF model folder (a merged run, or the cached SmolLM2)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--compile", action="store_true",
                        help="vLLM with torch.compile (default: the project's default, eager on CPU hosts)")
    parser.add_argument("--no-offline", action="store_true")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the vLLM server, e.g. VLLM_CPU_OMP_THREADS_BIND=0-1")
    parser.add_argument("--offline-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_worker:
        return offline_worker(args)

    import tempfile

    from dpnotes.generation.vllm_server import find_vllm

    texts = prompts(args.prompts, args.model)
    rows = []
    engine, startup = started("transformers", args.model)
    for concurrency in args.concurrency:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, batch_size=concurrency)
        rows.append({"backend": "transformers", "concurrency": concurrency, "startup_s": startup,
                     **timed(engine, texts[:max(concurrency, min(len(texts), 2 * concurrency))], sampling)})
        print(json.dumps(rows[-1]), flush=True)
    engine.close()
    python = find_vllm()
    if python is None:
        print("no vLLM environment (make vllm): transformers rows only")
    else:
        with tempfile.TemporaryDirectory() as workdir:
            server, startup = started("vllm-server", args.model, dtype="float32", max_model_len=1024,
                                      enforce_eager=False if args.compile else None, server_log=str(Path(workdir) / "server.log"),
                                      environment=dict(pair.split("=", 1) for pair in args.server_env))
            try:
                for concurrency in args.concurrency:
                    server.concurrency = concurrency
                    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
                    rows.append({"backend": "vllm server" + (" (compiled)" if args.compile else "")
                                 + "".join(f" {pair}" for pair in args.server_env),
                                 "concurrency": concurrency, "startup_s": startup,
                                 **timed(server, texts[:max(concurrency, min(len(texts), 2 * concurrency))], sampling)})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                server.close()
            if not args.no_offline:
                row = offline(args, texts, python, Path(workdir))
                if row:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    by_concurrency = {r["concurrency"]: r for r in rows if r["backend"] == "transformers"}
    print(f"\n{'backend':24} {'concurrency':>11} {'prompts':>7} {'start s':>8} {'tokens/s':>9} {'÷ transformers':>15}")
    for r in rows:
        base = by_concurrency.get(r["concurrency"]) or by_concurrency[max(by_concurrency)]
        print(f"{r['backend']:24} {r['concurrency']:>11} {r['prompts']:>7} {r['startup_s']:>8} {r['tokens_per_second']:>9} {r['tokens_per_second'] / base['tokens_per_second']:>15.2f}")


if __name__ == "__main__":
    main()
