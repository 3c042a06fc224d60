"""`python -m dpnotes.evaluation.cli {coders,dp-classifier,privacy,fidelity} ...`

Every subcommand writes its full results as JSON (`--out`, default: stdout is left for the table)
and prints a human-readable table. Corpora are `load_corpus` specs (`mtsamples:PATH`,
`cmc2007:PATH`, `notes:PATH`, `default`, a plain path); `--option key=value` is passed to the
reader (e.g. `--option top_k_labels=10 --option exclude_document_types=true` for MTSamples).
Bad input (missing files, empty sets, no common labels) exits with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dpnotes.corpus.schema import CorpusError, Note
from dpnotes.errors import UserError

EXIT_BAD_INPUT = 2


class CLIError(UserError):
    pass


# ---------------------------------------------------------------------------------------------
# input helpers
# ---------------------------------------------------------------------------------------------
def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(pairs: Sequence[str] | None) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--option expects key=value, got {pair!r}")
        options[key.replace("-", "_")] = _parse_value(value)
    return options


def load_notes(spec: str, options: dict | None = None, what: str = "corpus") -> list[Note]:
    from dpnotes.corpus import load_corpus

    if spec != "default" and ":" not in spec and not Path(spec).exists():
        raise CLIError(f"{what}: file not found: {spec}")
    try:
        notes = load_corpus(spec, **(options or {}))
    except TypeError as error:  # an --option the reader does not take
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


def splits_from_args(args) -> tuple[list[Note], list[Note], list[Note]]:
    from dpnotes.corpus import split_by_patient

    options = parse_options(args.option)
    if args.train or args.dev or args.test:
        if not (args.train and args.dev and args.test):
            raise CLIError("--train, --dev and --test go together (or give --corpus to split)")
        sets = [load_notes(spec, options, name) for spec, name in ((args.train, "train"), (args.dev, "dev"), (args.test, "test"))]
    elif args.corpus:
        notes = load_notes(args.corpus, options)
        notes = keep_top_labels(notes, args.top_k_labels)
        split = split_by_patient(notes, tuple(args.fractions), seed=args.split_seed)
        sets = [split["train"], split["dev"], split["test"]]
    else:
        raise CLIError("give --corpus (split by patient) or --train/--dev/--test")
    if args.top_k_labels and args.train:  # explicit sets: the K most frequent train codes, applied to all three
        kept = {c for n in keep_top_labels(sets[0], args.top_k_labels) for c in n.codes}
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


def write_json(result: dict, out: Path | None) -> None:
    text = json.dumps(_jsonable(result), indent=2)
    if out is None:
        return
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
def cmd_coders(args) -> dict:
    from dpnotes.evaluation.coders import EncoderCoder, TfidfCoder, compare_train_sets

    train, dev, test = splits_from_args(args)
    synthetic = load_notes(args.synthetic, None, "synthetic") if args.synthetic else []
    if args.train_sets is None:
        train_sets = ["real", "synthetic", "real+synthetic"] if synthetic else ["real"]
    else:
        train_sets = [s.strip() for s in args.train_sets.split(",") if s.strip()]
        if not synthetic and set(train_sets) - {"real"}:
            raise CLIError("--train-sets names synthetic sets but no --synthetic was given")

    def make_coder():
        if args.coder == "tfidf":
            return TfidfCoder()
        return EncoderCoder(args.model, head=args.head, max_length=args.max_length, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            log=lambda message: print(message, file=sys.stderr))

    results = compare_train_sets(make_coder, train, synthetic, dev, test, n_bootstrap=args.bootstrap, seed=args.seed,
                                 train_sets=train_sets)
    print_table(f"{args.coder} coder on real test notes (n={len(test)})", METRIC_COLUMNS,
                [_metric_row(name, r) for name, r in results.items()])
    return {"command": "coders", "coder": args.coder, "results": results}


def _dp_coder_options(args) -> dict:
    """The options given on the command line; the others keep the chosen coder's defaults."""
    given = {"model": args.model, "max_length": args.max_length, "steps": args.steps,
             "expected_batch_size": args.batch_size, "lr": args.lr, "max_grad_norm": args.max_grad_norm}
    options = {name: value for name, value in given.items() if value is not None}
    if args.coder == "hashed" and {"model", "max_length"} & set(options):
        raise CLIError("--model and --max-length configure an encoder: --coder hashed has none")
    return options


