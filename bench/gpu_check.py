"""The GPU check (issue 13): what CPU tests cannot see, in at most ten minutes on one GPU, as one
dated markdown table.

    python bench/gpu_check.py                    # one GPU: prints the table (--out FILE appends it there)
    python bench/gpu_check.py --dry-run          # CPU, CI: argument parsing, tiny models, the same table

Parts, each a subprocess under its own time budget (a part that runs out is a row that says so;
the rest go on), all within --budget seconds:

- norms: per-example gradient norms of the clipper (book-keeping and ghost, LoRA and full) in bf16
  on CUDA against the brute-force oracle (dpnotes/testing/dp_oracle.py) in fp32.
- collectives: every helper of dpnotes/privacy/collectives.py in a real NCCL group (1 process,
  made to think it has company): NCCL refuses CPU tensors, which no CPU test can show.
- launch DDP-style: `torchrun` of train/dp_lora.py, 1 process, NCCL, a few steps on a tiny model.
- launch ZeRO-3: `accelerate launch` of train/dp_lora.py, 1 process, ds_configs/zero3.json.
  Skipped when deepspeed is not importable: the GPU machine has none (nor hjson, pydantic) unless
  wheels travel with the tree (`pip download deepspeed -d wheels/` here, `pip install --no-index
  --find-links wheels deepspeed` there).
- speed: non-private / book-keeping / ghost step time, peak memory and tokens/s on random-init
  LLaMA-shaped models (LlamaConfig, no download): 1B full fine-tuning and 8B LoRA, 512 tokens.
  Private steps are whole DP steps (clipping, noise σ = 1, optimizer) through the replicated backend.

No internet there: models are random-init and the launches' tokenizer is a byte-level one built here.
dpnotes itself needs its dependencies there (the privacy layer imports the corpus layer: datasets,
pyarrow, pandas; the accountant: dp-accounting, with scipy): what the machine lacks must travel as
wheels too. The table's first row names what is missing, and a part that cannot import says so.
Run it from the checkout (`python bench/gpu_check.py`): dpnotes need not be installed.
The dry run does all of it on CPU at toy sizes, launching nothing (the launch rows say so).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a bare GPU machine has the checkout, not dpnotes installed
    sys.path.insert(0, str(ROOT))
ROW = "GPU_CHECK_ROW "  # how a part's subprocess hands a table row back


@dataclass(frozen=True)
class Shape:
    """A LLaMA-shaped model and its batch for the speed part."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    lora_rank: int | None  # None: full fine-tuning
    batch: int
    seq: int


SHAPES = {  # Llama-3.2-1B and Llama-3-8B shapes (1B untied: per-example norms of tied weights are refused)
    "1b": Shape("1B full", 2048, 16, 32, 8, 8192, 128256, None, 8, 512),
    "8b": Shape("8B LoRA r=16 q,k,v,o", 4096, 32, 32, 8, 14336, 128256, 16, 8, 512),
}
TOY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, batch=2, seq=32)
PARTS = {  # name: seconds on the GPU. speed-1b draws σ·N(0,1) for 1.2B coordinates on the CPU each DP step
    "norms": 45, "collectives": 30, "launch-ddp": 90, "launch-zero3": 120, "speed-1b": 180, "speed-8b": 120,
}
NEEDED = ["torch", "transformers", "accelerate", "peft", "datasets", "pyarrow", "pandas", "dp_accounting", "deepspeed"]
LAUNCH_STEPS = 3


def emit(part: str, setting: str, result: str, step_s: float | None = None, peak_gb: float | None = None,
         tokens_per_s: float | None = None, note: str = "") -> None:
    print(ROW + json.dumps({"part": part, "setting": setting, "result": result, "step_s": step_s,
                            "peak_gb": peak_gb, "tokens_per_s": tokens_per_s, "note": note}), flush=True)


