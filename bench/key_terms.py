"""What the prompt alone teaches a coder: titles, then DP key terms per code at several ε, scored on
real dev notes only (not a test; CPU, seconds per row, no model).

    python bench/key_terms.py --conditioning runs/demo/eps_8/synthetic/conditioning.json 1 2 4 inf
    python bench/key_terms.py --part mtsamples --count 200 --conditioning runs/study/mtsamples/eps_8/synthetic/conditioning.json 2

Each row releases key terms from the train split of the demo's corpus, or a study part's (`--part`;
dpnotes/privacy/keywords.py, at the run's privacy unit, vocabulary and terms per code), writes each
of the release's code sets as its prompt (titles, then "Key terms: …"; `prompt_only_notes`) and trains the TF-IDF coder of
bench/generator_sweep.py on them: C and threshold on one half of the real dev split, micro-F1 on the
other half. The code sets are a saved conditioning release (no new ε spent on them); the first row is
titles only. The key-term noise is fresh each run (OS entropy), so rows move by a few hundredths
between runs.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from generator_sweep import DEMO, dev_halves, dev_score
from sampling_sweep import PART_CONFIGS

from dpnotes.corpus.code_lists import public_label_space
from dpnotes.corpus.schema import Note
from dpnotes.evaluation.references import prompt_only_notes
from dpnotes.generation.conditioning import CodeSetDistribution
from dpnotes.models import load_tokenizer
from dpnotes.privacy.keywords import dp_code_keywords, keyword_units, public_vocabulary
from dpnotes.study.pipeline import Pipeline, load_pipeline_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("epsilons", nargs="+", type=float, help="key-term ε per row (inf: the exact ranking)")
    parser.add_argument("--conditioning", type=Path, required=True, help="a saved code-set release (conditioning.json)")
    parser.add_argument("--part", help="a study part (study_<part>.yaml) instead of the demo")
    parser.add_argument("--count", type=int, default=630)
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args()
    config_path = PART_CONFIGS / f"study_{args.part}.yaml" if args.part else DEMO
    pipeline = Pipeline(load_pipeline_config(config_path, ["report_to=none"]))
    config = pipeline.train_config(pipeline.config.epsilons[0])
    train_notes, threshold_half, scored_half = dev_halves(pipeline)
    code_sets = CodeSetDistribution.load(args.conditioning).sample(args.count, 0)
    notes = [Note(f"prompt-{i:06d}", f"prompt-{i:06d}", "", list(codes)) for i, codes in enumerate(code_sets)]
    units = keyword_units(train_notes, config.privacy.privacy_unit)
    labels = public_label_space(None, config.corpus)
    vocabulary = public_vocabulary(load_tokenizer(config.model))
    print("| key terms | terms released | codes with terms | dev micro-F1 [95 % CI] |")
    print("| --- | --- | --- | --- |")
    for epsilon in [None, *args.epsilons]:
        keywords = None if epsilon is None else dp_code_keywords(
            units, labels, vocabulary, epsilon, 1 / (10 * len(units)), privacy_unit=config.privacy.privacy_unit,
            top_k=config.keywords_per_code).keywords
        scored = dev_score(train_notes, threshold_half, scored_half, prompt_only_notes(notes, pipeline.titles, keywords),
                           args.bootstrap)
        name = "none (titles only)" if epsilon is None else ("exact (ε = ∞)" if math.isinf(epsilon) else f"ε = {epsilon:g}")
        released = sum(map(len, keywords.values())) if keywords else 0
        with_terms = sum(map(bool, keywords.values())) if keywords else 0
        low, high = scored["ci"]
        print(f"| {name} | {released} | {with_terms} of {len(labels)} | {scored['micro_f1']:.3f} [{low:.2f}, {high:.2f}] |",
              flush=True)


if __name__ == "__main__":
    main()
