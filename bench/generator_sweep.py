"""The demo's DP generator recipe at one ε, one setting at a time, scored on real dev notes only
(not a test; CPU, ~5 minutes per setting in bf16).

    python bench/generator_sweep.py --out /tmp/sweep "learning_rate=0.01" "learning_rate=0.002 privacy.steps=24"
    python bench/generator_sweep.py --out /tmp/steps --epsilon inf --per-label 30 "privacy.steps=48"

Each argument is one setting: `dpnotes pipeline` settings of the training (over
dpnotes/study/configs/pipeline_demo.yaml and its train config, without the `train.` prefix).
A setting is trained, merged and generated from as the demo does, in OUT/<setting>/. The
coder is a TF-IDF coder trained on its synthetic notes. It never reads the test split: its C and
threshold are chosen on one half of the real dev split (by patient), and its micro-F1 is
measured on the other half. The first row, `real`, is the coder trained on the real train notes
(the ceiling). A finished setting has its line in OUT/results.jsonl and is skipped; an interrupted
one resumes at its unfinished stage. Settings run one at a time: each takes both cores.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from dpnotes import CHECKOUT
from dpnotes.corpus import split_by_patient
from dpnotes.evaluation.coders import TfidfCoder, evaluate_coder, label_space
from dpnotes.runs import load_synthetic
from dpnotes.study.pipeline import Pipeline, load_pipeline_config

DEMO = CHECKOUT / "dpnotes" / "study" / "configs" / "pipeline_demo.yaml"
REAL = "real"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def setting_name(setting: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", setting.strip()) or "demo"


def dev_halves(pipeline: Pipeline) -> tuple[list, list, list]:
    """(real train, threshold half, scored half): the dev split halved by patient; no test note."""
    seed = pipeline.train_config(pipeline.config.epsilons[0]).split_seed
    splits = pipeline.splits
    halves = split_by_patient(splits["dev"], (0.5, 0.5, 0.0), seed=seed)
    return splits["train"], halves["train"], halves["dev"]


def dev_score(train_notes: list, threshold_half: list, scored_half: list, coder_train: list, bootstrap: int) -> dict:
    """micro-F1 [95% CI] on the scored half of a TF-IDF coder trained on `coder_train`."""
    result = evaluate_coder(TfidfCoder(), coder_train, threshold_half, scored_half,
                            labels=label_space(train_notes, threshold_half + scored_half), n_bootstrap=bootstrap)
    return {"micro_f1": result["metrics"]["micro_f1"], "ci": result["ci"]["micro_f1"]}


def timed(stage) -> float:
    started = time.perf_counter()
    stage()
    return time.perf_counter() - started


def run_setting(out: Path, setting: str, epsilon: float, bootstrap: int, per_label: int | None) -> dict:
    """Train, merge, generate (each skipped when done) and score one setting."""
    overrides = [f"train.{item}" for item in setting.split()]
    if per_label is not None:
        overrides.append(f"synthetic_per_label={per_label}")
    config = load_pipeline_config(DEMO, [f"output_dir={out / setting_name(setting)}", "report_to=none",
                                         f"epsilons=[{epsilon}]", *overrides])
    pipeline = Pipeline(config)
    seconds = {stage: timed(lambda: getattr(pipeline, stage)(epsilon)) for stage in ("train", "merge", "generate")}
    report = json.loads(pipeline.run_dir(epsilon).privacy_report.read_text())
    train_notes, threshold_half, scored_half = dev_halves(pipeline)
    synthetic = load_synthetic(pipeline.run_dir(epsilon).synthetic)
    return {"setting": setting, "epsilon_spent": report["epsilon"], "noise_multiplier": report["noise_multiplier"],
            "seconds": seconds, "synthetic_notes": len(synthetic),
            "dev": dev_score(train_notes, threshold_half, scored_half, synthetic, bootstrap)}


def real_reference(out: Path, bootstrap: int) -> dict:
    """The same dev-half score for the coder trained on the real train notes (the ceiling)."""
    train_notes, threshold_half, scored_half = dev_halves(Pipeline(load_pipeline_config(DEMO, [f"output_dir={out}"])))
    return {"setting": REAL, "dev": dev_score(train_notes, threshold_half, scored_half, train_notes, bootstrap)}


def finished(results: Path) -> dict[str, dict]:
    lines = results.read_text().splitlines() if results.exists() else []
    return {row["setting"]: row for row in map(json.loads, lines)}


def print_table(rows: list[dict]) -> None:
    print("| setting | σ | train (s) | generate (s) | dev micro-F1 [95 % CI] |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        seconds = {stage: f"{s:.0f}" for stage, s in row.get("seconds", {}).items()}
        lo, hi = row["dev"]["ci"]
        sigma = f"{row['noise_multiplier']:.3f}" if "noise_multiplier" in row else "–"
        print(f"| {row['setting']} | {sigma} | {seconds.get('train', '–')} | {seconds.get('generate', '–')} | "
              f"{row['dev']['micro_f1']:.3f} [{lo:.2f}, {hi:.2f}] |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", help='one setting per argument, e.g. "learning_rate=0.005 privacy.steps=24"')
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--per-label", type=int, help="synthetic notes per label (default: the demo's)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # worker: one setting, appended to results.jsonl
    args = parser.parse_args()
    results = args.out / "results.jsonl"
    if args.one is not None:
        row = (real_reference(args.out, args.bootstrap) if args.one == REAL
               else run_setting(args.out, args.one, args.epsilon, args.bootstrap, args.per_label))
        with results.open("a") as out:
            out.write(json.dumps(row) + "\n")
        log(f"{args.one}: dev micro-F1 {row['dev']['micro_f1']:.3f}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for setting in [REAL, *args.settings]:
        if setting in finished(results):
            log(f"{setting}: done, skipped")
            continue
        log(f"{setting}: start")
        # One process per setting: each training's model, threads and accelerator state end with it.
        per_label = [] if args.per_label is None else ["--per-label", str(args.per_label)]
        done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--epsilon", str(args.epsilon),
                               "--bootstrap", str(args.bootstrap), *per_label, "--one", setting])
        if done.returncode != 0:
            log(f"{setting}: failed (exit {done.returncode}), continuing")
    print_table(list(finished(results).values()))


if __name__ == "__main__":
    main()
