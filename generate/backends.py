"""Generation backends behind one interface: transformers (CPU fallback), vLLM offline engine,
and a client for a vLLM OpenAI-compatible server on loopback.

Determinism: each backend samples note i with a seed derived from (run seed, i) where it can
(vLLM per-request seeds), or per fixed-size batch (transformers), so a resumed run regenerates
exactly the notes an uninterrupted run would have.
"""
from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Callable, Protocol

import torch


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.8
    # Top-k, not nucleus, truncation by default: top-p sorts the whole 49k vocabulary of every row at
    # every step, which took as long as the model's forward on CPU; top-k 50 cuts the same tail cheaply.
    top_p: float = 1.0
    top_k: int = 50
    batch_size: int = 16  # transformers backend; vLLM schedules by itself


@dataclass
class Generated:
    text: str
    new_tokens: int


class GenerationBackend(Protocol):
    name: str

    def generate(self, prompts: list[str], first_index: int, seed: int, sampling: SamplingConfig) -> list[Generated]:
        """Complete `prompts`, which are notes first_index, first_index + 1, ... of the run."""


_BACKENDS: dict[str, Callable[..., GenerationBackend]] = {}


def register_backend(name: str):
    def register(factory):
        _BACKENDS[name] = factory
        return factory

    return register


def make_backend(name: str, model_dir: str, **options) -> GenerationBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name](model_dir, **options)


@register_backend("transformers")
class TransformersBackend:
    name = "transformers"

    def __init__(self, model_dir: str, dtype: str = "float32", device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device).eval()

    @torch.no_grad()
    def generate(self, prompts, first_index, seed, sampling):
        if first_index % sampling.batch_size:
            raise ValueError("the transformers backend generates whole batches: first_index must be a batch boundary")
        outputs = []
        for start in range(0, len(prompts), sampling.batch_size):
            chunk = prompts[start : start + sampling.batch_size]
            torch.manual_seed(seed * 1_000_003 + first_index + start)
            encoded = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            generated = self.model.generate(
                **encoded,
                do_sample=sampling.temperature > 0,
                temperature=sampling.temperature if sampling.temperature > 0 else None,
                top_p=sampling.top_p if sampling.temperature > 0 else None,
                top_k=sampling.top_k if sampling.temperature > 0 else None,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = generated[:, encoded["input_ids"].shape[1] :]
            for row in new:
                tokens = row[row != self.tokenizer.pad_token_id]
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                outputs.append(Generated(text.strip(), int(tokens.numel())))
        return outputs


@register_backend("vllm")
class VLLMBackend:
    """vLLM offline engine (GPU; the optional `vllm` extra). Serves a merged folder, or base + an
    unmerged LoRA adapter through LoRARequest."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        adapter_dir: str | None = None,
        tensor_parallel_size: int = 1,
        max_num_seqs: int = 256,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
    ):
        try:
            from vllm import LLM
        except ImportError as error:
            raise RuntimeError("the vllm backend needs the optional extra: pip install 'dpnotes[vllm]' (CUDA)") from error
        self.llm = LLM(
            model=model_dir,
            tensor_parallel_size=tensor_parallel_size,
            max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enable_lora=adapter_dir is not None,
        )
        self.lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("dpnotes", 1, adapter_dir)

    def generate(self, prompts, first_index, seed, sampling):
        from vllm import SamplingParams

        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                seed=seed * 1_000_003 + first_index + i,
            )
            for i in range(len(prompts))
        ]
        results = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        return [Generated(r.outputs[0].text.strip(), len(r.outputs[0].token_ids)) for r in results]


@register_backend("vllm-server")
class VLLMServerBackend:
    """Client of `vllm serve MODEL --host 127.0.0.1` (OpenAI-compatible /v1/completions)."""

    name = "vllm-server"

    def __init__(self, model_dir: str, url: str = "http://127.0.0.1:8000", served_model: str | None = None, timeout: float = 600):
        self.url = url.rstrip("/") + "/v1/completions"
        self.model = served_model or model_dir
        self.timeout = timeout

    def generate(self, prompts, first_index, seed, sampling):
        outputs = []
        for i, prompt in enumerate(prompts):
            body = {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,
                "seed": seed * 1_000_003 + first_index + i,
            }
            request = urllib.request.Request(
                self.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
            choice = answer["choices"][0]
            tokens = answer.get("usage", {}).get("completion_tokens", 0)
            outputs.append(Generated(choice["text"].strip(), int(tokens)))
        return outputs
