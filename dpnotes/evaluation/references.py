"""A training set that needs no generator, to read a synthetic coder's score against.

Titles only: each synthetic note's text replaced by the public titles of its codes. The code sets are
the same DP-sampled ones and the count is the same, but no model writes anything. A coder trained on
them learns what naming the codes alone teaches. A generator whose notes train a worse coder than
this adds nothing beyond its prompt, which already holds those titles.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from dpnotes.corpus.schema import Note
from dpnotes.evaluation.coders import TfidfCoder, compare_train_sets


def titles_only_notes(notes: Sequence[Note], titles: Mapping[str, str]) -> list[Note]:
    """`notes` with each text replaced by its codes' titles (a code without one stands for itself)."""
    return [Note(note.id, note.patient_id, "; ".join(titles.get(code, code) for code in note.codes), list(note.codes))
            for note in notes]


def titles_only_coder(synthetic: Sequence[Note], splits: Mapping[str, Sequence[Note]], titles: Mapping[str, str],
                      bootstrap: int) -> dict:
    """The TF-IDF coder trained on the titles-only version of `synthetic`, scored exactly as the
    synthetic coder is (same label space, dev threshold, test notes and bootstrap)."""
    return compare_train_sets(TfidfCoder, splits["train"], titles_only_notes(synthetic, titles), splits["dev"],
                              splits["test"], n_bootstrap=bootstrap, train_sets=("synthetic",))["synthetic"]
