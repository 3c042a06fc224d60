"""The study report: per ε, what the synthetic notes are worth (a coder trained on them, scored
on real test notes, next to one trained on the real notes) and what they cost in privacy (ε,
canary exposure, membership inference), with one synthetic note per ε. Written as HTML, Markdown
and PNG, every number as JSON, the same to W&B (offline; `wandb sync` later), and a terminal table.

Honest at a glance: F1 axes run from 0 to 1 with the bootstrap CIs as error bars; exposure axes
run from 0 to the largest exposure the test can measure, with held-out canaries as the chance
reference; ε = ∞ sits at the right end of the ε axis behind a dotted break. Only synthetic notes
are read for examples: no real note text can reach the report.
"""
from __future__ import annotations

import html
import itertools
import json
import math
import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from dpnotes.runs import AUDIT_DIR, MANIFEST, NOTES, RunDir, epsilon_tag
from dpnotes.privacy.accounting import compute_epsilon

INF_GAP = 10  # ε = ∞ is drawn this factor right of the largest finite ε (one decade on the log axis)
DODGE = 1.1  # horizontal offset factor between the series of one F1 plot (log axis)
CURVE_POINTS = 50  # accountant calls per ε-vs-step curve: PLD is slow per call, long runs have 1000s of steps

# (micro-F1, its CI [low, high] or None): one point of an F1 plot
Point = tuple[float, "list[float] | None"]

INTRO = (
    "Synthetic notes are not clinical data. ε spent is the accountant's guarantee for the generator's "
    "weights; ε total adds the DP release of the code statistics that condition generation (basic "
    "composition), both at the same privacy unit (`privacy_unit`: patient, or sequence = one note). Coders "
    "are scored on real test notes; brackets are 95 % bootstrap CIs over test notes. Exposure is in bits, "
    "from 0 to log2(candidates + 1); held-out canaries were never trained on and show the exposure of chance. "
    "A membership-inference AUC of 0.5 is chance."
)
FIGURE_CAPTIONS = {
    "f1_vs_epsilon": "Coders trained on synthetic notes from the generator at each ε, scored on real test notes.",
    "dp_coder_f1_vs_epsilon": "Coders trained with DP directly on the real notes, per ε (their own ε grid).",
    "privacy_vs_epsilon": "Canary exposure (trained against held-out canaries) and loss membership inference.",
    "epsilon_vs_steps": "ε spent during generator training, by the run's own accountant.",
}


# ---- reading ------------------------------------------------------------------------------------
def _read(path: Path) -> dict | None:
    """A JSON file, or None when missing or torn (a stage may be writing it)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def epsilon_label(epsilon: float) -> str:
    return "∞" if math.isinf(epsilon) else f"{epsilon:g}"


def coder_point(result: dict | None) -> Point | None:
    """micro-F1 of an `evaluate_coder` result with its bootstrap CI."""
    f1 = (result or {}).get("metrics", {}).get("micro_f1")
    return None if f1 is None else (f1, result.get("ci", {}).get("micro_f1"))


def _ratio(value: float | None, real: Point | None) -> float | None:
    """micro-F1 as a fraction of the real-trained coder's."""
    return value / real[0] if value is not None and real and real[0] else None


def _real_point(summary: dict) -> Point | None:
    real = summary["real_coder"]
    return (real["micro_f1"], real["ci"]) if real else None


def real_coder(baselines: dict, evaluations: list[dict]) -> dict | None:
    """The coder trained on the real notes: baselines.json's, else the one every eval.json trains
    beside the synthetic coder (same notes, labels and bootstrap: the same result)."""
    if "real_tfidf" in baselines:
        return baselines["real_tfidf"]
    return next((e["coders"]["real"] for e in evaluations if "real" in e.get("coders", {})), None)


def dp_coder_sweeps(baselines: dict) -> dict[str, dict[float, dict]]:
    """The DP coders of baselines.json as {name: {ε: evaluate_coder result}}. `dp_coder` is one
    `dp_epsilon_sweep` output (it has "by_epsilon") or a dict of them keyed by coder name."""
    dp = baselines.get("dp_coder") or {}
    sweeps = {"DP-LoRA coder": dp} if "by_epsilon" in dp else dp
    return {name: {float(key): result for key, result in sweep["by_epsilon"].items()}  # float("inf") parses "inf"
            for name, sweep in sweeps.items() if isinstance(sweep, dict) and sweep.get("by_epsilon")}