def cmd_dp_classifier(args) -> dict:
    from dpnotes.evaluation.dp_sweep import dp_epsilon_sweep, parse_epsilon

    from dpnotes.corpus.code_lists import public_label_space

    labels = public_label_space(args.labels, args.corpus or args.train)  # before any work
    train, dev, test = splits_from_args(args)
    epsilons = [parse_epsilon(e) for e in args.epsilons.split(",") if e.strip()]
    if not epsilons:
        raise CLIError("--epsilons is empty")
    sweep = dp_epsilon_sweep(train, dev, test, labels, epsilons, n_bootstrap=args.bootstrap, seed=args.seed,
                             log=lambda message: print(message, file=sys.stderr), coder=args.coder,
                             privacy_seed=args.privacy_seed, privacy_unit=args.privacy_unit, **_dp_coder_options(args))
    rows = []
    for eps, r in sweep["by_epsilon"].items():
        p = r["privacy"]
        rows.append([eps, p["epsilon_spent"], p["noise_multiplier"], p["steps_taken"], r["metrics"]["weighted_f1"],
                     r.get("ci", {}).get("weighted_f1", "-"), r["metrics"]["micro_f1"], r["metrics"]["macro_f1"]])
    title = f"DP {args.coder} coder (n_train={len(train)}, n_test={len(test)}, {len(labels)} public labels)"
    if args.privacy_seed is not None:
        title += " — NOT PRIVATE: fixed seed"
    print_table(title,
                ["target ε", "ε spent", "σ", "steps", "weighted-F1", "95% CI", "micro-F1", "macro-F1"], rows)
    return {"command": "dp-classifier", **sweep}


def _training_prompt(model: str, tokenizer):
    """codes -> the prompt the model was trained with, from the privacy report in its folder."""
    from dpnotes.prompting import prompt_format_from

    report = Path(model) / "privacy_report.json"
    if not report.is_file():
        raise CLIError(f"{model}: no privacy_report.json with the training prompt format (use --no-prompt for bare text)")
    try:
        prompt = prompt_format_from(json.loads(report.read_text()), str(model))
    except ValueError as error:
        raise CLIError(str(error)) from None
    return lambda codes: prompt.render(codes, tokenizer)


