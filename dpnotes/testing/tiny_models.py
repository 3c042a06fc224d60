"""Tiny random models and batches for tests and benchmarks.

Each builder returns a float32 model with eager attention (hook-based per-sample gradient
code must see every matmul) whose weights depend only on ``seed``.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel, PreTrainedModel

from dpnotes.models import resolve_model

PAD_ID = 0


def _seeded(build, seed: int) -> PreTrainedModel:
    # fork_rng keeps the caller's global RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.float().eval()


# Each decoder family's config, in its own field names, for the shared size arguments. Families
# whose config has no key/value-head field use full multi-head attention.
_FAMILIES: dict[str, tuple[str, Callable[..., dict]]] = {}


def _family(name: str, config_cls: str):
    def register(fields: Callable[..., dict]) -> Callable[..., dict]:
        _FAMILIES[name] = (config_cls, fields)
        return fields

    return register


def _llama_fields(vocab, hidden, layers, heads, kv_heads, intermediate, max_positions, **extra):
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
                **extra)


for _name, _config in (("llama", "LlamaConfig"), ("qwen2", "Qwen2Config"), ("mistral", "MistralConfig"),
                       ("phi3", "Phi3Config"), ("olmo2", "Olmo2Config")):
    _family(_name, _config)(_llama_fields)
_family("qwen3", "Qwen3Config")(lambda heads, hidden, **kw: _llama_fields(heads=heads, hidden=hidden, head_dim=hidden // heads, **kw))
_family("gemma", "GemmaConfig")(lambda heads, hidden, **kw: _llama_fields(heads=heads, hidden=hidden, head_dim=hidden // heads, **kw))
for _name, _config in (("gemma2", "Gemma2Config"), ("gemma3", "Gemma3TextConfig")):
    _family(_name, _config)(
        lambda heads, hidden, **kw: _llama_fields(heads=heads, hidden=hidden, head_dim=hidden // heads,
                                                  query_pre_attn_scalar=hidden // heads, sliding_window=4, **kw))
# StableLM with its per-head q/k LayerNorms switched on (more layer kinds under test).
_family("stablelm", "StableLmConfig")(lambda **kw: _llama_fields(qk_layernorm=True, **kw))
# Mixture of experts: 4 experts, 2 per token.
_family("mixtral", "MixtralConfig")(lambda **kw: _llama_fields(num_local_experts=4, num_experts_per_tok=2, **kw))


@_family("gpt2", "GPT2Config")
def _gpt2_fields(vocab, hidden, layers, heads, kv_heads, intermediate, max_positions):
    return dict(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
                n_positions=max_positions)


@_family("gpt_neox", "GPTNeoXConfig")
def _neox_fields(vocab, hidden, layers, heads, kv_heads, intermediate, max_positions):
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=intermediate, max_position_embeddings=max_positions)


@_family("falcon", "FalconConfig")
def _falcon_fields(vocab, hidden, layers, heads, kv_heads, intermediate, max_positions):
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                ffn_hidden_size=intermediate, max_position_embeddings=max_positions, bias=True)


@_family("opt", "OPTConfig")
def _opt_fields(vocab, hidden, layers, heads, kv_heads, intermediate, max_positions):
    return dict(vocab_size=vocab, hidden_size=hidden, word_embed_proj_dim=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, ffn_dim=intermediate, max_position_embeddings=max_positions)


DECODER_FAMILIES = tuple(sorted(_FAMILIES))


def tiny_causal_lm(family: str, vocab: int = 128, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   intermediate: int = 64, tie: bool = False, seed: int = 0, max_positions: int = 256) -> PreTrainedModel:
    """A tiny random causal LM of one of `DECODER_FAMILIES`, as transformers builds it from a config."""
    config_name, fields = _FAMILIES[family]
    cfg = getattr(transformers, config_name)(
        pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie,
        **fields(vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                 intermediate=intermediate, max_positions=max_positions),
    )
    return _seeded(lambda: AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"), seed)


def _family_builder(family: str):
    build = functools.partial(tiny_causal_lm, family)
    build.__name__ = f"tiny_{family}"
    return build


tiny_llama = _family_builder("llama")
tiny_qwen2 = _family_builder("qwen2")
tiny_mistral = _family_builder("mistral")


def tiny_gpt2(tie: bool = True, **size) -> PreTrainedModel:
    """GPT-2 ties its head to the embedding by default, as the real checkpoints do."""
    return tiny_causal_lm("gpt2", tie=tie, **size)


def tiny_bert(num_labels: int | None = None, vocab: int = 128, hidden: int = 32, layers: int = 2, heads: int = 4,
              intermediate: int = 64, seed: int = 0, max_positions: int = 256,
              problem_type: str = "multi_label_classification") -> PreTrainedModel:
    """A BertModel encoder, or BertForSequenceClassification when ``num_labels`` is given."""
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        pad_token_id=PAD_ID,
        attn_implementation="eager",
    )
    if num_labels is None:
        return _seeded(lambda: BertModel(cfg), seed)
    cfg.num_labels = num_labels
    cfg.problem_type = problem_type
    return _seeded(lambda: BertForSequenceClassification(cfg), seed)


def random_batch(
    vocab: int = 128,
    batch: int = 4,
    seq_len: int = 16,
    seed: int = 0,
    pad_fraction: float = 0.25,
) -> dict[str, torch.Tensor]:
    """Right-padded random token batch: ``input_ids``, ``attention_mask`` and ``labels``.

    Each row's padded tail is drawn uniformly from [0, 2 * pad_fraction * seq_len] (so about
    ``pad_fraction`` of positions are padding on average), keeping at least one real token.
    Labels equal input_ids (HF models shift internally) with -100 on padding.
    """
    if not 0.0 <= pad_fraction < 1.0:
        raise ValueError(f"pad_fraction must be in [0, 1), got {pad_fraction}")
    generator = torch.Generator().manual_seed(seed)
    # Token ids start above the special ids so padding is unambiguous.
    input_ids = torch.randint(PAD_ID + 3, vocab, (batch, seq_len), generator=generator)
    max_pad = min(round(2 * pad_fraction * seq_len), seq_len - 1)
    pad_lengths = torch.randint(0, max_pad + 1, (batch,), generator=generator)
    positions = torch.arange(seq_len).expand(batch, seq_len)
    attention_mask = (positions < (seq_len - pad_lengths).unsqueeze(1)).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD_ID)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prompt_masked_batch(batch: int = 4, seq_len: int = 12, seed: int = 3, vocab: int = 128) -> dict[str, torch.Tensor]:
    """A right-padded `random_batch` whose first third (the prompt) carries no loss, as in training."""
    data = random_batch(vocab=vocab, batch=batch, seq_len=seq_len, seed=seed)
    data["labels"][:, : seq_len // 3] = -100
    return data


def tiny_llama_folder(folder, tokenizer_source: str = "smollm2-135m", **config) -> None:
    """Save a random tiny LLaMA with a real tokenizer (SmolLM2's) as an HF folder, so recipes that
    load models by path run on it unchanged."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_source))
    tiny_llama(vocab=len(tokenizer), **{"hidden": 32, "layers": 2, "max_positions": 128, **config}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
