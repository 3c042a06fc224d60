"""The study report: privacy–utility plots (PNG), tables and example notes as Markdown and HTML,
every figure as JSON, the same to W&B (offline; `wandb sync` later), and a terminal summary."""
from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dpnotes.train.dp.accounting import compute_epsilon  # noqa: E402

EXAMPLES_PER_EPSILON = 2
EXAMPLE_CHARS = 600


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _finite(value: float, cap: float) -> float:
    """Plot ε = ∞ at a visible position right of the largest finite ε."""
    return cap if math.isinf(value) else value


def collect(root: Path, epsilons: list[float]) -> dict:
    from dpnotes.pipeline import epsilon_tag

    rows = []
    for epsilon in epsilons:
        run = root / epsilon_tag(epsilon)
        training = _read(run / "privacy_report.json") or {}
        manifest = _read(run / "synthetic" / "manifest.json") or {}
        evaluation = _read(run / "eval.json") or {}
        coders = evaluation.get("coders", {})
        privacy = evaluation.get("privacy", {})
        synthetic = coders.get("synthetic", {})
        rows.append({
            "target_epsilon": epsilon,
            "epsilon_spent": training.get("epsilon"),
            "delta": training.get("delta"),
            "noise_multiplier": training.get("noise_multiplier"),
            "sample_rate": training.get("sample_rate"),
            "steps": training.get("steps"),
            "total_epsilon_with_conditioning": manifest.get("total_epsilon"),
            "privacy_unit": manifest.get("privacy_unit", training.get("privacy_unit")),
            "synthetic_micro_f1": synthetic.get("metrics", {}).get("micro_f1"),
            "synthetic_micro_f1_ci": synthetic.get("ci", {}).get("micro_f1"),
            "real_plus_synthetic_micro_f1": coders.get("real+synthetic", {}).get("metrics", {}).get("micro_f1"),
            "mean_exposure": privacy.get("exposure", {}).get("mean_member_exposure"),
            "mean_nonmember_exposure": privacy.get("exposure", {}).get("mean_nonmember_exposure"),
            "max_exposure": privacy.get("exposure", {}).get("max_exposure"),
            "max_possible_exposure": privacy.get("exposure", {}).get("max_possible_exposure"),
            "mia_auc": privacy.get("membership_inference", {}).get("auc"),
            "canaries_in_synthetic": privacy.get("verbatim", {}).get("canaries", {}).get("identifier_in_output"),
            "max_verbatim_words": privacy.get("verbatim", {}).get("lcs_words", {}).get("max"),
            "tokens_per_second": manifest.get("tokens_per_second"),
            "run_dir": str(run),
        })
    return {"runs": rows, "baselines": _read(root / "baselines.json") or {}}


def epsilon_curve(report: dict, accountant: str = "rdp") -> list[float]:
    steps, sigma, q, delta = report["steps"], report["noise_multiplier"], report["sample_rate"], report["delta"]
    if not sigma:
        return [math.inf] * steps
    return [compute_epsilon(sigma, q, k, delta, accountant) for k in range(1, steps + 1)]


