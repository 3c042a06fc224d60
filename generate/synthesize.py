"""Code-conditioned synthetic notes from a merged model (vLLM when `make vllm` built it, else transformers).

    python generate/synthesize.py --model runs/demo/eps_8/merged --run runs/demo/eps_8 --out runs/demo/eps_8/synthetic --count 100
"""
from dpnotes.generation.synthesize import main

if __name__ == "__main__":
    main()