def cmd_privacy(args) -> dict:
    from dpnotes.evaluation import leakage

    result: dict = {"command": "privacy"}
    rows = []
    needs_model = args.members or args.canaries_from
    if needs_model:
        if not args.model:
            raise CLIError("--model (a causal LM alias or folder) is needed for exposure and membership inference")
        from dpnotes.models import load_causal_lm

        model, tokenizer = load_causal_lm(args.model)
        prompt_of = None if args.no_prompt else _training_prompt(args.model, tokenizer)
    if args.canaries_from:
        notes = load_notes(args.canaries_from, None, "canary notes")
        canaries, contexts = leakage.canary_contexts(notes, prompt_of)
        if not canaries:
            raise CLIError(f"{args.canaries_from}: no note has metadata['canary']")
        exposure = leakage.canary_exposure(model, tokenizer, canaries, contexts, n_candidates=args.candidates, seed=args.seed)
        result["exposure"] = exposure
        rows += [["exposure (mean)", exposure["mean_exposure"]], ["exposure (max)", exposure["max_exposure"]],
                 ["exposure (max possible)", exposure["max_possible_exposure"]], ["canaries ranked 1st", exposure["n_rank_1"]]]
    if args.members or args.nonmembers:
        if not (args.members and args.nonmembers):
            raise CLIError("membership inference needs both --members and --nonmembers")
        members = load_notes(args.members, None, "members")[: args.max_notes]
        nonmembers = load_notes(args.nonmembers, None, "non-members")[: args.max_notes]
        mia = leakage.membership_inference(
            leakage.note_losses(model, tokenizer, members, prompt_of, max_length=args.max_length),
            leakage.note_losses(model, tokenizer, nonmembers, prompt_of, max_length=args.max_length))
        result["membership_inference"] = mia
        rows += [["MIA AUC", mia["auc"]], ["MIA TPR @ 1% FPR", mia["tpr_at_0.01_fpr"]]]
    if args.synthetic:
        if not args.train_notes:
            raise CLIError("verbatim leakage needs --train-notes (the notes the generator was trained on)")
        synthetic = load_notes(args.synthetic, None, "synthetic")
        train_notes = load_notes(args.train_notes, None, "train notes")
        from dpnotes.corpus import canary_secrets

        leak = leakage.verbatim_leakage([n.text for n in synthetic], [n.text for n in train_notes], n=args.ngram,
                                        canaries=canary_secrets(train_notes))
        if not args.per_note:
            leak.pop("per_note")
        result["verbatim"] = leak
        rows += [["LCS words (mean)", leak["lcs_words"]["mean"]], ["LCS words (max)", leak["lcs_words"]["max"]],
                 [f"{args.ngram}-gram overlap (mean)", leak[f"{args.ngram}gram_overlap"]["mean"]]]
        if "canaries" in leak:
            rows += [["canaries in output (full)", leak["canaries"]["full_in_output"]],
                     ["canary MRNs in output", leak["canaries"]["identifier_in_output"]]]
    if args.guesses:
        try:
            m, r, v = (int(x) for x in args.guesses.split(","))
        except ValueError:
            raise CLIError("--guesses expects m,r,v (canaries, guesses made, correct guesses)") from None
        bound = leakage.one_run_epsilon_lower_bound(m, r, v, args.delta, args.confidence)
        result["one_run_audit"] = {"m": m, "r": r, "v": v, "delta": args.delta, "confidence": args.confidence,
                                   "epsilon_lower_bound": bound}
        rows.append([f"ε lower bound (one run, δ={args.delta:g})", bound])
    if len(result) == 1:
        raise CLIError("nothing to do: give --canaries-from, --members/--nonmembers, --synthetic or --guesses")
    print_table("Measured privacy", ["measure", "value"], rows)
    return result


