"""The privacy–utility study (`make study`): one pipeline per corpus, then docs/results.md.

    dpnotes study                          # every part of dpnotes/study/configs/study.yaml
    dpnotes study --only default           # one part (also: python -m dpnotes.study --only default)
    dpnotes study --stage baselines        # the real and DP coders of every part
    dpnotes study --results-only           # rewrite docs/results.md from what has run

Each part is a pipeline run (dpnotes.study.pipeline): generators at their ε grid, DP coders at theirs, or
only the DP coders (`only: baselines`). Every stage resumes where it stopped, so an interrupted
study is re-run with the same command. results.md gets one section per part with 95 % CIs and each
target of issue 11 checked against the measured numbers; a part with no run folder on this machine
keeps the section it had, marked as kept.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpnotes.config import Origin, command_parser, dotted_keys, load, merge, read_yaml, yaml_text
from dpnotes.console import command
from dpnotes.study.pipeline import ROOT, STAGES, Pipeline, PipelineConfig, log, pipeline_config, read_json
from dpnotes.study.report import collect, dp_coder_draws, dp_coder_sweeps, epsilon_label

STUDY = ROOT / "dpnotes" / "study" / "configs" / "study.yaml"


@dataclass
class StudyPart:
    config: str  # a pipeline config
    title: str = ""
    only: str | None = None  # a pipeline stage, e.g. "baselines" for DP coders alone
    overrides: dict = field(default_factory=dict)  # pipeline settings over the config's
    targets: dict = field(default_factory=dict)  # see check_targets


@dataclass
class StudyConfig:
    output_dir: str = "runs/study"
    results: str = "docs/results.md"
    parts: dict[str, StudyPart] = field(default_factory=dict)


def load_study_config(path: Path, overrides: list[str] = ()) -> StudyConfig:
    return load(StudyConfig, path, overrides)


def part_pipeline(study: StudyConfig, name: str) -> PipelineConfig:
    part = study.parts[name]
    path = ROOT / part.config
    values = merge(read_yaml(path), part.overrides, {"output_dir": str(Path(study.output_dir) / name)})
    return pipeline_config(values, Origin(str(path), dotted_keys(part.overrides), f"the overrides of study part {name}"))


# ---- numbers -------------------------------------------------------------------------------------
def _ci_text(value: float | None, ci) -> str:
    if value is None:
        return "—"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def metric(result: dict | None, name: str) -> tuple[float | None, list | None]:
    if not result:
        return None, None
    return result.get("metrics", {}).get(name), result.get("ci", {}).get(name)


def check_targets(targets: dict, summary: dict) -> list[str]:
    """Lines "met / missed by …" for the targets a part declares:
    synthetic_ratio {epsilon, at_least}: synthetic-coder micro-F1 ÷ real-trained at ε;
    synthetic_gap {epsilon, within}: |micro-F1 at ε − micro-F1 at ∞|;
    dp_gap {epsilon, within}: |weighted F1 of each DP coder at ε − the same coder at ∞|."""
    runs = {row["target_epsilon"]: row for row in summary["runs"]}
    lines = []
    if "synthetic_ratio" in targets:
        goal = targets["synthetic_ratio"]
        ratio = runs.get(float(goal["epsilon"]), {}).get("f1_ratio_to_real")
        lines.append(_verdict(f"synthetic coder at ε = {goal['epsilon']:g} ≥ {goal['at_least']} × real-trained",
                              ratio, ratio is not None and ratio >= goal["at_least"], f"{_num(ratio)} ×"))
    if "synthetic_gap" in targets:
        goal = targets["synthetic_gap"]
        at, ref = (runs.get(e, {}).get("synthetic_micro_f1") for e in (float(goal["epsilon"]), math.inf))
        gap = None if at is None or ref is None else ref - at
        lines.append(_verdict(f"synthetic coder at ε = {goal['epsilon']:g} within {goal['within']} of ε = ∞",
                              gap, gap is not None and gap <= goal["within"], f"gap {_num(gap)}"))
    if "dp_gap" in targets:
        goal = targets["dp_gap"]
        all_draws = dp_coder_draws(summary["baselines"])
        for coder, sweep in dp_coder_sweeps(summary["baselines"]).items():
            at, ref = (metric(sweep.get(e), "weighted_f1")[0] for e in (float(goal["epsilon"]), math.inf))
            draws = all_draws.get(coder, {}).get(float(goal["epsilon"]), [])
            if len(draws) > 1 and ref is not None:  # judged on the recipe, not on one draw of its noise
                gap = ref - float(np.mean(draws))
                shown = (f"gap {_num(gap)}, mean of {len(draws)} DP trainings; one training's gap "
                         f"{_num(ref - max(draws))} to {_num(ref - min(draws))}")
            else:
                gap = None if at is None or ref is None else ref - at
                shown = f"gap {_num(gap)}"
            lines.append(_verdict(f"DP {coder} coder at ε = {goal['epsilon']:g} within {goal['within']} weighted F1 of ε = ∞",
                                  gap, gap is not None and gap <= goal["within"], shown))
    return lines


def _verdict(what: str, value, met: bool, shown: str) -> str:
    state = "not measured yet" if value is None else ("**met**" if met else "**missed**")
    return f"- {what}: {state} ({shown})"


# ---- results.md ----------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def part_section(name: str, part: StudyPart, config: PipelineConfig, seconds: float | None) -> list[str]:
    root = Path(config.output_dir)
    summary = collect(root, [] if part.only == "baselines" else config.epsilons, config.generates)
    baselines = summary["baselines"]
    real = baselines.get("real_tfidf")
    lines = [f"## {part.title or name}", "",
             f"`dpnotes study --only {name}` (pipeline config `{part.config}`"
             + (f", overrides `{yaml_text(part.overrides)}`" if part.overrides else "") + f"); run folder `{root}`"
             + (f"; {seconds / 60:.1f} min wall time over all its runs (timed on private data: outside the DP guarantee)" if seconds else "") + ".", ""]
    if real:
        lines += [f"Coder trained on real notes (TF-IDF + logistic regression, no privacy): micro-F1 "
                  f"{_ci_text(*metric(real, 'micro_f1'))}, weighted F1 {_ci_text(*metric(real, 'weighted_f1'))}; "
                  f"notes train/dev/test {real.get('n_train')}/{real.get('n_dev')}/{real.get('n_test')}.", ""]
    if part.only != "baselines":
        rows = []
        for row in summary["runs"]:
            rows.append([epsilon_label(row["target_epsilon"]), _num(row["epsilon_spent"]), _num(row["total_epsilon_with_conditioning"]),
                         _ci_text(row["synthetic_micro_f1"], row["synthetic_micro_f1_ci"]), _num(row["f1_ratio_to_real"]),
                         _ci_text(row["prompt_only_micro_f1"], row["prompt_only_micro_f1_ci"]),
                         f"{_num(row['mean_member_exposure'])} / {_num(row['mean_nonmember_exposure'])} (max {_num(row['max_possible_exposure'])})",
                         _num(row["mia_auc"]), "; ".join(row["caveats"])])
        lines += ["Coders trained on synthetic notes, tested on real notes. \"prompt only\" trains the same coder on the "
                  "same code sets with each note replaced by its prompt: its codes' public titles and the run's DP key "
                  "terms, if it released them (no model). It is the reference a generator's text has to beat.", "",
                  *_table(["generator ε", "ε spent (weights)", "ε total (+ key terms, conditioning)", "micro-F1 [95 % CI]",
                           "÷ real", "prompt only [95 % CI]", "exposure trained / held-out canaries (bits)", "MIA AUC", "caveats"], rows), ""]
    rows, all_draws = [], dp_coder_draws(baselines)
    for coder, sweep in dp_coder_sweeps(baselines).items():
        for epsilon in sorted(sweep):
            result = sweep[epsilon]
            privacy = result.get("privacy", {})
            draws = all_draws.get(coder, {}).get(epsilon, [])
            rows.append([coder, epsilon_label(epsilon), _num(privacy.get("epsilon_spent")), _num(privacy.get("noise_multiplier")),
                         _num(privacy.get("steps_taken")), _num(privacy.get("expected_batch_size")), _num(privacy.get("privacy_units")),
                         _ci_text(*metric(result, "weighted_f1")), _ci_text(*metric(result, "micro_f1")),
                         *([f"{np.mean(draws):.3f} ± {np.std(draws, ddof=1):.3f} ({len(draws)})" if len(draws) > 1 else "—"]
                           if all_draws else []),
                         privacy.get("note", "")])
    if rows:
        spread = (["weighted F1 of the DP trainings: mean ± s.d. (trainings)"] if all_draws else [])
        lines += ["DP coders trained on the real notes (public label space), tested on real notes"
                  + (". Each finite ε was trained several times with new secret seeds: the first training is the "
                     "coder of the row; the spread is the DP noise's alone (each training is its own ε release; "
                     "the test notes are the same)" if all_draws else "") + ":", "",
                  *_table(["coder", "ε", "ε spent", "σ", "steps", "expected batch", "privacy units", "weighted F1 [95 % CI]",
                           "micro-F1 [95 % CI]", *spread, "caveats"], rows), ""]
    checks = check_targets(part.targets, summary)
    if checks:
        lines += ["Targets:", "", *checks, ""]
    return lines


KEPT = ("Kept from the previous results file: this machine has no run folder for this part "
        "(re-run it with `dpnotes study --only {name}`).")


def _sections(path: Path) -> dict[str, list[str]]:
    """{"## title" line: the section's lines up to the next heading} of an existing results file."""
    sections, current = {}, None
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith("## "):
            current = sections.setdefault(line, [])
        if current is not None:
            current.append(line)
    return sections


def write_results(study: StudyConfig, seconds: dict[str, float]) -> Path:
    """Rewrite the results file: a section per part from its run folder. A part whose folder is not
    on this machine keeps its section from the file as it was (measured elsewhere or before), so a
    study spread over machines or sessions loses nothing; one never measured says so."""
    path = ROOT / study.results if not Path(study.results).is_absolute() else Path(study.results)
    previous = _sections(path)
    lines = [f"# Measured results: the privacy–utility study ({time.strftime('%Y-%m-%d')}, CPU, 2 cores)", "",
             "Made by `make study` (`dpnotes study --config dpnotes/study/configs/study.yaml`); 95 % CIs are "
             "bootstrap intervals over the real test notes. Synthetic notes and DP coders are scored on the real "
             "test split only; hyper-parameters were chosen on train/dev (docs/utility.md). Every coder's one "
             "decision threshold is set on the real dev notes without DP: for a DP coder the guarantee covers its "
             "weights, and that single number is outside it. The memorisation audit "
             "(many passes over a small corpus) is in docs/memorisation.md.", ""]
    for name, part in study.parts.items():
        config = part_pipeline(study, name)
        heading = f"## {part.title or name}"
        kept, note = previous.get(heading, []), KEPT.format(name=name)
        if Path(config.output_dir).exists():
            lines += part_section(name, part, config, seconds.get(name))
        elif kept and "Not run yet." not in kept:
            lines += kept if note in kept else [*kept[:2], note, "", *kept[2:]]
        else:
            lines += [heading, "", "Not run yet.", ""]
    path.write_text("\n".join(lines))
    return path


@command
def main(argv: list[str]) -> None:
    parser = command_parser(StudyConfig, __doc__, STUDY, prog="dpnotes study")
    parser.add_argument("--only", action="append", help="run these parts only (repeatable)")
    parser.add_argument("--stage", choices=STAGES, help="run this pipeline stage only (e.g. baselines: the DP coders)")
    parser.add_argument("--results-only", action="store_true", help="rewrite the results file from finished work")
    args = parser.parse_intermixed_args(argv)
    study = load_study_config(args.config, args.overrides)
    unknown = set(args.only or []) - set(study.parts)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; the study has {sorted(study.parts)}")
    timings_path = Path(study.output_dir) / "timings.json"
    seconds = read_json(timings_path) or {}
    if not args.results_only:
        for name, part in study.parts.items():
            if args.only and name not in args.only:
                continue
            log(f"study part {name}: {part.title}")
            started = time.perf_counter()
            if part.only and args.stage and args.stage != part.only:
                continue
            Pipeline(part_pipeline(study, name)).run(only=part.only or args.stage)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started  # summed over resumed runs
            timings_path.parent.mkdir(parents=True, exist_ok=True)
            timings_path.write_text(json.dumps(seconds, indent=2))
    print(f"results: {write_results(study, seconds)}")


if __name__ == "__main__":
    main()