def dp_coder_draws(baselines: dict) -> dict[str, dict[float, list[float]]]:
    """{name: {ε: weighted F1 of each DP training}} of the coders trained more than once per ε
    (PipelineConfig.dp_coder_draws); the first value is the coder that dp_coder_sweeps reports."""
    dp = baselines.get("dp_coder") or {}
    sweeps = {} if "by_epsilon" in dp else dp
    return {name: {float(key): values for key, values in sweep["weighted_f1_draws"].items()}
            for name, sweep in sweeps.items() if isinstance(sweep, dict) and sweep.get("weighted_f1_draws")}


def _caveats(training: dict, notes_missing: bool, evaluation: dict | None) -> list[str]:
    """What a row of the table is missing or qualified by, in words."""
    caveats = [] if training else ["not trained yet"]
    if training.get("private") is False:
        caveats.append(training.get("note", "not private"))
    if notes_missing:
        caveats.append("no synthetic notes yet")
    if evaluation is None:
        caveats.append("not evaluated yet")
    elif "exposure" not in evaluation.get("privacy", {}):
        caveats.append("no canaries measured")
    return caveats


def run_row(epsilon: float, run: RunDir, evaluation: dict | None, real: Point | None, generates: bool = True,
            prompt_only: dict | None = None) -> dict:
    """Every number the report shows for one generator ε; None where a stage has not run.
    `generates` False: a memorisation audit, which writes no notes. `prompt_only`: the coder trained on
    the same code sets written as their prompts only (the baselines' reference)."""
    training = _read(run.privacy_report) or {}
    prompt_point = coder_point(prompt_only)
    manifest = _read(run.synthetic / MANIFEST) or {}
    coders, privacy = (evaluation or {}).get("coders", {}), (evaluation or {}).get("privacy", {})
    synthetic = coder_point(coders.get("synthetic"))
    exposure = privacy.get("exposure", {})
    per_canary = exposure.get("per_canary", [])
    return {
        "target_epsilon": epsilon,
        "epsilon_spent": training.get("epsilon"),
        "delta": training.get("delta"),
        "noise_multiplier": training.get("noise_multiplier"),
        "sample_rate": training.get("sample_rate"),
        "steps": training.get("steps"),
        "accountant": training.get("accountant", "rdp"),  # the engine's default before reports named it
        "total_epsilon_with_conditioning": manifest.get("total_epsilon"),
        "privacy_unit": manifest.get("privacy_unit", training.get("privacy_unit")),
        "synthetic_micro_f1": synthetic[0] if synthetic else None,
        "synthetic_micro_f1_ci": synthetic[1] if synthetic else None,
        "f1_ratio_to_real": _ratio(synthetic[0] if synthetic else None, real),
        "prompt_only_micro_f1": prompt_point[0] if prompt_point else None,
        "prompt_only_micro_f1_ci": prompt_point[1] if prompt_point else None,
        "real_plus_synthetic_micro_f1": (coder_point(coders.get("real+synthetic")) or (None,))[0],
        "mean_exposure": exposure.get("mean_exposure"),  # over all canaries, trained and held-out
        "mean_member_exposure": exposure.get("mean_member_exposure"),
        "mean_nonmember_exposure": exposure.get("mean_nonmember_exposure"),
        "member_exposures": [r["exposure"] for r in per_canary if r.get("member") is True],
        "members_ranked_first": sum(r.get("rank") == 1 for r in per_canary if r.get("member") is True) if per_canary else None,
        "nonmember_exposures": [r["exposure"] for r in per_canary if r.get("member") is False],
        "max_exposure": exposure.get("max_exposure"),
        "max_possible_exposure": exposure.get("max_possible_exposure"),
        "mia_auc": privacy.get("membership_inference", {}).get("auc"),
        "mia_notes": [privacy["membership_inference"].get("n_members"), privacy["membership_inference"].get("n_nonmembers")]
        if "membership_inference" in privacy else None,
        "canaries_in_synthetic": privacy.get("verbatim", {}).get("canaries", {}).get("identifier_in_output"),
        "max_verbatim_words": privacy.get("verbatim", {}).get("lcs_words", {}).get("max"),
        "tokens_per_second": manifest.get("tokens_per_second"),
        "generation_backend": manifest.get("backend"),
        "run_dir": str(run.root),
        "caveats": _caveats(training, generates and not (run.synthetic / NOTES).exists(), evaluation),
    }


