"""Fidelity measures against hand-computed values."""
import numpy as np
import pytest
from transformers import AutoTokenizer

from dpnotes.corpus import Note
from dpnotes.evaluation.fidelity import (
    code_distances,
    embed_texts,
    fidelity_report,
    frechet_distance,
    mean_cosine,
    text_statistics,
    vocabulary_overlap,
)
from dpnotes.models import resolve_model
from dpnotes.testing.tiny_models import tiny_bert


def test_frechet_distance_hand():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0)  # mean shift only
    # Diagonal Gaussians: Σ(σa − σb)² per dimension.
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    cov = np.cov(x, rowvar=False)  # diag(2/3, 2/3)
    expected = 2 * (np.sqrt(cov[0, 0]) - np.sqrt(4 * cov[0, 0])) ** 2
    assert frechet_distance(x, 2 * x) == pytest.approx(expected)
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :2])


def test_mean_cosine():
    assert mean_cosine(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[0.0, 1.0]])) == pytest.approx(0.0)
    assert mean_cosine(np.array([[1.0, 1.0]]), np.array([[2.0, 2.0], [4.0, 4.0]])) == pytest.approx(1.0)


def note(i, codes, text="x"):
    return Note(str(i), str(i), text, codes)


def test_code_distances_hand():
    real = [note(0, ["A"]), note(1, ["A", "B"])]  # shares: A 2/3, B 1/3
    synthetic = [note(2, ["B"]), note(3, ["C"])]  # B 1/2, C 1/2
    out = code_distances(real, synthetic)
    assert out["total_variation"] == pytest.approx(0.5 * (2 / 3 + 1 / 6 + 1 / 2))
    p, q = np.array([2 / 3, 1 / 3, 0]), np.array([0, 0.5, 0.5])
    m = (p + q) / 2
    kl = lambda a, b: sum(x * np.log2(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    assert out["jensen_shannon_divergence"] == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m))
    assert out["codes_only_in_real"] == 1 and out["codes_only_in_synthetic"] == 1


def test_text_statistics_and_vocabulary():
    stats = text_statistics(["the cat sat on the mat.", "a dog"])
    assert stats["mean_words"] == 4.0 and stats["median_words"] == 4.0
    assert stats["mean_type_token_ratio"] == pytest.approx((5 / 6 + 1) / 2)
    assert stats["vocabulary_size"] == 7 and stats["corpus_type_token_ratio"] == pytest.approx(7 / 8)
    overlap = vocabulary_overlap(["the cat sat"], ["the dog sat down"])
    assert overlap["synthetic_types_in_real"] == 0.5 and overlap["jaccard"] == pytest.approx(2 / 5)


def test_fidelity_report_with_tiny_encoder():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    encoder = tiny_bert(vocab=tokenizer.vocab_size, seed=0)
    real = [note(i, ["A"], f"chest pain number {i}") for i in range(6)]
    synthetic = [note(10 + i, ["A", "B"], f"fever and cough {i}") for i in range(5)]
    embeddings = embed_texts([n.text for n in real], encoder, tokenizer)
    assert embeddings.shape == (6, 32)
    report = fidelity_report(real, synthetic, embed=lambda texts: embed_texts(texts, encoder, tokenizer))
    assert report["embedding"]["frechet_distance"] > 0 and -1 <= report["embedding"]["mean_cosine"] <= 1
    same = fidelity_report(real, real, embed=lambda texts: embed_texts(texts, encoder, tokenizer))
    assert same["embedding"]["frechet_distance"] == pytest.approx(0.0, abs=1e-4)
    assert same["codes"]["total_variation"] == 0.0
    with pytest.raises(ValueError):
        fidelity_report([], synthetic, with_embeddings=False)
