"""Tiny random models and batches for tests and benchmarks.

Each builder returns a float32 model with eager attention (hook-based per-sample gradient
code must see every matmul) whose weights depend only on ``seed``.
"""
from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

PAD_ID = 0


def _seeded(build, seed: int) -> PreTrainedModel:
    # fork_rng keeps the caller's global RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.float().eval()


def _tiny_decoder(config_cls: type[PretrainedConfig], seed: int, **config) -> PreTrainedModel:
    cfg = config_cls(pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, **config)
    return _seeded(lambda: AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"), seed)


def _llama_like(config_cls: type[PretrainedConfig]):
    """Builder for the LLaMA-shaped families (LLaMA, Qwen2, Mistral share the config fields)."""

    def build(
        vocab: int = 128,
        hidden: int = 32,
        layers: int = 2,
        heads: int = 4,
        kv_heads: int = 2,
        intermediate: int = 64,
        tie: bool = False,
        seed: int = 0,
        max_positions: int = 256,
    ) -> PreTrainedModel:
        return _tiny_decoder(
            config_cls,
            seed,
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=intermediate,
            tie_word_embeddings=tie,
            max_position_embeddings=max_positions,
        )

    build.__name__ = f"tiny_{config_cls.model_type}"
    return build


tiny_llama = _llama_like(LlamaConfig)
tiny_qwen2 = _llama_like(Qwen2Config)
tiny_mistral = _llama_like(MistralConfig)


def tiny_gpt2(
    vocab: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 64,
    tie: bool = True,
    seed: int = 0,
    max_positions: int = 256,
) -> PreTrainedModel:
    return _tiny_decoder(
        GPT2Config,
        seed,
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_inner=intermediate,
        n_positions=max_positions,
        tie_word_embeddings=tie,
    )


def tiny_bert(
    num_labels: int | None = None,
    vocab: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 64,
    seed: int = 0,
    max_positions: int = 256,
    problem_type: str = "multi_label_classification",
) -> PreTrainedModel:
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


def tiny_llama_folder(folder, tokenizer_source: str = "smollm2-135m", **config) -> None:
    """Save a random tiny LLaMA with a real tokenizer (SmolLM2's) as an HF folder, so recipes that
    load models by path run on it unchanged."""
    from transformers import AutoTokenizer

    from dpnotes.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_source))
    tiny_llama(vocab=len(tokenizer), **{"hidden": 32, "layers": 2, "max_positions": 128, **config}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