def cmd_fidelity(args) -> dict:
    from dpnotes.evaluation.fidelity import embed_texts, fidelity_report

    real = load_notes(args.real, parse_options(args.option), "real")
    synthetic = load_notes(args.synthetic, None, "synthetic")
    embed = None if args.no_embeddings else (lambda texts: embed_texts(texts, model_name=args.model, max_length=args.max_length))
    report = fidelity_report(real, synthetic, embed=embed, with_embeddings=not args.no_embeddings)
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
def _add_split_args(parser) -> None:
    parser.add_argument("--corpus", help="corpus spec, split by patient into train/dev/test")
    parser.add_argument("--train"), parser.add_argument("--dev"), parser.add_argument("--test")
    parser.add_argument("--option", action="append", help="reader option key=value (repeatable)")
    parser.add_argument("--top-k-labels", type=int, help="keep the K most frequent codes")
    parser.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1))
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON results file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpnotes.evaluation.cli", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    coders = sub.add_parser("coders", help="coders trained on real / synthetic / real+synthetic, scored on real test")
    _add_split_args(coders)
    coders.add_argument("--synthetic", help="synthetic notes (corpus spec)")
    coders.add_argument("--train-sets", help="comma list of real, synthetic, real+synthetic (default: all with --synthetic)")
    coders.add_argument("--coder", choices=("tfidf", "encoder"), default="tfidf")
    coders.add_argument("--model", default="minilm")
    coders.add_argument("--head", choices=("mean", "label_attention"), default="mean")
    coders.add_argument("--epochs", type=int, default=3)
    coders.add_argument("--batch-size", type=int, default=16)
    coders.add_argument("--lr", type=float, default=5e-5)
    coders.add_argument("--max-length", type=int, default=256)
    coders.set_defaults(func=cmd_coders)

    dp = sub.add_parser("dp-classifier", help="DP coder (DP-LoRA, DP linear probe, DP hashed n-grams) at several ε")
    _add_split_args(dp)
    dp.add_argument("--coder", choices=("lora", "probe", "hashed"), default="lora",
                    help="lora: DP-LoRA MiniLM; probe: DP linear probe on frozen MiniLM features; "
                         "hashed: DP logistic regression on hashed word n-grams")
    dp.add_argument("--epsilons", default="0.01,0.1,1,10,inf")
    # Unset options keep the chosen coder's defaults (they differ: a linear head wants larger
    # batches and learning rates than LoRA).
    dp.add_argument("--model", help="encoder alias or folder (lora, probe; default minilm)")
    dp.add_argument("--steps", type=int)
    dp.add_argument("--batch-size", type=int, help="expected logical batch size")
    dp.add_argument("--lr", type=float)
    dp.add_argument("--max-length", type=int, help="tokens per note (lora, probe)")
    dp.add_argument("--max-grad-norm", type=float)
    dp.add_argument("--privacy-unit", choices=("patient", "sequence"), default="patient")
    dp.add_argument("--labels", help="public label list: a file (one code per line) or a shipped list name "
                                     "(default: the public list of --corpus's kind)")
    dp.add_argument("--privacy-seed", type=int, help="fixed sampling/noise seed: tests and audits only, NOT private")
    dp.set_defaults(func=cmd_dp_classifier)

    priv = sub.add_parser("privacy", help="canary exposure, membership inference, verbatim leakage, one-run audit")
    priv.add_argument("--model", help="fine-tuned causal LM (alias or folder)")
    priv.add_argument("--canaries-from", help="notes with metadata['canary'] (the training set)")
    priv.add_argument("--candidates", type=int, default=1000)
    priv.add_argument("--members", help="training notes (MIA members)")
    priv.add_argument("--nonmembers", help="held-out notes (MIA non-members)")
    priv.add_argument("--max-notes", type=int, default=500)
    priv.add_argument("--max-length", type=int, default=512)
    priv.add_argument("--no-prompt", action="store_true", help="score text without the codes prompt")
    priv.add_argument("--synthetic", help="synthetic notes (verbatim leakage)")
    priv.add_argument("--train-notes", help="the generator's training notes (verbatim leakage)")
    priv.add_argument("--ngram", type=int, default=8)
    priv.add_argument("--per-note", action="store_true", help="keep per-note leakage rows in the JSON")
    priv.add_argument("--guesses", help="one-run audit from counts m,r,v")
    priv.add_argument("--delta", type=float, default=0.0)
    priv.add_argument("--confidence", type=float, default=0.95)
    priv.add_argument("--seed", type=int, default=0)
    priv.add_argument("--out", type=Path)
    priv.set_defaults(func=cmd_privacy)

    fid = sub.add_parser("fidelity", help="distance between real and synthetic notes")
    fid.add_argument("--real", required=True)
    fid.add_argument("--synthetic", required=True)
    fid.add_argument("--option", action="append", help="reader option for --real, key=value")
    fid.add_argument("--model", default="minilm")
    fid.add_argument("--max-length", type=int, default=256)
    fid.add_argument("--no-embeddings", action="store_true")
    fid.add_argument("--out", type=Path)
    fid.set_defaults(func=cmd_fidelity)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dpnotes.evaluation.coders import EvalInputError

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (CLIError, CorpusError, EvalInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
