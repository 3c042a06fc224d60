"""Merge a DP-trained LoRA adapter into its base model and save a standard HF folder whose model
card records the privacy guarantee.

    dpnotes merge run_dir=runs/demo/eps_8            # writes runs/demo/eps_8/merged

Merging is post-processing of the DP-trained adapter: it spends no privacy budget.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from dpnotes.config import command_parser, load
from dpnotes.console import command
from dpnotes.errors import UserError
from dpnotes.models import load_causal_lm
from dpnotes.runs import PRIVACY_REPORT, RunDir

CARD = """---
library_name: transformers
tags: [differential-privacy, dpnotes, clinical-notes]
---
# {name}

Causal LM fine-tuned with differentially private LoRA by dpnotes, adapter merged into `{model}`.

| privacy | value |
| --- | --- |
| ε | {epsilon} |
| δ | {delta} |
| noise multiplier σ | {noise_multiplier} |
| sampling rate q | {sample_rate} |
| steps | {steps} |
| clipping norm C | {max_grad_norm} |
| privacy unit | {privacy_unit} ({privacy_units} units) |
| accountant | {accountant} |
| data set | {corpus} |
| training config hash | {config_hash} |

The guarantee covers the weights (and anything generated from them) with respect to the training
notes, at the privacy unit above. Control codes used to prompt generation, if released from the
training notes (dp-histogram, dp-marginals), are released and accounted at the same privacy unit
({privacy_unit}); their (ε, δ) and the total with the weights' (basic composition) are reported in
the synthetic notes' manifest.json. A public prior costs nothing.
"""


def merge_run(run_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Merge run_dir/adapter into the base model named in run_dir/privacy_report.json."""
    run = RunDir(run_dir)
    if not run.adapter.is_dir() or not run.privacy_report.exists():
        raise UserError(f"{run_dir}: no LoRA adapter and privacy report to merge (a full fine-tuning run's model/ needs no merge)")
    report = json.loads(run.privacy_report.read_text())
    base, tokenizer = load_causal_lm(report["model"], dtype=dtype)
    merged = PeftModel.from_pretrained(base, run.adapter).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / PRIVACY_REPORT).write_text(json.dumps(report, indent=2))
    (out_dir / "README.md").write_text(CARD.format(name=out_dir.name, **report))
    return out_dir


@dataclass
class MergeConfig:
    run_dir: str  # a training output_dir (adapter/ + privacy_report.json)
    output_dir: str | None = None  # None: RUN_DIR/merged


@command
def main(argv: list[str]) -> None:
    args = command_parser(MergeConfig, __doc__, prog="dpnotes merge").parse_intermixed_args(argv)
    config = load(MergeConfig, args.config, args.overrides)
    run = RunDir(Path(config.run_dir))
    if not run.privacy_report.is_file():
        raise UserError(f"{run.root}: no {PRIVACY_REPORT}: not a finished training run (run_dir)")
    print(merge_run(run.root, Path(config.output_dir) if config.output_dir else run.merged))


if __name__ == "__main__":
    main()
