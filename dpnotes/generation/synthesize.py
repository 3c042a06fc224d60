"""Generate synthetic notes conditioned on code sets, as JSONL in the corpus schema + a manifest.

    python -m dpnotes.generation.synthesize --model runs/demo/eps8/merged --run runs/demo/eps8 \
        --count 200 --out runs/demo/eps8/synthetic --conditioning dp-marginals --conditioning-epsilon 1

Resumable: notes already in OUT/notes.jsonl are kept and only missing indices are generated; the
released code-set distribution is saved once (OUT/conditioning.json) so resuming never spends its
budget again.

The code statistics are released at the training run's privacy unit (`privacy_unit` of its
privacy_report.json), and the manifest adds the two guarantees (basic composition) only at one
common unit: a conditioning released at another unit than the training is refused before anything
is generated. A prior costs nothing and goes with any unit.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from tqdm import tqdm

from dpnotes.corpus import Note
from dpnotes.generation.backends import SamplingConfig, chunk_size, make_backend, resolve_backend
from dpnotes.generation.conditioning import (
    PRIVACY_UNITS,
    CodeSetDistribution,
    check_privacy_unit,
    count_units,
    dp_code_marginals,
    dp_code_set_histogram,
    prior_distribution,
)
from dpnotes.prompting import PromptFormat, prompt_format_from
from dpnotes.runs import MANIFEST, NOTES, PRIVACY_REPORT, RunDir

CONDITIONING = "conditioning.json"
DP_RELEASES = {"dp-histogram": dp_code_set_histogram, "dp-marginals": dp_code_marginals}


def training_report(*folders: Path | None) -> dict:
    """The privacy report of the first folder (merged model, training run) that has one; {} if none."""
    for folder in folders:
        if folder is not None and (Path(folder) / PRIVACY_REPORT).exists():
            return json.loads((Path(folder) / PRIVACY_REPORT).read_text())
    return {}


def conditioning_for(out_dir: Path, source: str, train_notes: list[Note] | None, epsilon: float, delta: float | None,
                     prior: Path | None, seed: int | None, *, privacy_unit: str | None) -> CodeSetDistribution:
    """The code-set distribution saved in out_dir, else a new release: a DP one at `privacy_unit`
    (the training run's unit; δ defaults to 1/(10·N) with N units of that kind), or a prior."""
    saved = out_dir / CONDITIONING
    if saved.exists():
        distribution = CodeSetDistribution.load(saved)
        if not distribution.free and distribution.privacy_unit != privacy_unit:
            raise ValueError(
                f"{saved} was released at privacy unit {distribution.privacy_unit!r}, not at the training unit "
                f"{privacy_unit!r}: guarantees of different units cannot be added; use another --out"
            )
        return distribution
    if source == "prior":
        if prior is None:
            raise ValueError("--conditioning prior needs --prior FILE")
        distribution = prior_distribution(prior)
    elif source in DP_RELEASES:
        if not train_notes:
            raise ValueError(f"--conditioning {source} needs the training notes (--run)")
        if privacy_unit is None:
            raise ValueError(f"--conditioning {source} is released at the training run's privacy unit, and none was "
                             f"given (its {PRIVACY_REPORT} records none)")
        check_privacy_unit(privacy_unit)
        units = count_units(train_notes, privacy_unit)
        distribution = DP_RELEASES[source](train_notes, epsilon, delta or 1 / (10 * units), seed=seed,
                                           privacy_unit=privacy_unit)
    else:
        raise ValueError(f"unknown conditioning {source!r}: {', '.join(DP_RELEASES)} or prior")
    out_dir.mkdir(parents=True, exist_ok=True)
    distribution.save(saved)
    return distribution


def read_done(path: Path) -> dict[int, dict]:
    """Notes already written, by index; a torn last line (crash mid-write) is dropped."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["metadata"]["index"]] = record
    return done


def compose(training: dict, distribution: CodeSetDistribution) -> dict:
    """Total (ε, δ) of weights + conditioning by basic composition, at their common privacy unit.

    Raises ValueError when both are DP guarantees of different (or unknown) units: they bound
    different neighbouring relations and are never added. Without a training report the weights
    carry no guarantee (ε = ∞ at every unit, δ undefined).
    """
    unit = training.get("privacy_unit")
    if not training:
        return {"privacy_unit": None, "total_epsilon": math.inf, "total_delta": None}
    if distribution.free:
        return {"privacy_unit": unit, "total_epsilon": training.get("epsilon", math.inf),
                "total_delta": training.get("delta")}
    if distribution.privacy_unit != unit:
        raise ValueError(
            f"the conditioning ({distribution.source}) was released at privacy unit {distribution.privacy_unit!r} "
            f"but the model was trained at {unit!r}: guarantees of different units cannot be added; release the "
            f"conditioning at the training unit"
        )
    return {"privacy_unit": unit, "total_epsilon": training.get("epsilon", math.inf) + distribution.epsilon,
            "total_delta": (training.get("delta") or 0.0) + distribution.delta}


def synthesize(
    model_dir: Path,
    out_dir: Path,
    count: int,
    distribution: CodeSetDistribution,
    backend: str = "transformers",
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    backend_options: dict | None = None,
    run_dir: Path | None = None,
    prompt: PromptFormat | None = None,
) -> dict:
    """Generate `count` notes into out_dir. The training guarantee is read from model_dir's
    privacy report, else from the training run_dir's (the same report the conditioning unit came from);
    so is the prompt format, unless `prompt` is given (a model that was never trained by dpnotes)."""
    from transformers import AutoTokenizer

    sampling = sampling or SamplingConfig()
    training = training_report(model_dir, run_dir)
    total = compose(training, distribution)  # refuses mismatched units before anything is generated
    prompt = prompt or prompt_format_from(training, f"the model in {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    code_sets = distribution.sample(count, seed)
    notes_path = out_dir / NOTES
    done = read_done(notes_path)
    notes_path.write_text("".join(json.dumps(done[i]) + "\n" for i in sorted(done)))  # rewrite without a torn line
    step = chunk_size(backend, sampling)
    todo = [start for start in range(0, count, step) if any(i not in done for i in range(start, min(start + step, count)))]
    engine = make_backend(backend, str(model_dir), **(backend_options or {})) if todo else None
    start_time, new_tokens, written = time.perf_counter(), 0, 0
    with notes_path.open("a") as sink, tqdm(total=count, initial=len(done), desc="synthetic notes", unit="note") as bar:
        try:
            for start in todo:
                indices = [i for i in range(start, min(start + step, count)) if i not in done]
                prompts = [prompt.render(code_sets[i], tokenizer) for i in range(start, min(start + step, count))]
                outputs = engine.generate(prompts, start, seed, sampling)
                for index in indices:
                    output = outputs[index - start]
                    note = Note(f"syn-{index:06d}", f"syn-{index:06d}", output.text, code_sets[index],
                                {"index": index, "seed": seed, "backend": backend, "new_tokens": output.new_tokens})
                    sink.write(json.dumps(asdict(note)) + "\n")
                    sink.flush()
                    new_tokens += output.new_tokens
                    written += 1
                    bar.update(1)
        finally:
            if engine is not None:
                engine.close()  # a server the backend started stops here, also on an error
    elapsed = time.perf_counter() - start_time
    manifest = {
        "model": str(model_dir),
        "backend": backend,
        "count": count,
        "written_this_run": written,
        "seed": seed,
        "sampling": asdict(sampling),
        "prompt_format": prompt.to_dict(),
        "seconds": elapsed,
        "new_tokens": new_tokens,
        "tokens_per_second": new_tokens / elapsed if elapsed > 0 and new_tokens else None,
        "conditioning": {"source": distribution.source, "epsilon": distribution.epsilon, "delta": distribution.delta,
                         "noise_std": distribution.noise_std, "threshold": distribution.threshold,
                         "released_code_sets": len(distribution.weights), "privacy_unit": distribution.privacy_unit},
        "training": {k: training.get(k) for k in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                                                  "privacy_unit", "privacy_units", "config_hash")},
        **total,  # privacy_unit, total_epsilon, total_delta: basic composition at one common unit
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="merged model folder (generate.merge)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--backend", default="auto", choices=["auto", "transformers", "vllm", "vllm-server"],
                        help="auto: the vLLM server when `make vllm` built its environment, else transformers")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                        help="backend option, repeatable (vllm-server: url, concurrency, port, dtype, adapter_dir, "
                             "max_lora_rank, tensor_parallel_size, enforce_eager, ...)")
    parser.add_argument("--conditioning", default="dp-marginals", choices=[*DP_RELEASES, "prior"])
    parser.add_argument("--conditioning-epsilon", type=float, default=1.0)
    parser.add_argument("--conditioning-delta", type=float)
    parser.add_argument("--prior", type=Path)
    parser.add_argument("--run", type=Path, help="training output_dir: its training notes feed the DP histogram")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    train_notes = None
    unit = training_report(args.model, args.run).get("privacy_unit")
    if args.conditioning in DP_RELEASES:
        if args.run is None:
            parser.error(f"--conditioning {args.conditioning} needs --run (the training output_dir)")
        if unit not in PRIVACY_UNITS:
            parser.error(f"--conditioning {args.conditioning} is released at the training privacy unit, but "
                         f"{args.model}/{PRIVACY_REPORT} (or the run's) records none")
        train_notes = RunDir(args.run).training_notes()
    distribution = conditioning_for(args.out, args.conditioning, train_notes, args.conditioning_epsilon,
                                    args.conditioning_delta, args.prior, None, privacy_unit=unit)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, batch_size=args.batch_size)
    options = {}
    for option in args.backend_option:
        key, _, value = option.partition("=")
        options[key] = yaml.safe_load(value)
    manifest = synthesize(args.model, args.out, args.count, distribution, resolve_backend(args.backend), sampling,
                          args.seed, backend_options=options, run_dir=args.run)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
