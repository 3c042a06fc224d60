"""DP fine-tuning of a causal LM: `dpnotes train`, or the recipe script train/dp_lora.py.

DP-LoRA by default, full fine-tuning with trainable.full_finetune=true. Overrides are `key.sub=value`.
Re-running with the same output_dir resumes from its last checkpoint.
"""
import argparse

from dpnotes.training.recipe import train
from dpnotes.training.config import load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run configuration")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    parser.add_argument("--dry-run", action="store_true", help="print the per-GPU memory plan (ZeRO stages × 1/8/16 GPUs) and exit")
    parser.add_argument("--gpus", type=int, default=8, help="--dry-run: GPUs of the breakdown line")
    parser.add_argument("--zero", type=int, default=3, help="--dry-run: ZeRO stage of the breakdown line")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if args.dry_run:
        from dpnotes.training.memory_plan import dry_run

        print(dry_run(config, gpus=args.gpus, zero=args.zero))
        return
    train(config)

