"""DP fine-tuning (DP-LoRA by default, full fine-tuning with trainable.full_finetune=true).

    python train/dp_lora.py --config train/configs/demo_smollm2.yaml
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml train/dp_lora.py \
        --config train/configs/demo_smollm2.yaml privacy.target_epsilon=4 output_dir=runs/eps4

Overrides are `key.sub=value`. Re-running with the same output_dir resumes from its last checkpoint.
"""
import argparse

from dpnotes.train.recipe import train
from dpnotes.train.run_config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run configuration")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args()
    train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
