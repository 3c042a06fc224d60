"""Generation backends behind one interface: transformers (the fallback), the vLLM offline engine,
and a client of a vLLM OpenAI-compatible server (one it starts from the project's vLLM environment,
or one at a given URL).

Determinism: each backend samples note i with a seed derived from (run seed, i) where it can
(vLLM per-request seeds), or per fixed-size batch (transformers), so a resumed run regenerates
exactly the notes an uninterrupted run would have.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch

from dpnotes.errors import UserError
from dpnotes.models import compute_device


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.8
    # Top-k, not nucleus, truncation by default: top-p sorts the whole 49k vocabulary of every row at
    # every step, which took as long as the model's forward on CPU; top-k 50 cuts the same tail cheaply.
    top_p: float = 1.0
    top_k: int = 50
    batch_size: int = 16  # transformers backend; vLLM schedules by itself
    # Logit bias on the first token of each term of a note's prompt (0: none): its key terms, and the
    # title words of a code that has none (generation.synthesize.steering_terms). The terms are public
    # or the run's DP release, so steering the sampler towards them is post-processing and costs no ε;
    # it makes a briefly trained generator write the terms it was given (docs/utility.md §3f).
    term_bias: float = 0.0
    # Whose title words are steered: a code's only where the key-term release gave it none, or every code's.
    title_steering: Literal["codes_without_terms", "every_code"] = "codes_without_terms"
    # Subtracted from a token's logit once per time the note has already written it (OpenAI/vLLM
    # semantics: generated tokens only, never the prompt's, so it does not undo the steering towards
    # the prompt's terms). It stops a steered term from looping ("Procedure: Procedure: ...").
    frequency_penalty: float = 0.0


@dataclass
class Generated:
    text: str
    new_tokens: int


class GenerationBackend(Protocol):
    name: str

    def generate(self, prompts: list[str], first_index: int, seed: int, sampling: SamplingConfig,
                 logit_biases: list[dict[int, float]] | None = None) -> list[Generated]:
        """Complete `prompts`, which are notes first_index, first_index + 1, ... of the run, adding
        logit_biases[i] ({token id: bias}) to prompt i's logits at every step."""

    def close(self) -> None:
        """Release what the backend holds (a server it started); generation is over."""


_BACKENDS: dict[str, Callable[..., GenerationBackend]] = {}


def register_backend(name: str):
    def register(factory):
        _BACKENDS[name] = factory
        return factory

    return register


def note_seed(run_seed: int, index: int) -> int:
    """The sampling seed of note `index`. vLLM seeds each request with it, so a note does not depend
    on the batch it ran in; transformers seeds each fixed-size batch with its first note's."""
    return run_seed * 1_000_003 + index


def chunk_size(name: str, sampling: SamplingConfig) -> int:
    """Prompts per `generate` call for backend `name`: its own (an engine that schedules by itself
    takes many) or the sampling batch size."""
    return getattr(_BACKENDS.get(name), "chunk_size", None) or sampling.batch_size


def resolve_backend(name: str) -> str:
    """"auto": the vLLM server when the project's vLLM environment exists (`make vllm`), else
    transformers; any other name as given."""
    if name != "auto":
        return name
    from .vllm_server import find_vllm

    return "vllm-server" if find_vllm() is not None else "transformers"


