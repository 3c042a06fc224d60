"""DP fine-tuning (DP-LoRA by default, full fine-tuning with trainable.full_finetune=true).

    python train/dp_lora.py --config train/configs/demo_smollm2.yaml
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml train/dp_lora.py \
        --config train/configs/demo_smollm2.yaml privacy.target_epsilon=4 output_dir=runs/demo/eps_4

    python train/dp_lora.py --dry-run --config train/configs/demo_smollm2.yaml   # per-GPU memory plan

Overrides are `key.sub=value`; `--help` lists every setting and its default. Re-running with the
same output_dir resumes from its last checkpoint.
"""
from dpnotes.training.cli import main

if __name__ == "__main__":
    main()
