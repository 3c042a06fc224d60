"""DP coders across ε on one corpus (not a test; CPU, minutes): weighted and micro F1 with 95%
bootstrap CIs, σ, steps and seconds per ε, plus the non-private TF-IDF coder on the same split.

  python bench/dp_coders.py --corpus default --patients 20000 --coder hashed
  python bench/dp_coders.py --corpus cmc2007 --coder probe --epsilons 0.1,1,10,inf

Corpora: "default" (the embedded synthetic corpus, --patients), "cmc2007" (978 radiology reports,
ICD-9-CM) and "mtsamples" (top-10 specialties, document types excluded, one note per distinct
text), split by patient 80/10/10 as the pipeline does; the DP coders use the corpus kind's public
label list. Results go to bench/results/dp_coders_<corpus>_<coder>.json unless --out says.

--dev-only never reads the test split: the threshold is tuned on one half of dev (by patient) and
the scores come from the other half. Hyper-parameters are chosen this way (--set key=value).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from dpnotes.config import parse_overrides
from dpnotes.evaluation.cli import _jsonable
from dpnotes.evaluation.coders import TfidfCoder, evaluate_coder
from dpnotes.evaluation.dp_sweep import DP_CODERS, dp_epsilon_sweep, parse_epsilon

from dpnotes.corpus import load_corpus, read_cmc2007, read_mtsamples, split_by_patient
from dpnotes.corpus.code_lists import public_label_space

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load(args):
    """(notes, public labels) of the corpus."""
    if args.corpus == "default":
        return load_corpus("default", n_patients=args.patients), public_label_space(None, "default")
    if args.corpus == "cmc2007":
        return read_cmc2007(args.data / "cmc2007_radiology_icd9.xml"), public_label_space("cmc2007")
    notes = read_mtsamples(args.data / "mtsamples.csv", top_k_labels=10, exclude_document_types=True)
    return notes, public_label_space("mtsamples-specialties")


def splits(notes, args):
    """(train, threshold set, scored set): dev and test, or the two halves of dev (--dev-only)."""
    split = split_by_patient(notes, seed=args.split_seed)
    if not args.dev_only:
        return split["train"], split["dev"], split["test"]
    halves = split_by_patient(split["dev"], (0.5, 0.5, 0.0), seed=args.split_seed)
    return split["train"], halves["train"], halves["dev"]


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
    parser.add_argument("--dev-only", action="store_true", help="score on half of dev, never on test (tuning)")
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

    notes, labels = load(args)
    train, threshold_set, scored = splits(notes, args)
    log(f"{args.corpus}: {len(notes)} notes → train {len(train)}, threshold {len(threshold_set)}, scored {len(scored)}")
    out = {"corpus": args.corpus, "coder": args.coder, "dev_only": args.dev_only, "options": options,
           "data": {"notes": len(notes), "train": len(train), "train_patients": len({n.patient_id for n in train}),
                    "threshold_set": len(threshold_set), "scored_set": len(scored), "public_labels": len(labels)}}
    epsilons = [parse_epsilon(e) for e in args.epsilons.split(",")]
    out["sweep"] = dp_epsilon_sweep(train, threshold_set, scored, labels, epsilons, n_bootstrap=args.bootstrap,
                                    log=log, coder=args.coder, **options)
    if not args.no_tfidf:
        started = time.perf_counter()
        out["tfidf"] = evaluate_coder(TfidfCoder(), train, threshold_set, scored, n_bootstrap=args.bootstrap)
        out["tfidf"]["seconds"] = time.perf_counter() - started
    print_table(out)
    target = args.out or ROOT / "bench" / "results" / f"dp_coders_{args.corpus}_{args.coder}{'_dev' if args.dev_only else ''}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(_jsonable(out), indent=1) + "\n")
    log(f"wrote {target}")


if __name__ == "__main__":
    main()