def make_backend(name: str, model_dir: str, **options) -> GenerationBackend:
    if name not in _BACKENDS:
        raise UserError(f"unknown backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name](model_dir, **options)


def term_logit_bias(tokenizer, terms: list[str], bias: float) -> dict[int, float]:
    """{token id: bias} for the first token of each term as a note writes it, lower case or
    capitalised: after a space, and at a line start when the term is one token there. (A byte-level
    BPE writes a line-start word without its space, in pieces that also occur inside other words:
    steering "enc" of "encounter" would nudge "refer|enc|e".) A first token of fewer than 3 letters
    (" hyp" of a word the vocabulary splits is kept, " a" is not) would steer every word that starts
    with it, so it is left out."""
    tokens: dict[int, float] = {}
    for term in terms:
        for form in {term, term.capitalize()}:
            spaced = tokenizer.encode(" " + form, add_special_tokens=False)
            if spaced and len(tokenizer.decode(spaced[:1]).strip()) >= 3:
                tokens[spaced[0]] = bias
            bare = tokenizer.encode(form, add_special_tokens=False)
            if len(bare) == 1 and len(form) >= 3 and tokenizer.decode(bare) == form:
                tokens[bare[0]] = bias
    return tokens


class RowLogitBias:
    """A transformers logits processor that adds row i's {token id: bias} to row i's scores."""

    def __init__(self, biases: list[dict[int, float]], vocabulary: int, device: torch.device):
        self.bias = torch.zeros(len(biases), vocabulary, device=device)
        for row, bias in enumerate(biases):
            if bias:
                self.bias[row, list(bias)] = torch.tensor(list(bias.values()), device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != self.bias.shape[0]:  # one row per prompt: no beams, one sequence each
            raise ValueError(f"{scores.shape[0]} rows of scores for {self.bias.shape[0]} prompts' biases")
        width = min(scores.shape[1], self.bias.shape[1])  # the model's logits may pad the tokenizer's vocabulary
        scores[:, :width] += self.bias[:, :width].to(scores.dtype)
        return scores


class OutputFrequencyPenalty:
    """A transformers logits processor: score −= penalty · (times the row's generated tokens hold the token)."""

    def __init__(self, prompt_length: int, penalty: float):
        self.prompt_length, self.penalty = prompt_length, penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        written = input_ids[:, self.prompt_length :]
        if written.shape[1]:
            counts = torch.zeros_like(scores)
            counts.scatter_add_(1, written, torch.ones_like(written, dtype=scores.dtype))
            scores -= self.penalty * counts
        return scores


@register_backend("transformers")
class TransformersBackend:
    name = "transformers"

    def __init__(self, model_dir: str, dtype: str = "float32", device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device) if device else compute_device()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device).eval()

    @torch.no_grad()
    def generate(self, prompts, first_index, seed, sampling, logit_biases=None):
        from transformers import LogitsProcessorList

        if first_index % sampling.batch_size:
            raise ValueError("the transformers backend generates whole batches: first_index must be a batch boundary")
        outputs = []
        for start in range(0, len(prompts), sampling.batch_size):
            chunk = prompts[start : start + sampling.batch_size]
            torch.manual_seed(note_seed(seed, first_index + start))
            encoded = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            biases = logit_biases[start : start + sampling.batch_size] if logit_biases else None
            processors = LogitsProcessorList([RowLogitBias(biases, len(self.tokenizer), self.device)] if biases else [])
            if sampling.frequency_penalty:
                processors.append(OutputFrequencyPenalty(encoded["input_ids"].shape[1], sampling.frequency_penalty))
            generated = self.model.generate(
                **encoded,
                do_sample=sampling.temperature > 0,
                temperature=sampling.temperature if sampling.temperature > 0 else None,
                top_p=sampling.top_p if sampling.temperature > 0 else None,
                top_k=sampling.top_k if sampling.temperature > 0 else None,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=processors,
            )
            new = generated[:, encoded["input_ids"].shape[1] :]
            for row in new:
                tokens = row[row != self.tokenizer.pad_token_id]
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                outputs.append(Generated(text.strip(), int(tokens.numel())))
        return outputs

    def close(self) -> None:
        self.model = None  # frees the weights before the evaluation stage loads its own models


@register_backend("vllm")
class VLLMBackend:
    """vLLM offline engine, in a process where vLLM is importable (its own environment, or a CUDA
    install that co-installs). Serves a merged folder, or base + an unmerged LoRA adapter through
    LoRARequest. All prompts of a call go to the engine at once: it schedules up to max_num_seqs."""

    name = "vllm"
    chunk_size = 256  # prompts per call: as many as the engine schedules at once; a crash loses at most these

    def __init__(
        self,
        model_dir: str,
        adapter_dir: str | None = None,
        tensor_parallel_size: int = 1,
        max_num_seqs: int = 256,
        gpu_memory_utilization: float | None = None,
        dtype: str | None = None,
        max_model_len: int | None = 1024,
        max_lora_rank: int = 16,
        enforce_eager: bool | None = None,
        chunked_prefill: bool | None = None,
    ):
        if not torch.cuda.is_available():  # read by the engine's worker processes when they start
            from .vllm_server import CPU_DEFAULTS

            for key, value in CPU_DEFAULTS.items():
                os.environ.setdefault(key, value)
        try:
            from vllm import LLM
        except ImportError as error:
            raise RuntimeError("the vllm backend runs where vLLM is importable (`make vllm` builds .venv-vllm); "
                               "from the core environment use the vllm-server backend") from error
        self.llm = LLM(
            model=model_dir,
            tensor_parallel_size=tensor_parallel_size,
            max_num_seqs=max_num_seqs,
            # On a CPU host vLLM reads this as the fraction of host memory it reserves.
            gpu_memory_utilization=gpu_memory_utilization or (0.9 if torch.cuda.is_available() else 0.15),
            dtype=dtype or ("auto" if torch.cuda.is_available() else "float32"),  # as ServerOptions.dtype
            max_model_len=max_model_len,
            enable_lora=adapter_dir is not None,
            max_lora_rank=max_lora_rank,
            # Defaults as for the server (generate.vllm_server.ServerOptions): eager on CPU hosts.
            enforce_eager=enforce_eager if enforce_eager is not None else not torch.cuda.is_available(),
            # Off on CPU hosts: vLLM 0.32 on CPU crashes on a seeded request whose prompt is split
            # across steps (see generate.vllm_server.ServerOptions.chunked_prefill).
            enable_chunked_prefill=chunked_prefill if chunked_prefill is not None else torch.cuda.is_available(),
        )
        self.lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("dpnotes", 1, adapter_dir)

    def generate(self, prompts, first_index, seed, sampling, logit_biases=None):
        from vllm import SamplingParams

        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                frequency_penalty=sampling.frequency_penalty,
                seed=note_seed(seed, first_index + i),
                logit_bias=(logit_biases[i] or None) if logit_biases else None,
            )
            for i in range(len(prompts))
        ]
        results = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        return [Generated(r.outputs[0].text.strip(), len(r.outputs[0].token_ids)) for r in results]


