"""DP coders across ε on one corpus (not a test; CPU, minutes): weighted and micro F1 with 95%
bootstrap CIs, σ, steps and seconds per ε, plus the non-private TF-IDF coder on the same split.

  python bench/dp_coders.py --corpus default --patients 20000 --coder hashed
  python bench/dp_coders.py --corpus cmc2007 --coder probe --epsilons 0.1,1,10,inf

Corpora: "default" (the embedded synthetic corpus, --patients), "cmc2007" (978 radiology reports,
ICD-9-CM) and "mtsamples" (top-10 specialties, document types excluded, one note per distinct
text), split by patient 80/10/10 as the pipeline does; the DP coders use the corpus kind's public
label list. Results go to bench/results/dp_coders_<corpus>_<coder>.json unless --out says.

--dev-only never reads the test split: the threshold is tuned on one half of dev (by patient) and
the scores come from the other half. --inner K reads the train split only: K partitions of it by
patient (75 % train, 12.5 % threshold, 12.5 % scored), mean ± s.e. of the weighted F1; on CMC-2007
a dev half has ~50 reports, too few to tell settings apart. Hyper-parameters are chosen these ways
(--set key=value, --no-titles).

  python bench/dp_coders.py --corpus cmc2007 --coder probe --inner 5 --epsilons 1,10,inf --no-titles
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from dpnotes.config import parse_overrides
from dpnotes.evaluation.cli import _jsonable
from dpnotes.evaluation.coders import TfidfCoder, evaluate_coder
from dpnotes.evaluation.dp_sweep import DP_CODERS, dp_epsilon_sweep, parse_epsilon

from dpnotes.corpus import load_corpus, read_cmc2007, read_mtsamples, split_by_patient
from dpnotes.corpus.code_lists import public_label_space
from dpnotes.prompting import label_titles

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load(args):
    """(notes, public labels, their public titles) of the corpus."""
    if args.corpus == "default":
        notes, labels = load_corpus("default", n_patients=args.patients), public_label_space(None, "default")
    elif args.corpus == "cmc2007":
        notes, labels = read_cmc2007(args.data / "cmc2007_radiology_icd9.xml"), public_label_space("cmc2007")
    else:
        notes = read_mtsamples(args.data / "mtsamples.csv", top_k_labels=10, exclude_document_types=True)
        labels = public_label_space("mtsamples-specialties")
    return notes, labels, ({} if args.no_titles else label_titles(labels, f"{args.corpus}:"))


def splits(notes, args) -> list[tuple[list, list, list]]:
    """[(train, threshold set, scored set)]: dev and test; the two halves of dev (--dev-only); or
    --inner K partitions of the train split alone, 75/12.5/12.5 by patient, one per seed."""
    split = split_by_patient(notes, seed=args.split_seed)
    if args.inner:
        inner = [split_by_patient(split["train"], (0.75, 0.125, 0.125), seed=args.split_seed + 1 + k)
                 for k in range(args.inner)]
        return [(part["train"], part["dev"], part["test"]) for part in inner]
    if not args.dev_only:
        return [(split["train"], split["dev"], split["test"])]
    halves = split_by_patient(split["dev"], (0.5, 0.5, 0.0), seed=args.split_seed)
    return [(split["train"], halves["train"], halves["dev"])]


def print_inner(out: dict) -> None:
    """Weighted F1 per ε over the inner partitions: mean ± standard error, and each value."""
    print(f"\n{out['corpus']} / {out['coder']} (inner partitions of train; titles {'on' if out['titles'] else 'off'}; "
          f"options {out['options'] or 'default'})")
    for eps in out["sweeps"][0]["by_epsilon"]:
        values = np.array([sweep["weighted_f1"][eps] for sweep in out["sweeps"]])
        print(f"{eps:>6}  weighted F1 {values.mean():.3f} ± {values.std() / np.sqrt(len(values)):.3f}  "
              f"({', '.join(f'{v:.3f}' for v in values)})")


def _ci(result: dict, metric: str) -> str:
    lo, hi = result.get("ci", {}).get(metric, (float("nan"), float("nan")))
    return f"{result['metrics'][metric]:.4f} [{lo:.3f}, {hi:.3f}]"


def print_table(out: dict) -> None:
    print(f"\n{out['corpus']} / {out['coder']} ({'dev halves' if out['dev_only'] else 'test'}; "
          f"train {out['data']['train']} notes, {out['data']['train_patients']} patients)")
    print(f"{'ε':>6}  {'weighted F1 [95% CI]':<24}  {'micro F1 [95% CI]':<24}  {'σ':>8}  {'steps':>5}  {'seconds':>7}")
    for eps, r in out["sweep"]["by_epsilon"].items():
        p = r["privacy"]
        print(f"{eps:>6}  {_ci(r, 'weighted_f1'):<24}  {_ci(r, 'micro_f1'):<24}  {p['noise_multiplier']:>8.3g}  "
              f"{p['steps_taken']:>5}  {r['seconds']:>7.0f}")
    if "tfidf" in out:
        r = out["tfidf"]
        print(f"{'TF-IDF':>6}  {_ci(r, 'weighted_f1'):<24}  {_ci(r, 'micro_f1'):<24}  {'(non-private)':>16}  "
              f"{r['seconds']:>7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=("default", "cmc2007", "mtsamples"), default="default")
    parser.add_argument("--coder", choices=tuple(DP_CODERS), default="hashed")
    parser.add_argument("--epsilons", default="0.1,1,10,inf")
    parser.add_argument("--patients", type=int, default=20000, help="patients of the default corpus")
    parser.add_argument("--set", action="append", help="coder option key=value (repeatable), e.g. learning_rate=0.05")
    parser.add_argument("--feature-cache", type=Path, help="probe: .npz of MiniLM features kept between runs")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--dev-only", action="store_true", help="score on half of dev, never on test (tuning)")
    choice.add_argument("--inner", type=int, default=0, metavar="K",
                        help="K partitions of the train split alone (tuning on small corpora, whose dev halves are tiny)")
    parser.add_argument("--no-titles", action="store_true", help="start the linear heads at 0, not from the code titles")
    parser.add_argument("--no-tfidf", action="store_true", help="skip the non-private TF-IDF reference")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = parse_overrides(args.set or [])
    if args.feature_cache:
        if args.coder != "probe":
            parser.error("--feature-cache is for --coder probe")
        options["feature_cache"] = args.feature_cache

    notes, labels, titles = load(args)
    parts = splits(notes, args)
    train, threshold_set, scored = parts[0]
    log(f"{args.corpus}: {len(notes)} notes → train {len(train)}, threshold {len(threshold_set)}, scored {len(scored)}"
        + (f", {len(parts)} inner partitions of the train split" if args.inner else ""))
    out = {"corpus": args.corpus, "coder": args.coder, "dev_only": args.dev_only, "inner": args.inner,
           "options": options, "titles": bool(titles),
           "data": {"notes": len(notes), "train": len(train), "train_patients": len({n.patient_id for n in train}),
                    "threshold_set": len(threshold_set), "scored_set": len(scored), "public_labels": len(labels)}}
    epsilons = [parse_epsilon(e) for e in args.epsilons.split(",")]
    out["sweeps"] = [dp_epsilon_sweep(part_train, part_threshold, part_scored, labels, epsilons,
                                      n_bootstrap=0 if args.inner else args.bootstrap, log=log, coder=args.coder,
                                      titles=titles, **options)
                     for part_train, part_threshold, part_scored in parts]
    if args.inner:
        print_inner(out)
    else:
        out["sweep"] = out.pop("sweeps")[0]
        if not args.no_tfidf:
            started = time.perf_counter()
            out["tfidf"] = evaluate_coder(TfidfCoder(), train, threshold_set, scored, n_bootstrap=args.bootstrap)
            out["tfidf"]["seconds"] = time.perf_counter() - started
        print_table(out)
    target = args.out or ROOT / "bench" / "results" / f"dp_coders_{args.corpus}_{args.coder}{'_dev' if args.dev_only else '_inner' if args.inner else ''}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(_jsonable(out), indent=1) + "\n")
    log(f"wrote {target}")


if __name__ == "__main__":
    main()
