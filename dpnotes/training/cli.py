"""DP fine-tuning of a causal LM (DP-LoRA by default, full fine-tuning with trainable.full_finetune=true).

    dpnotes train --config train/configs/demo_smollm2.yaml privacy.target_epsilon=4 output_dir=runs/demo/eps_4
    dpnotes train --dry-run --config train/configs/demo_smollm2.yaml   # per-GPU memory plan (80 GB cards)
    dpnotes train --dry-run --gpu-memory-gb h200 --config train/configs/demo_smollm2.yaml   # on H200s (141 GB)
    dpnotes train --dry-run model=llama-70b max_length=2048 dtype=bfloat16 trainable.lora_rank=16   # any model

Re-running with the same output_dir resumes from its last checkpoint.
"""
from dpnotes.config import command_parser
from dpnotes.console import command
from dpnotes.training.config import TrainConfig, load_config
from dpnotes.training.memory_plan import dry_run, gpu_memory_gb
from dpnotes.training.recipe import train


@command
def main(argv: list[str]) -> None:
    parser = command_parser(TrainConfig, __doc__, prog="dpnotes train")
    parser.add_argument("--dry-run", action="store_true", help="print the per-GPU memory plan (ZeRO stages × 1/8/16 GPUs) and exit")
    parser.add_argument("--gpus", type=int, default=8, help="--dry-run: GPUs of the breakdown line")
    parser.add_argument("--zero", type=int, default=3, help="--dry-run: ZeRO stage of the breakdown line")
    parser.add_argument("--gpu-memory-gb", type=gpu_memory_gb, default=80.0, metavar="GB",
                        help="--dry-run: memory of one card, in GB or h100 (80) / h200 (141); default 80")
    args = parser.parse_intermixed_args(argv)
    config = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dry_run(config, gpus=args.gpus, zero=args.zero, gpu_gb=args.gpu_memory_gb))
        return
    train(config)
