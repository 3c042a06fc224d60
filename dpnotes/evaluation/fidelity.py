"""How close synthetic notes are to real ones, without training anything.

* embedding space: mean-pooled encoder (MiniLM) embeddings of real and synthetic notes →
  Fréchet distance (FID-style: ‖μ_r − μ_s‖² + Tr(Σ_r + Σ_s − 2 (Σ_r Σ_s)^{1/2})) and the cosine
  similarity of the two mean embeddings;
* codes: total variation and Jensen–Shannon divergence (base 2, in [0, 1]) between the code
  distributions (each code's share of all code assignments), over the union of codes;
* text: mean/median words per note, type-token ratio (mean per note, and corpus-level), and
  vocabulary overlap (share of synthetic word types seen in the real notes; Jaccard).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch

from dpnotes.corpus.schema import Note
from dpnotes.evaluation.coders import mean_pool
from dpnotes.evaluation.leakage import words
from dpnotes.models import load_encoder


@torch.no_grad()
def embed_texts(texts: Sequence[str], encoder=None, tokenizer=None, model_name: str = "minilm",
                max_length: int = 256, batch_size: int = 32) -> np.ndarray:
    """(n, hidden) mean-pooled last-layer embeddings (`encoder`/`tokenizer` default: load `model_name`)."""
    if not texts:
        raise ValueError("no texts to embed")
    if encoder is None or tokenizer is None:
        encoder, tokenizer = load_encoder(model_name)
    encoder.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out.append(mean_pool(states, batch["attention_mask"]).float().numpy())
    return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two embedding sets (rows = samples)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (n, d) arrays of the same d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples per set for a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # tr sqrtm(AB) = Σ √λ_i(AB): AB is similar to the PSD A^½BA^½, so its eigenvalues are real and ≥ 0
    # (up to rounding). scipy's sqrtm of the 384×384 product took minutes on a CPU when it is singular
    # (fewer notes than dimensions); the eigenvalues take seconds.
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b).real
    trace_root = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    return float(max(0.0, ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the two mean embeddings."""
    mu_a, mu_b = np.asarray(a, float).mean(0), np.asarray(b, float).mean(0)
    return float(mu_a @ mu_b / (np.linalg.norm(mu_a) * np.linalg.norm(mu_b)))


def code_distribution(notes: Sequence[Note], codes: Sequence[str]) -> np.ndarray:
    counts = Counter(code for note in notes for code in set(note.codes))
    vector = np.array([counts[c] for c in codes], dtype=float)
    total = vector.sum()
    if total == 0:
        raise ValueError("notes carry no codes")
    return vector / total


def code_distances(real: Sequence[Note], synthetic: Sequence[Note]) -> dict:
    from scipy.spatial.distance import jensenshannon

    codes = sorted({c for n in list(real) + list(synthetic) for c in n.codes})
    p, q = code_distribution(real, codes), code_distribution(synthetic, codes)
    return {
        "total_variation": float(0.5 * np.abs(p - q).sum()),
        "jensen_shannon_divergence": float(jensenshannon(p, q, base=2) ** 2),
        "n_codes_real": int((p > 0).sum()), "n_codes_synthetic": int((q > 0).sum()),
        "codes_only_in_real": int(((p > 0) & (q == 0)).sum()), "codes_only_in_synthetic": int(((q > 0) & (p == 0)).sum()),
    }


def text_statistics(texts: Sequence[str]) -> dict:
    tokens = [[w for w in words(t) if any(ch.isalnum() for ch in w)] for t in texts]
    lengths = np.array([len(t) for t in tokens])
    ttr = [len(set(t)) / len(t) for t in tokens if t]
    vocabulary = {w for t in tokens for w in t}
    return {
        "n_notes": len(texts), "mean_words": float(lengths.mean()), "median_words": float(np.median(lengths)),
        "mean_type_token_ratio": float(np.mean(ttr)) if ttr else float("nan"),
        "corpus_type_token_ratio": len(vocabulary) / max(1, int(lengths.sum())), "vocabulary_size": len(vocabulary),
    }


def vocabulary_overlap(real_texts: Sequence[str], synthetic_texts: Sequence[str]) -> dict:
    real = {w for t in real_texts for w in words(t) if any(ch.isalnum() for ch in w)}
    synthetic = {w for t in synthetic_texts for w in words(t) if any(ch.isalnum() for ch in w)}
    common = real & synthetic
    return {
        "synthetic_types_in_real": len(common) / max(1, len(synthetic)),
        "real_types_in_synthetic": len(common) / max(1, len(real)),
        "jaccard": len(common) / max(1, len(real | synthetic)),
    }


def fidelity_report(
    real: Sequence[Note],
    synthetic: Sequence[Note],
    embed: Callable[[Sequence[str]], np.ndarray] | None = None,
    with_embeddings: bool = True,
) -> dict:
    """Every fidelity measure of `synthetic` against `real` (`embed` default: MiniLM)."""
    if not real or not synthetic:
        raise ValueError(f"need real and synthetic notes, got {len(real)} real and {len(synthetic)} synthetic")
    report = {
        "text": {"real": text_statistics([n.text for n in real]), "synthetic": text_statistics([n.text for n in synthetic])},
        "vocabulary": vocabulary_overlap([n.text for n in real], [n.text for n in synthetic]),
    }
    if any(n.codes for n in real) and any(n.codes for n in synthetic):
        report["codes"] = code_distances(real, synthetic)
    if with_embeddings:
        embed = embed or embed_texts
        a, b = embed([n.text for n in real]), embed([n.text for n in synthetic])
        report["embedding"] = {"frechet_distance": frechet_distance(a, b), "mean_cosine": mean_cosine(a, b), "dim": int(a.shape[1])}
    return report
