"""Sampling settings for notes from generators the study already trained, scored on real dev notes only
(not a test; CPU, a few minutes per setting, no training).

    python bench/sampling_sweep.py --part default --out /tmp/sampling "eps_8 temperature=0.5" "eps_8 count=630"

Each argument is one setting: a run of the study part (eps_1, eps_8, eps_inf, ...; `base`: the
pretrained model without fine-tuning, prompted in the corpus's format; `titles`: no model, each
note is the public titles of its codes, the reference a generator has to beat) and generation
settings (`temperature`, `top_k`, `max_new_tokens`, `term_bias`, `count`). Notes are drawn from the run's merged
model, conditioned on the same DP code-set release the study's notes used (so no new ε is spent on
conditioning), into OUT/<setting>/. The coder and its dev-half score are bench/generator_sweep.py's:
C and threshold on one half of the real dev split, micro-F1 on the other half; no test note is read.
A finished setting has its line in OUT/results.jsonl and is skipped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from generator_sweep import REAL, dev_halves, dev_score, finished, log, setting_name

from dpnotes import CHECKOUT
from dpnotes.corpus.schema import Note
from dpnotes.evaluation.references import prompt_only_notes
from dpnotes.generation.conditioning import CodeSetDistribution
from dpnotes.generation.synthesize import CONDITIONING, synthesize
from dpnotes.models import resolve_model
from dpnotes.prompting import prompt_format_for
from dpnotes.runs import load_synthetic
from dpnotes.study.pipeline import Pipeline, load_pipeline_config

PART_CONFIGS = CHECKOUT / "dpnotes" / "study" / "configs"
BASE, TITLES = "base", "titles"
GENERATION_KEYS = {"temperature": float, "top_k": int, "max_new_tokens": int, "term_bias": float, "title_steering": str,
                   "frequency_penalty": float}


def parse_setting(setting: str) -> tuple[str, dict, int | None]:
    run, *items = setting.split()
    options, count = {}, None
    for item in items:
        key, value = item.split("=", 1)
        if key == "count":
            count = int(value)
        elif key in GENERATION_KEYS:
            options[key] = GENERATION_KEYS[key](value)
        else:
            raise SystemExit(f"unknown setting {key!r}: one of count, {', '.join(GENERATION_KEYS)}")
    return run, options, count


def run_setting(pipeline: Pipeline, out: Path, setting: str, bootstrap: int) -> dict:
    run_name, options, count = parse_setting(setting)
    # The conditioning release of the first ε's run serves `base` too: the same code sets.
    run = pipeline.run_dir(next((e for e in pipeline.config.epsilons if pipeline.run_dir(e).root.name == run_name),
                                pipeline.config.epsilons[0]))
    train = pipeline.train_config(pipeline.config.epsilons[0])
    model, prompt = ((Path(resolve_model(train.model)), prompt_format_for(train.corpus)) if run_name == BASE
                     else (run.merged, None))
    folder = out / setting_name(setting)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / CONDITIONING).exists():  # the study's own release: the same code sets, no new ε
        shutil.copy(run.synthetic / CONDITIONING, folder / CONDITIONING)
    distribution = CodeSetDistribution.load(folder / CONDITIONING)
    g = pipeline.config.generation
    if run_name == TITLES:
        code_sets = distribution.sample(count or pipeline.synthetic_count, 0)
        synthetic = prompt_only_notes([Note(f"titles-{i:06d}", f"titles-{i:06d}", "", list(codes))
                                       for i, codes in enumerate(code_sets)], pipeline.titles)
        return {"setting": setting, "synthetic_notes": len(synthetic), "dev": dev_scored(pipeline, synthetic, bootstrap)}
    sampling = replace(g.sampling(), **options)
    count = count or pipeline.synthetic_count
    started = time.perf_counter()
    synthesize(model, folder, count, distribution, "vllm-server", sampling, seed=0,
               backend_options={"server_log": str(folder / "vllm_server.log")}, prompt=prompt)
    seconds = time.perf_counter() - started
    synthetic = load_synthetic(folder)
    return {"setting": setting, "seconds": {"generate": seconds}, "synthetic_notes": len(synthetic),
            "dev": dev_scored(pipeline, synthetic, bootstrap)}


def dev_scored(pipeline: Pipeline, coder_train: list[Note], bootstrap: int) -> dict:
    train_notes, threshold_half, scored_half = dev_halves(pipeline)
    return dev_score(train_notes, threshold_half, scored_half, coder_train, bootstrap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help='one setting per argument, e.g. "eps_8 temperature=0.5"')
    parser.add_argument("--part", default="default", help="study part: study_<part>.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--override", action="append", default=[],
                        help="pipeline config override, e.g. output_dir=runs/study_mts_rep (another run's generators)")
    args = parser.parse_args()
    pipeline = Pipeline(load_pipeline_config(PART_CONFIGS / f"study_{args.part}.yaml", ["report_to=none", *args.override]))
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    for setting in [REAL, *args.settings]:
        if setting in finished(results):
            log(f"{setting}: done, skipped")
            continue
        log(f"{setting}: start")
        if setting == REAL:
            row = {"setting": REAL, "dev": dev_scored(pipeline, pipeline.splits["train"], args.bootstrap)}
        else:
            row = run_setting(pipeline, args.out, setting, args.bootstrap)
        with results.open("a") as sink:
            sink.write(json.dumps(row) + "\n")
        log(f"{setting}: dev micro-F1 {row['dev']['micro_f1']:.3f}")
    print("| setting | notes | generate (s) | dev micro-F1 [95 % CI] |\n| --- | --- | --- | --- |")
    for row in finished(results).values():
        lo, hi = row["dev"]["ci"]
        seconds = row.get("seconds", {}).get("generate")
        print(f"| {row['setting']} | {row.get('synthetic_notes', '–')} | {f'{seconds:.0f}' if seconds else '–'} | "
              f"{row['dev']['micro_f1']:.3f} [{lo:.2f}, {hi:.2f}] |")


if __name__ == "__main__":
    main()