def progress(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def device_and_dtype(dry_run: bool):
    import torch

    if dry_run:
        return torch.device("cpu"), torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda"), torch.bfloat16


def llama(shape: Shape, device, dtype):
    """A random-init LLaMA built directly on `device` in `dtype` (an 8B model never touches the host)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                         vocab_size=shape.vocab, max_position_embeddings=max(shape.seq, 128),
                         tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def trainable(model, lora_rank: int | None, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    from dpnotes.training.model_setup import TrainableConfig, prepare_trainable

    config = TrainableConfig(full_finetune=True) if lora_rank is None else TrainableConfig(lora_rank=lora_rank, lora_targets=list(targets))
    model = prepare_trainable(model, config)
    model.train()
    return model


def random_tokens(shape: Shape, device, seed: int = 0) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def toy(shape: Shape, dry_run: bool) -> Shape:
    return Shape(shape.name, lora_rank=shape.lora_rank and 4, **TOY) if dry_run else shape


# ---- parts (each runs in its own process on the GPU) -----------------------------------------
def part_norms(args) -> None:
    """Clipper norms and clipped sums of the bf16 model vs the oracle's on an fp32 copy of the same
    weights (on CUDA the rules take bf16 operands to fp32-accumulating matmuls: rules.linear.fp32_bmm)."""
    import copy

    import torch

    from dpnotes.privacy.clipping import PerExampleClipper
    from dpnotes.privacy.losses import causal_lm_losses
    from dpnotes.testing.dp_oracle import clipped_sum_reference, flat_clipped_sum, per_example_gradients

    device, dtype = device_and_dtype(args.dry_run)
    shape = Shape("tiny", **{**TOY, "hidden": 128, "layers": 2, "batch": 4, "seq": 64}, lora_rank=None)
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    on = f"{str(dtype).removeprefix('torch.')} on {device.type}"
    for setup, rank in (("LoRA r=8", 8), ("full", None)):
        torch.manual_seed(0)
        base = trainable(llama(shape, device, torch.float32), rank)
        tokens = random_tokens(shape, device)
        per_example = per_example_gradients(base, causal_lm_losses, tokens).float()
        oracle = per_example.norm(dim=1)
        max_grad_norm = float(oracle.median())  # about half the examples clipped
        _, oracle_sum = clipped_sum_reference(per_example, max_grad_norm)
        model = copy.deepcopy(base).to(dtype)
        for mode in ("bk", "ghost"):
            clipper = PerExampleClipper(model, max_grad_norm=max_grad_norm, mode=mode)
            with clipper.recording(shape.batch):
                losses = causal_lm_losses(model, tokens)
            norms = clipper.backward(losses).norms.float().to(oracle.device)
            error = float(((norms - oracle).abs() / oracle).max())
            emit("norms vs oracle", f"{setup}, {mode}, {on}", "ok" if error <= tolerance else "FAIL",
                 note=f"max relative error {error:.2e} (tolerance {tolerance:g})")
            clipped = flat_clipped_sum(clipper).float().to(oracle_sum.device)
            error = float((clipped - oracle_sum).norm() / oracle_sum.norm())
            emit("clipped sum vs oracle", f"{setup}, {mode}, {on}", "ok" if error <= tolerance else "FAIL",
                 note=f"relative error {error:.2e} (tolerance {tolerance:g})")
            model.zero_grad(set_to_none=True)


def part_collectives(args) -> None:
    """Each helper in a real 1-process group of the machine's backend; world_size says 2 so that
    none of them takes its single-process shortcut."""
    import torch
    import torch.distributed as dist

    from dpnotes.privacy import collectives

    device, _ = device_and_dtype(args.dry_run)
    backend = "gloo" if args.dry_run else "nccl"
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    alone, collectives.world_size = collectives.world_size, lambda: 2
    try:
        checks = {
            "broadcast_ints": lambda: collectives.broadcast_ints([1, 2**40]) == [1, 2**40],
            "all_reduce_max": lambda: collectives.all_reduce_max(7) == 7,
            "all_reduce_sum_ (CPU tensor in)": lambda: _reduced_in_place(collectives, torch.ones(3)),
            f"all_reduce_sum_ ({device.type} tensor in)": lambda: _reduced_in_place(collectives, torch.ones(3, device=device)),
            "barrier": lambda: collectives.barrier() is None,
        }
        for name, check in checks.items():
            try:
                emit("collectives", f"{name} on {backend}", "ok" if check() else "FAIL")
            except Exception as err:  # one row per helper: the next ones still say what they do
                emit("collectives", f"{name} on {backend}", "FAIL", note=_one_line(err))
    finally:
        collectives.world_size = alone  # the dry run shares its process with whatever runs next
        dist.destroy_process_group()


def _reduced_in_place(collectives, tensor) -> bool:
    collectives.all_reduce_sum_([tensor])
    return tensor.tolist() == [1.0, 1.0, 1.0]


def part_launch(args, zero3: bool) -> None:
    part = "launch ZeRO-3" if zero3 else "launch DDP-style"
    if zero3 and not _importable("deepspeed"):
        emit(part, "1 process", "skipped", note="deepspeed is not importable here (wheels did not travel with the tree)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        tiny_llama_with_byte_tokenizer(model_dir)
        train = [str(ROOT / "train/dp_lora.py"), "--config", "train/configs/tiny_test.yaml", f"model={model_dir}",
                 f"output_dir={Path(tmp) / 'run'}", f"privacy.steps={LAUNCH_STEPS}", f"save_every={LAUNCH_STEPS}",
                 "max_length=512"]  # bytes: at 64 the prompt fills every sequence and nothing carries a loss
        if zero3:
            launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                        str(zero3_launch_config(Path(tmp)))]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port())]
        command = launcher + train
        if args.dry_run:
            emit(part, "1 process", "dry run", note="not launched: " + " ".join(Path(c).name for c in command[:4]) + " …")
            return
        start = time.perf_counter()
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path))
        elapsed = time.perf_counter() - start
        ok = done.returncode == 0 and (Path(tmp) / "run" / "privacy_report.json").exists()
        last = ((done.stdout + done.stderr).strip().splitlines() or [""])[-1][:150]
        emit(part, f"1 process, {LAUNCH_STEPS} DP steps, tiny LLaMA", "ok" if ok else "FAIL",
             note=f"{elapsed:.0f} s wall" + ("" if ok else f"; last line: {last}"))


def zero3_launch_config(folder: Path) -> Path:
    path = folder / "zero3_1gpu.yaml"
    path.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
                    f"  deepspeed_config_file: {ROOT / 'ds_configs/zero3.json'}\n  zero3_init_flag: false\n"
                    f"num_processes: 1\nnum_machines: 1\nmachine_rank: 0\nmain_process_port: {_free_port()}\nuse_cpu: false\n")
    return path


def tiny_llama_with_byte_tokenizer(folder: Path) -> None:
    """A tiny random LLaMA and a byte-level tokenizer (256 bytes + eos): nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dpnotes.testing.tiny_models import tiny_llama

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer, tokenizer.decoder = byte_level, decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|eos|>", pad_token="<|eos|>")
    tiny_llama(vocab=len(fast), hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_positions=512).save_pretrained(folder)
    fast.save_pretrained(folder)


def part_speed(args, key: str) -> None:
    import torch

    device, dtype = device_and_dtype(args.dry_run)
    shape = toy(SHAPES[key], args.dry_run)
    for variant in ("non-private", "bk", "ghost"):
        progress(f"speed {shape.name} {variant}")
        try:
            step_s, peak = time_variant(shape, variant, device, dtype, args.steps)
            emit(f"speed {SHAPES[key].name}", f"{variant}, {shape.batch}×{shape.seq} tokens, {str(dtype).removeprefix('torch.')}",
                 "ok", step_s, peak, shape.batch * shape.seq / step_s)
        except torch.OutOfMemoryError as err:
            emit(f"speed {SHAPES[key].name}", variant, "OOM", note=_one_line(err))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def time_variant(shape: Shape, variant: str, device, dtype, steps: int) -> tuple[float, float | None]:
    """Median seconds per step after one warm-up step, and peak GPU memory in GB (None on CPU)."""
    import statistics

    import torch

    from dpnotes.privacy.backends import ReplicatedBackend
    from dpnotes.privacy.engine import PrivacyConfig, PrivacyEngine
    from dpnotes.privacy.losses import causal_lm_losses

    torch.manual_seed(0)
    model = trainable(llama(shape, device, dtype), shape.lora_rank)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = random_tokens(shape, device)
    if variant == "non-private":
        def step():
            causal_lm_losses(model, batch).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:  # q = 1, one micro-batch: the logical batch is the batch, as for the non-private step
        config = PrivacyConfig(noise_multiplier=1.0, expected_batch_size=shape.batch, steps=10**6, clipping=variant,
                               micro_batch_size=shape.batch, seed=0)
        engine, backend = PrivacyEngine(model, config, num_units=shape.batch), ReplicatedBackend(model, optimizer)

        def step():
            engine.step(backend, lambda indices: {k: v[indices] for k, v in batch.items()}, causal_lm_losses)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for k in range(steps + 1):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    return statistics.median(times), peak


# ---- the driver ------------------------------------------------------------------------------
def run_part(name: str, args) -> None:
    """Run a part; an exception becomes its last row (the table says what failed, the rest go on)."""
    try:
        _dispatch(name, args)
    except Exception as err:
        emit(name, "", "FAIL", note=_one_line(err))


def _dispatch(name: str, args) -> None:
    if name == "norms":
        part_norms(args)
    elif name == "collectives":
        part_collectives(args)
    elif name.startswith("launch-"):
        part_launch(args, zero3=name == "launch-zero3")
    else:
        part_speed(args, name.removeprefix("speed-"))


def rows_of(name: str, args, seconds: float) -> list[dict]:
    """The part's rows: in this process for a dry run, else from a subprocess killed at `seconds`."""
    if args.dry_run:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_part(name, args)
        text = out.getvalue()
    else:
        # Its own session: at the deadline the part goes with every process it started (launchers' workers).
        command = [sys.executable, __file__, "--part", name, "--steps", str(args.steps)]
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            return _parse(text) + [{"part": name, "setting": "", "result": "out of time", "note": f"stopped at {seconds:.0f} s"}]
        if proc.returncode != 0 and ROW not in text:
            return [{"part": name, "setting": "", "result": "FAIL", "note": f"exit status {proc.returncode} (log above)"}]
    return _parse(text)


def _parse(text: str) -> list[dict]:
    return [json.loads(line[len(ROW):]) for line in text.splitlines() if line.startswith(ROW)]


def table(rows: list[dict], header: str) -> str:
    def cell(value, fmt):
        return "" if value is None else format(value, fmt)

    lines = [header, "", "| part | setting | result | s/step | peak GB | tokens/s | note |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['setting']} | {r['result']} | {cell(r.get('step_s'), '.3f')} | "
                     f"{cell(r.get('peak_gb'), '.1f')} | {cell(r.get('tokens_per_s'), ',.0f')} | {r.get('note', '')} |")
    return "\n".join(lines)


def machine(dry_run: bool) -> str:
    import torch
    import transformers

    where = "CPU (dry run, toy sizes)" if dry_run else torch.cuda.get_device_name(0)
    return f"{where}; torch {torch.__version__}, transformers {transformers.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, nothing launched (CI)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for the whole check (default 570)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per speed row (after one warm-up)")
    parser.add_argument("--out", type=Path, help="also append the table to this markdown file")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # a part's own process
    args = parser.parse_args(argv)
    if args.part:
        run_part(args.part, args)
        return
    if not args.dry_run:
        _require_gpu()
    deadline = time.monotonic() + args.budget
    missing = [name for name in NEEDED if not _importable(name)]
    rows = [{"part": "requirements", "setting": ", ".join(NEEDED), "result": "missing" if missing else "ok",
             "note": "missing: " + ", ".join(missing) if missing else ""}]
    for name in args.parts:
        left = deadline - time.monotonic()
        if left < 10:
            rows.append({"part": name, "setting": "", "result": "skipped", "note": "the check's time budget is spent"})
            continue
        progress(f"{name} (up to {min(PARTS[name], left):.0f} s)")
        rows += rows_of(name, args, min(PARTS[name], left))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = table(rows, f"### GPU check, {stamp}: {machine(args.dry_run)}")
    print(text)
    if args.out:
        with args.out.open("a") as out:
            out.write("\n" + text + "\n")


def _require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; use --dry-run on a CPU")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:150] if str(err) else ''}"


if __name__ == "__main__":
    main()
