"""dpnotes: DP fine-tuning of language models on clinical notes."""
from pathlib import Path

# The source checkout this package runs from: its recipe scripts and configs (train/, ...) and the
# vLLM environment `make vllm` builds (.venv-vllm).
CHECKOUT = Path(__file__).resolve().parent.parent
