"""`dpnotes eval {coders,dp-classifier,privacy,fidelity} [--config FILE.yaml] [key=value ...]`

    dpnotes eval coders --config eval/configs/coders.yaml synthetic=runs/demo/eps_8/synthetic/notes.jsonl
    dpnotes eval dp-classifier corpus=default coder=hashed "epsilons=[1, 8, .inf]" labels=icd10cm-default

Every subcommand writes its full results as JSON to `output_file` (if set) and prints a table.
Corpora are `load_corpus` specs (`mtsamples:PATH`, `cmc2007:PATH`, `notes:PATH`, `default`, a
plain path); `reader_options` go to the reader (e.g. `reader_options.exclude_document_types=true`
for MTSamples). Bad input (missing files, empty sets, no common labels) exits with status 2 and one
line on stderr. `dpnotes eval SUBCOMMAND --help` lists the subcommand's settings.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dpnotes.config import add_config_arguments, load
from dpnotes.console import add_console_flags, command
from dpnotes.caches import corpus_cache
from dpnotes.corpus import Note, canary_secrets, corpus_table, notes_of, split_by_patient
from dpnotes.corpus.code_lists import public_label_space
from dpnotes.errors import UserError
from dpnotes.evaluation import leakage
from dpnotes.evaluation.coders import EncoderCoder, TfidfCoder, compare_train_sets
from dpnotes.evaluation.dp_sweep import DPCoderKind, DPCoderSettings, dp_epsilon_sweep
from dpnotes.evaluation.fidelity import embed_texts, fidelity_report
from dpnotes.models import ComputeDtype, compute_dtype, load_causal_lm
from dpnotes.prompting import label_titles, prompt_format_from


class CLIError(UserError):
    pass




# ---------------------------------------------------------------------------------------------
# settings, one dataclass per subcommand
# ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class NotesConfig:
    """The real notes: a corpus split by patient, or explicit train/dev/test sets."""

    corpus: str | None = None
    train: str | None = None
    dev: str | None = None
    test: str | None = None
    reader_options: dict = field(default_factory=dict)  # keyword options of the corpus reader
    top_k_labels: int | None = None  # keep the K most frequent codes
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    split_seed: int = 0
    bootstrap: int = 1000  # resamples for the CIs (0: none)
    seed: int = 0
    output_file: str | None = None  # the JSON results


@dataclass(kw_only=True)
class CodersConfig(NotesConfig):
    synthetic: str | None = None  # synthetic notes (corpus spec)
    train_sets: list[str] | None = None  # of real, synthetic, real+synthetic (None: all that the notes allow)
    coder: Literal["tfidf", "encoder"] = "tfidf"
    model: str = "minilm"
    head: Literal["mean", "label_attention"] = "mean"
    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 5e-5
    max_length: int = 256


@dataclass(kw_only=True)
class DPClassifierConfig(DPCoderSettings, NotesConfig):
    # probe: DP linear probe on frozen MiniLM features (the best on small corpora, docs/utility.md §4);
    # hashed: DP logistic regression on hashed word n-grams; lora: DP-LoRA MiniLM (minutes per ε on a CPU)
    coder: DPCoderKind = "probe"
    epsilons: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, math.inf])
    privacy_unit: Literal["patient", "sequence"] = "patient"
    labels: str | None = None  # public label list: a file (one code per line) or a shipped list's name
    privacy_seed: int | None = None  # fixed sampling/noise seed: tests and audits only, NOT private


@dataclass(kw_only=True)
class PrivacyEvalConfig:
    model: str | None = None  # the fine-tuned causal LM (alias or folder): exposure and membership inference
    canaries_from: str | None = None  # notes with metadata['canary'] (the training set)
    canary_candidates: int = 1000
    members: str | None = None  # training notes (membership inference)
    nonmembers: str | None = None  # held-out notes
    mia_notes: int = 500  # members and as many non-members
    max_length: int = 512
    dtype: ComputeDtype = "auto"  # of the scored model (dpnotes.models.compute_dtype); float32 for an exact re-check
    prompt: bool = True  # score the notes after the model's training prompt (false: bare text)
    synthetic: str | None = None  # synthetic notes (verbatim leakage)
    train_notes: str | None = None  # the generator's training notes (verbatim leakage)
    ngram: int = 8
    per_note: bool = False  # keep per-note leakage rows in the JSON
    guesses: list[int] | None = None  # one-run audit from the counts [m, r, v]
    delta: float = 0.0
    confidence: float = 0.95
    seed: int = 0
    output_file: str | None = None


@dataclass(kw_only=True)
class FidelityConfig:
    real: str
    synthetic: str
    reader_options: dict = field(default_factory=dict)  # for the real notes
    model: str = "minilm"
    max_length: int = 256
    embeddings: bool = True
    output_file: str | None = None


# ---------------------------------------------------------------------------------------------
# input helpers
# ---------------------------------------------------------------------------------------------
def load_notes(spec: str, options: dict | None = None, what: str = "corpus") -> list[Note]:
    if spec != "default" and ":" not in spec and not Path(spec).exists():
        raise CLIError(f"{what}: file not found: {spec}")
    try:
        notes = notes_of(corpus_table(spec, corpus_cache(), **(options or {})))
    except TypeError as error:  # a reader option the reader does not take
        raise CLIError(f"{what}: bad reader option ({error})") from None
    if not notes:
        raise CLIError(f"{what}: {spec} has no notes")
    return notes


def keep_top_labels(notes: list[Note], k: int | None) -> list[Note]:
    """Restrict codes to the k most frequent (ties by name); notes left without codes are dropped."""
    if not k:
        return notes
    counts = Counter(c for n in notes for c in set(n.codes))
    kept = {c for c, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:k]}
    out = [Note(n.id, n.patient_id, n.text, sorted(set(n.codes) & kept), n.metadata) for n in notes]
    return [n for n in out if n.codes]


def splits_of(config: NotesConfig) -> tuple[list[Note], list[Note], list[Note]]:
    options = config.reader_options
    if config.train or config.dev or config.test:
        if not (config.train and config.dev and config.test):
            raise CLIError("train, dev and test go together (or give corpus to split)")
        sets = [load_notes(spec, options, name) for spec, name in ((config.train, "train"), (config.dev, "dev"), (config.test, "test"))]
    elif config.corpus:
        notes = load_notes(config.corpus, options)
        notes = keep_top_labels(notes, config.top_k_labels)
        split = split_by_patient(notes, tuple(config.fractions), seed=config.split_seed)
        sets = [split["train"], split["dev"], split["test"]]
    else:
        raise CLIError("give corpus (split by patient) or train, dev and test")
    if config.top_k_labels and config.train:  # explicit sets: the K most frequent train codes, applied to all three
        kept = {c for n in keep_top_labels(sets[0], config.top_k_labels) for c in n.codes}
        sets = [[Note(n.id, n.patient_id, n.text, sorted(set(n.codes) & kept), n.metadata) for n in s] for s in sets]
        sets = [[n for n in s if n.codes] for s in sets]
    for name, notes in zip(("train", "dev", "test"), sets):
        if not notes:
            raise CLIError(f"{name} set is empty")
    common = {c for n in sets[0] for c in n.codes} & {c for n in sets[2] for c in n.codes}
    if not common:
        raise CLIError("no labels in common between the train and test notes")
    return sets[0], sets[1], sets[2]


# ---------------------------------------------------------------------------------------------
# output helpers
# ---------------------------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def write_json(result: dict, output_file: str | None) -> None:
    if output_file is None:
        return
    out = Path(output_file)
    text = json.dumps(_jsonable(result), indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}", file=sys.stderr)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4f}")
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{_fmt(value[0])}, {_fmt(value[1])}]"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    cells = [[_fmt(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in cells:
            table.add_row(*row)
        console = Console() if sys.stdout.isatty() else Console(width=max(100, 16 * len(columns)))
        console.print(table)
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _metric_row(name: str, result: dict) -> list:
    metrics, ci = result["metrics"], result.get("ci", {})
    return [name, result["n_train"], metrics["micro_f1"], ci.get("micro_f1", "-"), metrics["macro_f1"],
            metrics["weighted_f1"], metrics.get("p@1", float("nan")), metrics["micro_auc"], metrics["macro_auc"]]


METRIC_COLUMNS = ["train set", "n train", "micro-F1", "95% CI", "macro-F1", "weighted-F1", "P@1", "micro-AUC", "macro-AUC"]


# ---------------------------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------------------------
def cmd_coders(config: CodersConfig) -> dict:
    train, dev, test = splits_of(config)
    synthetic = load_notes(config.synthetic, None, "synthetic") if config.synthetic else []
    if config.train_sets is None:
        train_sets = ["real", "synthetic", "real+synthetic"] if synthetic else ["real"]
    else:
        train_sets = config.train_sets
        if not synthetic and set(train_sets) - {"real"}:
            raise CLIError("train_sets names synthetic sets but no synthetic notes were given")

    def make_coder():
        if config.coder == "tfidf":
            return TfidfCoder()
        return EncoderCoder(config.model, head=config.head, max_length=config.max_length, epochs=config.epochs,
                            batch_size=config.batch_size, lr=config.learning_rate, seed=config.seed,
                            log=lambda message: print(message, file=sys.stderr))

    results = compare_train_sets(make_coder, train, synthetic, dev, test, n_bootstrap=config.bootstrap, seed=config.seed,
                                 train_sets=train_sets)
    print_table(f"{config.coder} coder on real test notes (n={len(test)})", METRIC_COLUMNS,
                [_metric_row(name, r) for name, r in results.items()])
    return {"command": "coders", "coder": config.coder, "results": results}


def cmd_dp_classifier(config: DPClassifierConfig) -> dict:
    labels = public_label_space(config.labels, config.corpus or config.train)  # before any work
    titles = label_titles(labels, config.corpus or config.train)
    train, dev, test = splits_of(config)
    if not config.epsilons:
        raise CLIError("epsilons is empty")
    for epsilon in config.epsilons:
        if math.isnan(epsilon) or epsilon <= 0:
            raise CLIError(f"epsilons: each must be > 0 or .inf, got {epsilon}")
    sweep = dp_epsilon_sweep(train, dev, test, labels, config.epsilons, n_bootstrap=config.bootstrap, seed=config.seed,
                             log=lambda message: print(message, file=sys.stderr), coder=config.coder, titles=titles,
                             privacy_seed=config.privacy_seed, privacy_unit=config.privacy_unit, **config.coder_options(config.coder))
    rows = []
    for eps, r in sweep["by_epsilon"].items():
        p = r["privacy"]
        rows.append([eps, p["epsilon_spent"], p["noise_multiplier"], p["steps_taken"], r["metrics"]["weighted_f1"],
                     r.get("ci", {}).get("weighted_f1", "-"), r["metrics"]["micro_f1"], r["metrics"]["macro_f1"]])
    title = f"DP {config.coder} coder (n_train={len(train)}, n_test={len(test)}, {len(labels)} public labels)"
    if config.privacy_seed is not None:
        title += " — NOT PRIVATE: fixed seed"
    print_table(title,
                ["target ε", "ε spent", "σ", "steps", "weighted-F1", "95% CI", "micro-F1", "macro-F1"], rows)
    return {"command": "dp-classifier", **sweep}


def _training_prompt(model: str, tokenizer):
    """codes -> the prompt the model was trained with, from the privacy report in its folder."""
    report = Path(model) / "privacy_report.json"
    if not report.is_file():
        raise CLIError(f"{model}: no privacy_report.json with the training prompt format (prompt=false for bare text)")
    try:
        prompt = prompt_format_from(json.loads(report.read_text()), str(model))
    except ValueError as error:
        raise CLIError(str(error)) from None
    return lambda codes: prompt.render(codes, tokenizer)


def cmd_privacy(config: PrivacyEvalConfig) -> dict:
    result: dict = {"command": "privacy"}
    rows = []
    needs_model = config.members or config.canaries_from
    if needs_model:
        if not config.model:
            raise CLIError("model (a causal LM alias or folder) is needed for exposure and membership inference")
        model, tokenizer = load_causal_lm(config.model, dtype=compute_dtype(config.dtype))
        prompt_of = None if not config.prompt else _training_prompt(config.model, tokenizer)
    if config.canaries_from:
        notes = load_notes(config.canaries_from, None, "canary notes")
        canaries, contexts = leakage.canary_contexts(notes, prompt_of)
        if not canaries:
            raise CLIError(f"{config.canaries_from}: no note has metadata['canary']")
        exposure = leakage.canary_exposure(model, tokenizer, canaries, contexts, n_candidates=config.canary_candidates, seed=config.seed)
        result["exposure"] = exposure
        rows += [["exposure (mean)", exposure["mean_exposure"]], ["exposure (max)", exposure["max_exposure"]],
                 ["exposure (max possible)", exposure["max_possible_exposure"]], ["canaries ranked 1st", exposure["n_rank_1"]]]
    if config.members or config.nonmembers:
        if not (config.members and config.nonmembers):
            raise CLIError("membership inference needs both members and nonmembers")
        members = load_notes(config.members, None, "members")[: config.mia_notes]
        nonmembers = load_notes(config.nonmembers, None, "non-members")[: config.mia_notes]
        mia = leakage.membership_inference(
            leakage.note_losses(model, tokenizer, members, prompt_of, max_length=config.max_length),
            leakage.note_losses(model, tokenizer, nonmembers, prompt_of, max_length=config.max_length))
        result["membership_inference"] = mia
        rows += [["MIA AUC", mia["auc"]], ["MIA TPR @ 1% FPR", mia["tpr_at_0.01_fpr"]]]
    if config.synthetic:
        if not config.train_notes:
            raise CLIError("verbatim leakage needs train_notes (the notes the generator was trained on)")
        synthetic = load_notes(config.synthetic, None, "synthetic")
        train_notes = load_notes(config.train_notes, None, "train notes")
        leak = leakage.verbatim_leakage([n.text for n in synthetic], [n.text for n in train_notes], n=config.ngram,
                                        canaries=canary_secrets(train_notes))
        if not config.per_note:
            leak.pop("per_note")
        result["verbatim"] = leak
        rows += [["LCS words (mean)", leak["lcs_words"]["mean"]], ["LCS words (max)", leak["lcs_words"]["max"]],
                 [f"{config.ngram}-gram overlap (mean)", leak[f"{config.ngram}gram_overlap"]["mean"]]]
        if "canaries" in leak:
            rows += [["canaries in output (full)", leak["canaries"]["full_in_output"]],
                     ["canary MRNs in output", leak["canaries"]["identifier_in_output"]]]
    if config.guesses:
        if len(config.guesses) != 3:
            raise CLIError("guesses expects [m, r, v] (canaries, guesses made, correct guesses)")
        m, r, v = config.guesses
        bound = leakage.one_run_epsilon_lower_bound(m, r, v, config.delta, config.confidence)
        result["one_run_audit"] = {"m": m, "r": r, "v": v, "delta": config.delta, "confidence": config.confidence,
                                   "epsilon_lower_bound": bound}
        rows.append([f"ε lower bound (one run, δ={config.delta:g})", bound])
    if len(result) == 1:
        raise CLIError("nothing to do: give canaries_from, members and nonmembers, synthetic or guesses")
    print_table("Measured privacy", ["measure", "value"], rows)
    return result


def cmd_fidelity(config: FidelityConfig) -> dict:
    real = load_notes(config.real, config.reader_options, "real")
    synthetic = load_notes(config.synthetic, None, "synthetic")
    embed = None if not config.embeddings else (lambda texts: embed_texts(texts, model_name=config.model, max_length=config.max_length))
    report = fidelity_report(real, synthetic, embed=embed, with_embeddings=config.embeddings)
    rows = [[f"mean words ({k})", report["text"][k]["mean_words"]] for k in ("real", "synthetic")]
    rows += [[f"type-token ratio ({k})", report["text"][k]["mean_type_token_ratio"]] for k in ("real", "synthetic")]
    rows += [["synthetic vocabulary seen in real", report["vocabulary"]["synthetic_types_in_real"]],
             ["vocabulary Jaccard", report["vocabulary"]["jaccard"]]]
    if "codes" in report:
        rows += [["code TV distance", report["codes"]["total_variation"]], ["code JS divergence", report["codes"]["jensen_shannon_divergence"]]]
    if "embedding" in report:
        rows += [["embedding Fréchet distance", report["embedding"]["frechet_distance"]],
                 ["cosine of mean embeddings", report["embedding"]["mean_cosine"]]]
    print_table(f"Fidelity: {len(synthetic)} synthetic vs {len(real)} real notes", ["measure", "value"], rows)
    return {"command": "fidelity", **report}


# ---------------------------------------------------------------------------------------------
# Subcommand -> (its settings, what it does, one line of help).
SUBCOMMANDS: dict[str, tuple[type, Callable[..., dict], str]] = {
    "coders": (CodersConfig, cmd_coders, "coders trained on real / synthetic / real+synthetic, scored on real test"),
    "dp-classifier": (DPClassifierConfig, cmd_dp_classifier,
                      "DP coder (DP-LoRA, DP linear probe, DP hashed n-grams) at several ε"),
    "privacy": (PrivacyEvalConfig, cmd_privacy, "canary exposure, membership inference, verbatim leakage, one-run audit"),
    "fidelity": (FidelityConfig, cmd_fidelity, "distance between real and synthetic notes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpnotes eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_console_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (settings, _, summary) in SUBCOMMANDS.items():
        add_config_arguments(sub.add_parser(name, help=summary, description=summary), settings)
    return parser


@command
def main(argv: Sequence[str]) -> None:
    parser = build_parser()
    # Subcommands rule out parse_intermixed_args: overrides after --config are gathered here instead.
    args, rest = parser.parse_known_args(argv)
    stray = [item for item in rest if "=" not in item or item.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *rest]
    settings, run, _ = SUBCOMMANDS[args.command]
    config = load(settings, args.config, args.overrides)
    write_json(run(config), config.output_file)


if __name__ == "__main__":
    main()
