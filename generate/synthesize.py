"""Code-conditioned synthetic notes from a merged model (vLLM when `make vllm` built it, else transformers).

    python generate/synthesize.py --config generate/configs/demo.yaml model=runs/demo/eps_8/merged \
        run_dir=runs/demo/eps_8 output_dir=runs/demo/eps_8/synthetic

`--help` lists every setting and its default.
"""
from dpnotes.generation.synthesize import main

if __name__ == "__main__":
    main()
