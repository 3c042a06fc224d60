r"""`dpnotes COMMAND [--config FILE.yaml] [key.sub=value ...]`: every command of the project.

    dpnotes train --config train/configs/demo_smollm2.yaml privacy.target_epsilon=4
    dpnotes merge run_dir=runs/demo/eps_8
    dpnotes generate --config generate/configs/demo.yaml model=runs/demo/eps_8/merged run_dir=runs/demo/eps_8 \
        output_dir=runs/demo/eps_8/synthetic
    dpnotes eval coders --config eval/configs/coders.yaml synthetic=runs/demo/eps_8/synthetic/notes.jsonl
    dpnotes demo

Each command is the main of its entry script (train/dp_lora.py, generate/merge.py, ...);
`dpnotes COMMAND --help` lists its settings and their defaults.
"""
from __future__ import annotations

import argparse
import importlib

from dpnotes.console import add_console_flags, command

# name -> (module whose `main(argv)` runs it, what it does). Imported on use: `dpnotes --help` and
# a command's own --help stay quick.
COMMANDS = {
    "train": ("dpnotes.training.cli", "DP fine-tuning of a causal LM (train/dp_lora.py)"),
    "merge": ("dpnotes.generation.merge", "merge a run's LoRA adapter into its base model (generate/merge.py)"),
    "generate": ("dpnotes.generation.synthesize", "code-conditioned synthetic notes (generate/synthesize.py)"),
    "eval": ("dpnotes.evaluation.cli", "coders, DP coders, privacy and fidelity measures (eval/evaluate.py)"),
    "pipeline": ("dpnotes.study.pipeline", "train → merge → generate → evaluate for each ε, then a report"),
    "study": ("dpnotes.study.parts", "the privacy–utility study: one pipeline per corpus, then docs/results.md"),
    "demo": ("dpnotes.study.demo", "the whole study on the embedded default corpus at ε ∈ {8, ∞}"),
}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(prog="dpnotes", description=__doc__, epilog=f"commands:\n{listing}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_console_flags(parser)
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's own (see dpnotes COMMAND --help)")
    return parser


@command
def main(argv: list[str]) -> int | None:
    args = build_parser().parse_args(argv)
    module, _ = COMMANDS[args.command]
    return importlib.import_module(module).main(args.arguments)