def plot_all(root: Path, summary: dict) -> dict[str, Path]:
    runs = summary["runs"]
    finite = [r["target_epsilon"] for r in runs if not math.isinf(r["target_epsilon"])]
    cap = 2 * max(finite) if finite else 1.0
    xs = [_finite(r["target_epsilon"], cap) for r in runs]
    labels = ["∞" if math.isinf(r["target_epsilon"]) else f"{r['target_epsilon']:g}" for r in runs]
    figures = {}

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["synthetic_micro_f1"] for r in runs], "o-", label="coder trained on synthetic notes")
    real = summary["baselines"].get("real_tfidf", {}).get("metrics", {}).get("micro_f1")
    if real is not None:
        ax.axhline(real, color="k", linestyle="--", label="coder trained on real notes (no DP)")
    dp = summary["baselines"].get("dp_coder", {}).get("by_epsilon", {})
    if dp:
        dp_x = [_finite(float(e), cap) for e in dp]
        ax.plot(dp_x, [v["metrics"]["micro_f1"] for v in dp.values()], "s-", label="DP-LoRA coder on real notes")
    ax.set(xscale="log", xlabel="ε (target; rightmost = ∞)", ylabel="micro-F1 on real test notes", title="Utility vs privacy")
    ax.set_xticks(xs, labels)
    ax.minorticks_off()
    ax.legend(fontsize=8)
    figures["f1_vs_epsilon"] = _save(fig, root / "f1_vs_epsilon.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        report = _read(Path(run["run_dir"]) / "privacy_report.json")
        if report and report.get("noise_multiplier"):
            curve = epsilon_curve(report)
            ax.plot(range(1, len(curve) + 1), curve, label=f"target ε = {run['target_epsilon']:g}")
    ax.set(xlabel="step", ylabel="ε spent (RDP)", title="Privacy spent during training")
    ax.legend(fontsize=8)
    figures["epsilon_vs_steps"] = _save(fig, root / "epsilon_vs_steps.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.plot(xs, [r["mean_exposure"] for r in runs], "o-", label="canaries trained on (mean)")
    left.plot(xs, [r["mean_nonmember_exposure"] for r in runs], "s:", label="held-out canaries (mean)")
    left.set(xscale="log", xlabel="ε", ylabel="exposure (bits)", title="Canary exposure")
    left.set_xticks(xs, labels)
    left.minorticks_off()
    left.legend(fontsize=8)
    right.plot(xs, [r["mia_auc"] for r in runs], "o-")
    right.axhline(0.5, color="k", linestyle=":")
    right.set(xscale="log", xlabel="ε", ylabel="AUC", title="Loss membership inference")
    right.set_xticks(xs, labels)
    right.minorticks_off()
    figures["privacy_vs_epsilon"] = _save(fig, root / "privacy_vs_epsilon.png")
    return figures


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


TABLE_COLUMNS = ["target_epsilon", "epsilon_spent", "total_epsilon_with_conditioning", "privacy_unit", "noise_multiplier", "steps",
                 "synthetic_micro_f1", "synthetic_micro_f1_ci", "mean_exposure", "mean_nonmember_exposure", "mia_auc",
                 "canaries_in_synthetic", "max_verbatim_words"]


def examples(root: Path, epsilons: list[float]) -> dict[str, list[dict]]:
    from dpnotes.pipeline import epsilon_tag

    shown = {}
    for epsilon in epsilons:
        path = root / epsilon_tag(epsilon) / "synthetic" / "notes.jsonl"
        if path.exists():
            notes = [json.loads(line) for line in path.read_text().splitlines()[:EXAMPLES_PER_EPSILON]]
            shown[epsilon_tag(epsilon)] = [{"codes": n["codes"], "text": n["text"][:EXAMPLE_CHARS]} for n in notes]
    return shown


def write_report(root: Path, config) -> Path:
    summary = collect(root, config.epsilons)
    figures = plot_all(root, summary)
    samples = examples(root, config.epsilons)
    (root / "report.json").write_text(json.dumps({**summary, "examples": samples}, indent=2, default=str))

    table = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    table += ["| " + " | ".join(_fmt(row[c]) for c in TABLE_COLUMNS) + " |" for row in summary["runs"]]
    real = summary["baselines"].get("real_tfidf", {}).get("metrics", {}).get("micro_f1")
    dp = summary["baselines"].get("dp_coder", {}).get("by_epsilon", {})
    lines = ["# dpnotes study report", "",
             "Synthetic notes are not clinical data. ε is the accountant's guarantee for the generator's "
             "weights; `total_epsilon_with_conditioning` adds the DP release of the code statistics (basic "
             "composition), both at the same `privacy_unit` (patient or sequence = one note).", "",
             *table, "",
             f"Coder trained on real notes (no privacy): micro-F1 {_fmt(real)}.",
             "DP-LoRA coder trained on real notes: " + ", ".join(
                 f"ε={eps}: micro-F1 {_fmt(r['metrics']['micro_f1'])}" for eps, r in dp.items()) if dp else "", ""]
    lines += [f"![{name}]({path.name})" for name, path in figures.items()]
    lines += ["", "## Example synthetic notes", ""]
    for tag, notes in samples.items():
        for note in notes:
            lines += [f"**{tag}** · codes {', '.join(note['codes'])}", "", "```", note["text"], "```", ""]
    markdown = "\n".join(lines)
    (root / "report.md").write_text(markdown)
    (root / "report.html").write_text(_html(lines))
    _to_wandb(root, summary, figures, config)
    _print_summary(summary)
    return root / "report.html"


def _html(lines: list[str]) -> str:
    body, in_code = [], False
    for line in lines:
        if line == "```":
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
        elif in_code:
            body.append(html.escape(line))
        elif line.startswith("!["):
            body.append(f'<img src="{html.escape(line[line.index("(") + 1:-1])}" style="max-width:800px">')
        elif line.startswith("|") and "---" not in line:
            cells = "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|"))
            body.append(f"<tr>{cells}</tr>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line and "---" not in line:
            body.append(f"<p>{html.escape(line)}</p>")
    text = "\n".join(body).replace("<tr>", "<table border=1 cellpadding=4><tr>", 1).replace("</tr>\n<p>", "</tr></table>\n<p>", 1)
    return f"<!doctype html><meta charset=utf-8><title>dpnotes report</title><body>{text}</body>"


def _to_wandb(root: Path, summary: dict, figures: dict[str, Path], config) -> None:
    if config.report_to != "wandb":
        return
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    group = root.name
    for row in summary["runs"]:
        run = wandb.init(project="dpnotes", group=group, name=f"{group}-eps-{_fmt(row['target_epsilon'])}",
                         job_type="study", dir=str(root), reinit="create_new",
                         config={k: row[k] for k in ("target_epsilon", "noise_multiplier", "sample_rate", "steps", "delta")})
        run.summary.update({k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None
                            and not (isinstance(v, float) and math.isinf(v))})
        run.finish()
    run = wandb.init(project="dpnotes", group=group, name=f"{group}-report", job_type="report", dir=str(root),
                     reinit="create_new")
    run.log({name: wandb.Image(str(path)) for name, path in figures.items()})
    columns = TABLE_COLUMNS
    run.log({"study": wandb.Table(columns=columns, data=[[_fmt(r[c]) for c in columns] for r in summary["runs"]])})
    run.finish()


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dpnotes study")
    for column in ("ε target", "ε spent", "ε total", "unit", "synthetic-coder F1", "mean exposure", "MIA AUC"):
        table.add_column(column)
    for r in summary["runs"]:
        table.add_row(*(_fmt(r[c]) for c in ("target_epsilon", "epsilon_spent", "total_epsilon_with_conditioning",
                                               "privacy_unit", "synthetic_micro_f1", "mean_exposure", "mia_auc")))
    Console().print(table)
