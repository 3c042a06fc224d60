"""`make demo`: the whole study on the embedded default corpus (or `--real PATH`).

ε ∈ {8, ∞}: DP-LoRA fine-tuning of SmolLM2-135M → merge → 6 synthetic notes per public label,
prompted with the codes' titles and conditioned on DP-released code statistics → coders on them,
a DP coder on the real notes, canary exposure, membership inference, leakage; then a memorisation
audit (the same model on 20 patients seen ~12 times, ε = 8 vs ∞, canaries-only) → report. Re-running
skips finished stages and resumes an interrupted one. `make study` runs the full ε grid on three
corpora (docs/results.md).

    dpnotes demo
    dpnotes demo --real ../shared/data/mtsamples.csv
    dpnotes demo train.privacy.steps=6 "epsilons=[8]"     # overrides reach the main runs, not the audit
    dpnotes demo audit=null                                # without the memorisation audit
"""
from __future__ import annotations

from pathlib import Path

from dpnotes.config import command_parser
from dpnotes.console import command
from dpnotes.study.pipeline import ROOT, Pipeline, PipelineConfig, load_pipeline_config

DEMO = ROOT / "dpnotes" / "study" / "configs" / "pipeline_demo.yaml"


@command
def main(argv: list[str]) -> None:
    parser = command_parser(PipelineConfig, __doc__, DEMO, prog="dpnotes demo")
    parser.add_argument("--real", metavar="PATH", help="a real corpus instead of the default (e.g. ../shared/data/mtsamples.csv)")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.real:
        # One MTSamples text is its own patient: the sequence is the privacy unit there.
        overrides = [f"output_dir=runs/demo-real-{Path(args.real).stem}", f"train.corpus={args.real}",
                     "train.privacy.privacy_unit=sequence", *overrides]
    report = Pipeline(load_pipeline_config(args.config, overrides)).run()
    print(f"\nreport written: {report.resolve()}")


if __name__ == "__main__":
    main()
