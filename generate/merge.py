"""Merge a training run's LoRA adapter into its base model (input of generate/synthesize.py).

    python generate/merge.py run_dir=runs/demo/eps_8            # writes runs/demo/eps_8/merged
"""
from dpnotes.generation.merge import main

if __name__ == "__main__":
    main()