@register_backend("vllm-server")
class VLLMServerBackend:
    """Client of a vLLM OpenAI-compatible server (/v1/completions): the one at `url`, or one it
    starts from the project's vLLM environment (`make vllm`) and stops at `close()`.

    Requests go out `concurrency` at a time (one prompt each, so each note keeps its own seed);
    vLLM batches whatever is in flight. Keyword options other than the client's are the server's
    (`generate.vllm_server.ServerOptions`: port, dtype, adapter_dir, max_lora_rank, ...).
    """

    name = "vllm-server"
    chunk_size = 256  # prompts per call: the notes written between two checkpoints of the output file

    def __init__(self, model_dir: str, url: str | None = None, served_model: str | None = None,
                 concurrency: int = 64, timeout: float = 600, server_log: str | None = None, **server_options):
        from pathlib import Path

        from .vllm_server import SERVED_NAME, ServerOptions, VLLMServer

        self.server = None
        if url is None:
            self.server = VLLMServer(model_dir, ServerOptions(**server_options),
                                     Path(server_log) if server_log else None).start()
            url, served_model = self.server.url, SERVED_NAME
        elif server_options:
            raise ValueError(f"server options {sorted(server_options)} apply only to a server the backend starts "
                             f"(no url)")
        self.url = url.rstrip("/") + "/v1/completions"
        self.model = served_model or model_dir
        self.concurrency, self.timeout = concurrency, timeout

    def _complete(self, prompt: str, note_index: int, seed: int, sampling: SamplingConfig,
                  logit_bias: dict[int, float] | None) -> Generated:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "frequency_penalty": sampling.frequency_penalty,
            "seed": note_seed(seed, note_index),
            # The prompt is rendered in full (chat template included), as in training.
            "add_special_tokens": False,
        }
        if logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in logit_bias.items()}
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            raise self._failure(error) from error
        choice = answer["choices"][0]
        return Generated(choice["text"].strip(), int(answer.get("usage", {}).get("completion_tokens", 0)))

    def _failure(self, error: Exception) -> RuntimeError:
        from .vllm_server import VLLMServerError, log_tail

        if isinstance(error, urllib.error.HTTPError) and error.code < 500:  # the request, not the server
            return VLLMServerError(f"vLLM server at {self.url} refused a request ({error.code}): "
                                   f"{error.read().decode(errors='replace')[:500]}")
        if self.server is None:
            return VLLMServerError(f"vLLM server at {self.url} failed: {error}")
        return VLLMServerError(f"the vLLM server stopped answering ({error}); notes written so far are kept and a "
                               f"re-run resumes (log {self.server.log_path}):\n{log_tail(self.server.log_path)}")

    def generate(self, prompts, first_index, seed, sampling, logit_biases=None):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
            futures = [pool.submit(self._complete, prompt, first_index + i, seed, sampling,
                                   logit_biases[i] if logit_biases else None)
                       for i, prompt in enumerate(prompts)]
            return [future.result() for future in futures]

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
