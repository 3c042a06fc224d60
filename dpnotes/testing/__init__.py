"""Helpers shared by tests and benchmarks (tiny random models, synthetic batches)."""
from dpnotes.testing.tiny_models import (
    random_batch,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
)

__all__ = ["random_batch", "tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_mistral", "tiny_qwen2"]