def collect(root: Path, epsilons: list[float], generates: bool = True) -> dict:
    """One row per generator ε, the baselines, and a note for each study-wide piece that is missing."""
    baselines = _read(root / "baselines.json") or {}
    evaluations = {epsilon: _read(RunDir(root / epsilon_tag(epsilon)).evaluation) for epsilon in epsilons}
    real = coder_point(real_coder(baselines, [e for e in evaluations.values() if e]))
    missing = []
    if real is None:
        missing.append("No coder trained on real notes yet (baselines not run, nothing evaluated): no reference line or ratio.")
    if not dp_coder_sweeps(baselines):
        missing.append("No DP coder baseline (dp_coder: false, or baselines not run yet).")
    prompt_only = {float(key): result for key, result in baselines.get("prompt_only", {}).items()}  # "inf" parses
    return {"runs": [run_row(epsilon, RunDir(root / epsilon_tag(epsilon)), evaluations[epsilon], real, generates,
                             prompt_only.get(epsilon)) for epsilon in epsilons],
            "real_coder": {"micro_f1": real[0], "ci": real[1]} if real else None,
            "baselines": baselines, "missing": missing}


def example_note(notes_path: Path) -> dict | None:
    """One synthetic note, picked deterministically: the one of median length (ties in file order),
    neither a stub nor the longest ramble. Only the generator's output file is read."""
    notes = []
    if notes_path.exists():
        for line in notes_path.read_text().splitlines():
            try:
                notes.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line while generation runs
                continue
    if not notes:
        return None
    by_length = sorted(range(len(notes)), key=lambda i: (len(notes[i]["text"]), i))
    note = notes[by_length[(len(notes) - 1) // 2]]
    return {"id": note.get("id"), "codes": list(note.get("codes", [])), "text": note["text"]}


def examples(root: Path, epsilons: list[float]) -> dict[str, dict]:
    shown = {}
    for epsilon in epsilons:
        note = example_note(RunDir(root / epsilon_tag(epsilon)).synthetic / NOTES)
        if note:
            shown[epsilon_label(epsilon)] = note
    return shown


# ---- figures -------------------------------------------------------------------------------------
def epsilon_positions(epsilons) -> dict[float, float]:
    """x of each ε on a log axis: ε itself; ∞ INF_GAP times right of the largest finite ε."""
    finite = [e for e in epsilons if not math.isinf(e)]
    far = INF_GAP * max(finite) if finite else 1.0
    return {e: far if math.isinf(e) else e for e in sorted(set(epsilons))}


def _epsilon_axis(ax, epsilons) -> dict[float, float]:
    """A log ε axis with one labelled tick per ε, ∞ last, behind a dotted break (it is off the scale)."""
    positions = epsilon_positions(epsilons)
    ax.set_xscale("log")
    ax.set_xticks(list(positions.values()), [epsilon_label(e) for e in positions])
    ax.minorticks_off()
    finite = [x for e, x in positions.items() if not math.isinf(e)]
    if finite and math.inf in positions:
        ax.axvline(math.sqrt(max(finite) * positions[math.inf]), color="0.75", linestyle=":", linewidth=1)
    ax.set_xlabel("ε (∞ = no DP)")
    return positions


def _broken(epsilons: list[float], xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """A line's points with a gap before ε = ∞ (`epsilons` ascending): no trend is drawn across the
    axis break."""
    if len(epsilons) > 1 and math.isinf(epsilons[-1]):
        return [*xs[:-1], math.nan, xs[-1]], [*ys[:-1], math.nan, ys[-1]]
    return xs, ys


def _ci(ci) -> tuple[float, float] | None:
    """A usable [low, high], or None (no bootstrap, or a metric undefined on every resample: NaN)."""
    if ci and len(ci) == 2 and all(v is not None and math.isfinite(v) for v in ci):
        return ci[0], ci[1]
    return None


def _error_bars(points: list[Point]) -> list[list[float]]:
    """Bar lengths below and above each point; none without a CI. Clamped at 0: a percentile CI
    need not contain the point estimate."""
    below, above = [], []
    for y, ci in points:
        low, high = _ci(ci) or (y, y)
        below.append(max(y - low, 0.0))
        above.append(max(high - y, 0.0))
    return [below, above]


def f1_figure(series: dict[str, dict[float, Point]], real: Point | None, title: str) -> Figure:
    """micro-F1 per ε with CI error bars on a fixed 0–1 axis (a gap never looks bigger than it is),
    and the coder trained on real notes as a dashed line with its CI band."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    positions = _epsilon_axis(ax, [e for points in series.values() for e in points])
    for index, ((label, points), marker) in enumerate(zip(series.items(), itertools.cycle("osD^v"))):
        epsilons = sorted(points)
        dodge = DODGE ** (index - (len(series) - 1) / 2)  # series side by side at a shared ε: bars stay apart
        xs, ys = [positions[e] * dodge for e in epsilons], [points[e][0] for e in epsilons]
        ax.errorbar(xs, ys, yerr=_error_bars([points[e] for e in epsilons]), fmt=marker, color=f"C{index}",
                    capsize=4, label=label)
        ax.plot(*_broken(epsilons, xs, ys), color=f"C{index}")
    if real:
        ax.axhline(real[0], color="k", linestyle="--", label="coder trained on real notes (no DP)")
        if _ci(real[1]):
            ax.axhspan(*_ci(real[1]), color="k", alpha=0.08, linewidth=0)
    ax.set(ylim=(0, 1), ylabel="micro-F1 on real test notes", title=title)
    ax.legend(fontsize=8)
    return fig


def _exposure_panel(ax, runs: list[dict]) -> None:
    """Exposure of each trained canary (dots) and their mean per ε, beside the held-out canaries,
    on 0 … the maximum measurable exposure (dashed)."""
    measured = [r for r in runs if r["max_possible_exposure"] is not None]
    positions = _epsilon_axis(ax, [r["target_epsilon"] for r in measured])
    groups = (("member", 0.9, "o", "C3", "canaries trained on"), ("nonmember", 1.1, "s", "0.45", "held-out canaries (chance)"))
    for group, shift, marker, color, label in groups:  # shift: side by side at each ε on the log axis
        for r in measured:
            values = r[f"{group}_exposures"]
            ax.scatter([positions[r["target_epsilon"]] * shift] * len(values), values, s=10, color=color, alpha=0.35,
                       clip_on=False)
        means = [r for r in measured if r[f"mean_{group}_exposure"] is not None]
        if means:
            epsilons = [r["target_epsilon"] for r in means]
            ax.plot(*_broken(epsilons, [positions[e] * shift for e in epsilons], [r[f"mean_{group}_exposure"] for r in means]),
                    marker=marker, color=color, clip_on=False, label=f"{label}: mean (dots: each)")
    top = max((r["max_possible_exposure"] for r in measured), default=1.0)
    if measured:  # over the top spine, not hidden by it
        ax.axhline(top, color="k", linestyle="--", clip_on=False, zorder=3, label=f"maximum measurable: {top:.3g} bits")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no canaries measured", transform=ax.transAxes, ha="center")
    ax.set(ylim=(0, top), ylabel="exposure (bits)", title="Canary exposure")


def _mia_panel(ax, runs: list[dict]) -> None:
    attacked = [r for r in runs if r["mia_auc"] is not None]
    positions = _epsilon_axis(ax, [r["target_epsilon"] for r in attacked])
    epsilons = [r["target_epsilon"] for r in attacked]
    ax.plot(*_broken(epsilons, [positions[e] for e in epsilons], [r["mia_auc"] for r in attacked]), "o-", label="loss attack")
    ax.axhline(0.5, color="k", linestyle=":", label="chance")
    ax.set(ylim=(0, 1), ylabel="AUC", title="Loss membership inference")
    ax.legend(fontsize=8)


def privacy_figure(runs: list[dict]) -> Figure:
    runs = sorted(runs, key=lambda r: r["target_epsilon"])  # config order need not be ascending
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    _exposure_panel(left, runs)
    _mia_panel(right, runs)
    return fig


def epsilon_curve(row: dict) -> tuple[list[int], list[float]]:
    """ε spent after up to CURVE_POINTS steps, by the run's own accountant (so the curve ends at
    the reported ε)."""
    steps = row["steps"]
    ks = sorted({max(1, round(i * steps / CURVE_POINTS)) for i in range(1, CURVE_POINTS + 1)})
    return ks, [compute_epsilon(row["noise_multiplier"], row["sample_rate"], k, row["delta"], row["accountant"]) for k in ks]


def epsilon_steps_figure(runs: list[dict]) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in runs:
        ax.plot(*epsilon_curve(row), label=f"target ε = {epsilon_label(row['target_epsilon'])} ({row['accountant']})")
    ax.set(xlabel="step", ylabel="ε spent", title="Privacy spent during training")
    ax.legend(fontsize=8)
    return fig


def figures(summary: dict) -> dict[str, Figure]:
    """Each figure that has something to show (a missing one is named in the report)."""
    runs, out = summary["runs"], {}
    real = _real_point(summary)
    synthetic = {r["target_epsilon"]: (r["synthetic_micro_f1"], r["synthetic_micro_f1_ci"])
                 for r in runs if r["synthetic_micro_f1"] is not None}
    prompt_points = {r["target_epsilon"]: (r["prompt_only_micro_f1"], r["prompt_only_micro_f1_ci"])
                     for r in runs if r.get("prompt_only_micro_f1") is not None}
    if synthetic:
        series = {"coder trained on synthetic notes": synthetic,
                  "same code sets, prompt only (no model)": prompt_points}
        out["f1_vs_epsilon"] = f1_figure({k: v for k, v in series.items() if v}, real,
                                         "Utility of synthetic notes vs the generator's ε")
    sweeps = dp_coder_sweeps(summary["baselines"])
    if sweeps:
        series = {f"{name} on real notes": {e: p for e, r in sweep.items() if (p := coder_point(r))}
                  for name, sweep in sweeps.items()}
        out["dp_coder_f1_vs_epsilon"] = f1_figure({k: v for k, v in series.items() if v}, real,
                                                  "DP coders trained on real notes vs ε")
    if any(r["max_possible_exposure"] is not None or r["mia_auc"] is not None for r in runs):
        out["privacy_vs_epsilon"] = privacy_figure(runs)
    noisy = [r for r in runs if r["noise_multiplier"] and r["steps"]]
    if noisy:
        out["epsilon_vs_steps"] = epsilon_steps_figure(noisy)
    return out


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- tables --------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def _fmt_ci(value, ci) -> str:
    bounds = _ci(ci)
    return f"{_fmt(value)} [{_fmt(bounds[0])}, {_fmt(bounds[1])}]" if value is not None and bounds else _fmt(value)


SUMMARY_HEADER = ["ε (target)", "ε spent by the weights", "ε total (weights + key terms + conditioning)", "privacy unit",
                  "synthetic-coder micro-F1 [95 % CI]", "÷ real-trained coder",
                  "prompt-only coder micro-F1 [95 % CI] (same code sets, no model)", "exposure: trained canaries (mean bits)",
                  "exposure: held-out canaries (mean bits)", "max measurable exposure (bits)", "MIA AUC (0.5 = chance)",
                  "canary IDs in synthetic notes", "longest verbatim run (words)", "notes written by", "caveats"]


def summary_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The study per generator ε, as strings (HTML, Markdown, terminal and W&B show the same)."""
    rows = [[_fmt(r["target_epsilon"]), _fmt(r["epsilon_spent"]), _fmt(r["total_epsilon_with_conditioning"]),
             _fmt(r["privacy_unit"]), _fmt_ci(r["synthetic_micro_f1"], r["synthetic_micro_f1_ci"]),
             _fmt(r["f1_ratio_to_real"]), _fmt_ci(r["prompt_only_micro_f1"], r["prompt_only_micro_f1_ci"]),
             _fmt(r["mean_member_exposure"]),
             _fmt(r["mean_nonmember_exposure"]), _fmt(r["max_possible_exposure"]), _fmt(r["mia_auc"]),
             _fmt(r["canaries_in_synthetic"]), _fmt(r["max_verbatim_words"]), _fmt(r.get("generation_backend")),
             "; ".join(r["caveats"])]
            for r in summary["runs"]]
    return SUMMARY_HEADER, rows


DP_THRESHOLD_NOTE = ("ε covers a DP coder's weights. Its one decision threshold is set on the real dev notes "
                     "without DP: that single number is outside the guarantee.")
AUDIT_HEADER = ["ε (target)", "ε spent", "σ", "steps", "sampling rate q", "exposure: trained canaries (mean bits)",
                "trained canaries ranked 1st (ties count)", "exposure: held-out canaries (mean bits)",
                "max measurable exposure (bits)", "MIA AUC (0.5 = chance)", "MIA notes (members / non-members)", "caveats"]


def audit_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The memorisation audit per ε: how far the trained canaries stand out from chance."""
    rows = [[_fmt(r["target_epsilon"]), _fmt(r["epsilon_spent"]), _fmt(r["noise_multiplier"]), _fmt(r["steps"]),
             _fmt(r["sample_rate"]), _fmt(r["mean_member_exposure"]),
             f"{r['members_ranked_first']} / {len(r['member_exposures'])}" if r.get("members_ranked_first") is not None else "–",
             _fmt(r["mean_nonmember_exposure"]), _fmt(r["max_possible_exposure"]), _fmt(r["mia_auc"]),
             " / ".join(_fmt(n) for n in r["mia_notes"]) if r.get("mia_notes") else "–", "; ".join(r["caveats"])]
            for r in runs]
    return AUDIT_HEADER, rows


def chance_exposure(max_exposure: float) -> float:
    """Mean exposure of a canary the model never saw: its rank uniform among the n + 1 candidates,
    log2(n + 1) − E[log2 rank] (about 1.4 bits for any large n)."""
    n_plus_1 = round(2 ** max_exposure)
    return max_exposure - math.lgamma(n_plus_1 + 1) / math.log(2) / n_plus_1


def _passes(runs: list[dict]) -> float | None:
    """Expected times each unit is sampled (q × steps), the most over the runs."""
    passes = [r["sample_rate"] * r["steps"] for r in runs if r.get("sample_rate") and r.get("steps")]
    return max(passes) if passes else None


def _exposure_scale(runs: list[dict]) -> str:
    tops = {r["max_possible_exposure"] for r in runs if r.get("max_possible_exposure")}
    if len(tops) != 1:
        return "exposure is in bits from 0 to log2(candidates + 1), chance about 1.4 bits"
    top = tops.pop()
    return (f"exposure is in bits from 0 to {top:.3g} ({round(2 ** top) - 1} random candidates); a canary the model "
            f"never saw scores {chance_exposure(top):.2g} bits on average")


def audit_intro(main_runs: list[dict] | None, audit_runs: list[dict]) -> str:
    """What the audit measures, with the sampling of both studies read from their runs."""
    main, audit = _passes(main_runs or []), _passes(audit_runs)
    if main_runs is None:
        text = "A memorisation audit: no synthetic notes. It "
    else:
        seen = f"about {main:.2g} times in expectation" if main is not None else "a number of times not yet known"
        text = f"The runs above sample each privacy unit {seen}. The audit "
    text += (f"trains on a small corpus with planted canaries, each unit sampled "
             f"{f'about {audit:.2g} times' if audit is not None else 'many times'}, and measures how far the trained "
             f"canaries stand out from random candidates: {_exposure_scale(audit_runs)}. Held-out canaries, never "
             "trained on, show chance as measured. A loss membership-inference AUC of 0.5 is chance.")
    return text


def dp_coder_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["coder", "ε (target)", "ε spent", "micro-F1 [95 % CI]", "÷ real-trained coder", "caveats"]
    rows = []
    for name, sweep in dp_coder_sweeps(summary["baselines"]).items():
        for epsilon in sorted(sweep):
            result, privacy = sweep[epsilon], sweep[epsilon].get("privacy", {})
            point = coder_point(result) or (None, None)
            rows.append([name, _fmt(epsilon), _fmt(privacy.get("epsilon_spent")), _fmt_ci(*point),
                         _fmt(_ratio(point[0], _real_point(summary))), privacy.get("note", "")])
    return header, rows


# ---- the document --------------------------------------------------------------------------------
def document(summary: dict, drawn: dict[str, Path], samples: dict[str, dict]) -> list[tuple]:
    """The report as blocks ("h1"/"h2"/"p", text), ("table", header, rows), ("img", src, alt),
    ("pre", text), rendered by `_markdown` and `_html`."""
    if not summary.get("generates", True):
        return audit_document(summary, drawn)
    real = _real_point(summary)
    blocks = [("h1", "dpnotes study report"), ("p", INTRO), ("table", *summary_table(summary)),
              ("p", f"Coder trained on the real notes (no DP): micro-F1 {_fmt_ci(*real) if real else '–'}.")]
    if dp_coder_sweeps(summary["baselines"]):
        blocks += [("h2", "DP coders trained on real notes"), ("table", *dp_coder_table(summary)),
                   ("p", DP_THRESHOLD_NOTE)]
    blocks.append(("h2", "Figures"))
    for name, caption in FIGURE_CAPTIONS.items():
        blocks += [("img", drawn[name].name, caption), ("p", caption)] if name in drawn else [("p", f"{name}: nothing to plot yet.")]
    blocks.append(("h2", "One synthetic note per ε (generated, not real)"))
    for label, note in samples.items():
        blocks += [("p", f"ε = {label} · {note['id']} · codes: {', '.join(note['codes']) or 'none'}"), ("pre", note["text"])]
    if summary.get("audit"):
        audit = summary["audit"]
        blocks += [("h2", "Memorisation audit (a small corpus seen many times)"),
                   ("p", audit_intro(summary["runs"], audit["runs"])), ("table", *audit_table(audit["runs"]))]
        if audit.get("figure"):
            blocks += [("img", audit["figure"], "Memorisation audit: canary exposure and loss MIA."),
                       ("p", "Memorisation audit: canary exposure and loss MIA.")]
    if summary["missing"]:
        blocks += [("h2", "Missing pieces"), *(("p", text) for text in summary["missing"])]
    return blocks


def audit_document(summary: dict, drawn: dict[str, Path]) -> list[tuple]:
    """The report of a pipeline that writes no notes (synthetic_count 0): the audit table and figures."""
    blocks = [("h1", "dpnotes memorisation audit"), ("p", audit_intro(None, summary["runs"])), ("table", *audit_table(summary["runs"]))]
    for name in ("privacy_vs_epsilon", "epsilon_vs_steps"):
        if name in drawn:
            blocks += [("img", drawn[name].name, FIGURE_CAPTIONS[name]), ("p", FIGURE_CAPTIONS[name])]
    return blocks


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _markdown(blocks: list[tuple]) -> str:
    lines = []
    for kind, *content in blocks:
        if kind == "h1":
            lines.append(f"# {content[0]}")
        elif kind == "h2":
            lines.append(f"## {content[0]}")
        elif kind == "p":
            lines.append(content[0])
        elif kind == "table":
            header, rows = content
            lines += [_md_row(header), "|" + " --- |" * len(header), *(_md_row(r) for r in rows)]
        elif kind == "img":
            lines.append(f"![{content[1]}]({content[0]})")
        elif kind == "pre":  # a fence longer than any backtick run in the note
            fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", content[0])), default=0))
            lines += [fence, content[0], fence]
        lines.append("")
    return "\n".join(lines)


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
         "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px;text-align:left}"
         "pre{white-space:pre-wrap;background:#f4f4f4;padding:8px}img{max-width:100%}")


def _html(blocks: list[tuple]) -> str:
    """Every text is escaped: note text is model output and may hold markup."""
    e, body = html.escape, []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "p", "pre"):
            body.append(f"<{kind}>{e(content[0])}</{kind}>")
        elif kind == "table":
            header, rows = content
            body.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
        elif kind == "img":
            body.append(f'<img src="{e(content[0])}" alt="{e(content[1])}">')
    return (f"<!doctype html><meta charset=utf-8><title>dpnotes report</title><style>{STYLE}</style>"
            f"<body>\n" + "\n".join(body) + "\n</body>")


def _audit_runs(summary: dict) -> list[dict] | None:
    """The audit rows to show: the runs themselves in an audit's own report, else its joined table."""
    if not summary.get("generates", True):
        return summary["runs"]
    return (summary.get("audit") or {}).get("runs")


def audit_summary(root: Path) -> dict | None:
    """The audit's rows from its own report (audit/report.json), with its exposure figure."""
    report = _read(root / AUDIT_DIR / "report.json")
    if not report:
        return None
    figure = root / AUDIT_DIR / "privacy_vs_epsilon.png"
    return {"runs": report["runs"], "figure": f"{AUDIT_DIR}/{figure.name}" if figure.exists() else None}


def write_report(root: Path, config, terminal: bool = True) -> Path:
    """report.html/.md/.json and figures in root, W&B runs, and (terminal) the summary tables printed."""
    root = Path(root)
    summary = {**collect(root, config.epsilons, config.generates), "generates": config.generates}
    if config.audit:
        summary["audit"] = audit_summary(root)
        if not summary["audit"]:
            summary["missing"].append("The memorisation audit has not run yet.")
    drawn = {name: _save(fig, root / f"{name}.png") for name, fig in figures(summary).items()}
    samples = examples(root, config.epsilons)
    (root / "report.json").write_text(json.dumps({**summary, "examples": samples}, indent=2, default=str))
    blocks = document(summary, drawn, samples)
    (root / "report.md").write_text(_markdown(blocks))
    (root / "report.html").write_text(_html(blocks))
    _to_wandb(root, summary, drawn, config)
    if terminal:
        _print_summary(summary)
    return root / "report.html"


def _to_wandb(root: Path, summary: dict, drawn: dict[str, Path], config) -> None:
    if config.report_to != "wandb":
        return
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    group = f"{root.parent.name}-{AUDIT_DIR}" if root.name == AUDIT_DIR else root.name  # audits of different studies apart
    for row in summary["runs"]:
        run = wandb.init(project="dpnotes", group=group, name=f"{group}-eps-{_fmt(row['target_epsilon'])}",
                         job_type="study", dir=str(root), reinit="create_new",
                         config={k: row[k] for k in ("target_epsilon", "noise_multiplier", "sample_rate", "steps", "delta")})
        run.summary.update({k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        run.finish()
    run = wandb.init(project="dpnotes", group=group, name=f"{group}-report", job_type="report", dir=str(root),
                     reinit="create_new")
    run.log({name: wandb.Image(str(path)) for name, path in drawn.items()})
    if summary.get("generates", True):
        header, rows = summary_table(summary)
        run.log({"study": wandb.Table(columns=header, data=rows)})
    audit = _audit_runs(summary)
    if audit:
        header, rows = audit_table(audit)
        run.log({"memorisation_audit": wandb.Table(columns=header, data=rows)})
    run.finish()


# The summary columns a terminal has room for, with short names
TERMINAL_COLUMNS = {"ε (target)": "ε", "ε spent by the weights": "ε spent", "ε total (weights + key terms + conditioning)": "ε total",
                    "synthetic-coder micro-F1 [95 % CI]": "F1 synthetic", "÷ real-trained coder": "÷ real",
                    "prompt-only coder micro-F1 [95 % CI] (same code sets, no model)": "F1 prompt only",
                    "exposure: trained canaries (mean bits)": "exposure trained",
                    "exposure: held-out canaries (mean bits)": "exposure held-out", "MIA AUC (0.5 = chance)": "MIA AUC",
                    "caveats": "caveats"}


AUDIT_TERMINAL_COLUMNS = {"ε (target)": "ε", "ε spent": "ε spent", "exposure: trained canaries (mean bits)": "exposure trained",
                          "trained canaries ranked 1st (ties count)": "ranked 1st", "exposure: held-out canaries (mean bits)": "exposure held-out",
                          "max measurable exposure (bits)": "max", "MIA AUC (0.5 = chance)": "MIA AUC", "caveats": "caveats"}


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def printed(title: str, table: tuple[list[str], list[list[str]]], columns: dict[str, str]) -> Table:
        """The table's `columns` (full name → short name) that a terminal has room for, each value
        without its CI (the report has them)."""
        header, rows = table
        # A column with nothing measured (no caveats; "–" where a part plants no canaries) gives its width to the numbers.
        keep = [header.index(column) for column in columns if any(row[header.index(column)] not in ("", _fmt(None)) for row in rows)]
        with_ci = any(" [" in row[i] for row in rows for i in keep)
        shown = Table(title=title, caption="95 % CIs: report.html" if with_ci else None)
        for index in keep:
            shown.add_column(columns[header[index]], overflow="fold")  # a narrow terminal wraps a value, never cuts it
        for row in rows:
            shown.add_row(*(row[i].split(" [")[0] for i in keep))
        return shown

    console = Console()
    if summary.get("generates", True):
        console.print(printed("dpnotes study", summary_table(summary), TERMINAL_COLUMNS))
    audit = _audit_runs(summary)
    if audit:
        console.print(printed("memorisation audit (a small corpus seen many times)", audit_table(audit), AUDIT_TERMINAL_COLUMNS))
