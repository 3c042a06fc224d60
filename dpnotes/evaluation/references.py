"""A training set that needs no generator, to read a synthetic coder's score against.

Prompt only: each synthetic note's text replaced by what its prompt gives the generator, the public
titles of its codes and, for a run that released them, their DP key terms. The code sets are the same
DP-sampled ones and the count is the same, but no model writes anything. A coder trained on them
learns what the prompt alone teaches. A generator whose notes train a worse coder than this adds
nothing beyond its prompt.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from dpnotes.corpus.schema import Note
from dpnotes.evaluation.coders import TfidfCoder, compare_train_sets
from dpnotes.prompting import keywords_line


def prompt_only_notes(notes: Sequence[Note], titles: Mapping[str, str],
                      keywords: Mapping[str, Sequence[str]] | None = None) -> list[Note]:
    """`notes` with each text replaced by its codes' titles (a code without one stands for itself),
    then their key terms when `keywords` is given."""
    def text(codes: Sequence[str]) -> str:
        terms = keywords_line(keywords or {}, codes)
        return "; ".join(titles.get(code, code) for code in codes) + (f"\nKey terms: {terms}" if terms else "")

    return [Note(note.id, note.patient_id, text(note.codes), list(note.codes)) for note in notes]


def prompt_only_coder(synthetic: Sequence[Note], splits: Mapping[str, Sequence[Note]], titles: Mapping[str, str],
                      bootstrap: int, keywords: Mapping[str, Sequence[str]] | None = None) -> dict:
    """The TF-IDF coder trained on the prompt-only version of `synthetic`, scored exactly as the
    synthetic coder is (same label space, dev threshold, test notes and bootstrap)."""
    return compare_train_sets(TfidfCoder, splits["train"], prompt_only_notes(synthetic, titles, keywords),
                              splits["dev"], splits["test"], n_bootstrap=bootstrap, train_sets=("synthetic",))["synthetic"]
