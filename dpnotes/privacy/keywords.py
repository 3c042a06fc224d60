"""Key terms per code: a DP release of which public words the notes of each code use.

The code titles in a prompt say what a code is, not how the corpus writes about it (its symptoms,
findings, drugs, plans). A coder trained on notes that carry titles alone stays well below one
trained on real notes (docs/utility.md, section 3c), and a small generator fine-tuned for a dozen DP
steps does not learn that map either. This release hands it over directly: for each code of the
public label space, the words of a public vocabulary that its notes use more than the corpus does,
as a DP statistic (the DP n-gram and topic releases of Kim et al. 2021 and CTCL, Tan et al. 2025).
Prompts for training and generation then list them, so that a generator only has to learn to write
its prompt's terms into a note.

The mechanism (one Gaussian mechanism, L2 sensitivity 1, no data-dependent keys):

- Keys are public: (code, word) for every code of the public label space and word of the public
  vocabulary, and a (code, "#") count per code. The vocabulary is the words of the ICD-10-CM and
  ICD-9-CM titles and of the model's tokenizer: nothing in it comes from the notes, so no key needs
  a threshold.
- One privacy unit contributes a set S of keys: for each of its first `max_codes` codes c (in the
  label space), the keys (c, w) of each distinct vocabulary word w of its notes, and (c, "#"). Each
  gets weight 1/√|S|, so the unit's contribution vector has L2 norm 1 whatever its notes hold, and
  adding or removing one unit moves the count vector by at most 1 (L2). `patient`: a patient's
  notes are one unit; `sequence`: each note is one.
- Every key's count gets N(0, σ²) noise with σ calibrated to (ε, δ) (PLD accountant, one release).
- Ranking is post-processing of the noisy counts: with B(w) = Σ_c n(c, w) over the codes, a word's
  lift for code c is n(c, w) − B(w)·n(c, #)/B(#), its count beyond what the code's share predicts.
  A code keeps its `top_k` words whose lift clears z times its noise std, z = Φ⁻¹(1 − 0.1/V) for a
  vocabulary of V words: one code in ten keeps a noise word by chance.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from statistics import NormalDist

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS as STOP_WORDS  # function words carry no code

from dpnotes.errors import UserError
from dpnotes.privacy.accounting import calibrate_noise_multiplier

WORD = re.compile(r"[a-z][a-z0-9-]{2,}")
UNIT_COUNT = "#"
FALSE_TERMS_PER_CODE = 0.1  # expected noise words a code keeps by chance


def words_of(text: str) -> set[str]:
    """The distinct lower-case words of `text` (3+ characters, starting with a letter), stop words removed."""
    return {word for word in WORD.findall(text.lower()) if word not in STOP_WORDS}


def _title_words() -> set[str]:
    import simple_icd_10_cm as icd10

    words: set[str] = set()
    for code in icd10.get_all_codes(with_dots=True):
        words |= words_of(icd10.get_description(code))
    icd9 = resources.files("dpnotes.corpus").joinpath("data", "icd9cm_titles.tsv").read_text(encoding="utf-8")
    for line in icd9.splitlines():
        if line and not line.startswith("#"):
            words |= words_of(line.split("\t", 1)[-1])
    return words


def public_vocabulary(tokenizer) -> frozenset[str]:
    """Words no note chose: those of the ICD-10-CM and ICD-9-CM titles, and the whole-word tokens of
    `tokenizer` (a word-initial token "Ġword" or "▁word" that is a word by itself)."""
    words = _title_words()
    for token in tokenizer.get_vocab():
        if token[:1] in ("Ġ", "▁"):
            words |= {word for word in words_of(token[1:]) if word == token[1:].lower()}
    return frozenset(words)


@dataclass
class CodeKeywords:
    """The released key terms per code, and what releasing them cost (ε = ∞: exact, not private)."""

    keywords: dict[str, list[str]]
    epsilon: float
    delta: float
    privacy_unit: str
    noise_std: float
    cutoff: float  # z: a word's lift clears z times its noise std
    vocabulary_size: int
    top_k: int

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> CodeKeywords:
        return cls(**json.loads(Path(path).read_text()))


def unit_keys(codes: Sequence[str], words: Iterable[str], labels: frozenset[str], max_codes: int) -> list[tuple[str, str]]:
    """The keys one unit contributes (see the module docstring); each gets weight 1/√len(keys)."""
    kept = sorted(set(codes) & labels)[:max_codes]
    words = sorted(words)
    return [(code, word) for code in kept for word in [*words, UNIT_COUNT]]


def key_counts(units: Iterable[tuple[Sequence[str], str]], codes: Sequence[str], words: Sequence[str],
               max_codes: int) -> np.ndarray:
    """The exact weighted counts: rows `codes`, columns `words` then "#"; each unit adds its keys with
    weight 1/√(number of its keys), a vector of L2 norm 1."""
    row = {code: i for i, code in enumerate(codes)}
    column = {word: i for i, word in enumerate([*words, UNIT_COUNT])}
    counts = np.zeros((len(row), len(column)))
    for unit_codes, text in units:
        keys = unit_keys(unit_codes, words_of(text) & column.keys(), frozenset(row), max_codes)
        for code, word in keys:
            counts[row[code], column[word]] += 1 / math.sqrt(len(keys))
    return counts


def dp_code_keywords(
    units: Iterable[tuple[Sequence[str], str]], labels: Sequence[str], vocabulary: frozenset[str], epsilon: float,
    delta: float, *, privacy_unit: str, top_k: int = 6, max_codes: int = 4, seed: int | None = None,
) -> CodeKeywords:
    """(ε, δ)-DP key terms of each code in `labels`, from `units`: one (codes, text) per privacy unit
    (a patient's notes joined, or one note). ε = ∞ releases the exact ranking (not private)."""
    if not (epsilon > 0):
        raise UserError(f"keywords_epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise UserError(f"the key-term release's delta must be in (0, 1), got {delta}")
    codes, words = sorted(set(labels)), sorted(vocabulary)
    counts = key_counts(units, codes, words, max_codes)
    sigma = 0.0 if math.isinf(epsilon) else calibrate_noise_multiplier(epsilon, delta, 1.0, 1, accountant="pld")
    if sigma:
        counts += np.random.default_rng(seed).normal(0.0, sigma, counts.shape)
    background = counts.sum(axis=0)
    shares = np.maximum(counts[:, -1], 0.0) / max(background[-1], 1e-12)
    z = NormalDist().inv_cdf(1 - FALSE_TERMS_PER_CODE / max(len(words), 2))
    keywords = {}
    for row, (code, share) in enumerate(zip(codes, shares)):
        # lift = (1 − s)·n(c, w) − s·Σ_{c' ≠ c} n(c', w): over K codes its noise std is σ·√((1 − s)² + (K − 1)·s²).
        lift_std = sigma * math.sqrt((1 - share) ** 2 + (len(codes) - 1) * share ** 2)
        lift = counts[row, :-1] - share * background[:-1]
        best = np.argsort(-lift, kind="stable")[:top_k]
        keywords[code] = [words[j] for j in best if lift[j] > max(z * lift_std, 0.0)]
    return CodeKeywords(keywords, epsilon, delta, privacy_unit, sigma, z, len(words), top_k)


def keyword_units(notes: Sequence, privacy_unit: str) -> list[tuple[list[str], str]]:
    """(codes, text) per privacy unit: each note (`sequence`), or each patient's notes joined (`patient`)."""
    if privacy_unit == "sequence":
        return [(list(note.codes), note.text) for note in notes]
    patients: dict[str, tuple[list[str], list[str]]] = {}
    for note in notes:
        codes, texts = patients.setdefault(note.patient_id, ([], []))
        codes.extend(note.codes)
        texts.append(note.text)
    return [(codes, "\n".join(texts)) for codes, texts in patients.values()]
