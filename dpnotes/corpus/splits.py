"""Train/dev/test splits by patient, so that no patient's text is both trained on and evaluated."""
from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

from dpnotes.corpus.schema import Note

SPLIT_NAMES = ("train", "dev", "test")


def split_by_patient(
    notes: Sequence[Note], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[Note]]:
    """Split notes into train/dev/test by patient (`split_rows`); notes keep their input order."""
    rows = split_rows([note.patient_id for note in notes], fractions, seed)
    return {name: [notes[row] for row in rows[name]] for name in SPLIT_NAMES}


def split_rows(
    patient_ids: Sequence[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[int]]:
    """The rows of each split, ascending, by a seeded permutation of the sorted patient ids.

    `fractions` apply to patients, not notes.
    """
    if len(fractions) != len(SPLIT_NAMES) or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    patients = sorted(set(patient_ids))
    # Sorting first makes the split independent of note order; the seed alone decides the permutation.
    random.Random(seed).shuffle(patients)
    n_train = round(fractions[0] * len(patients))
    n_dev = round(fractions[1] * len(patients))
    split_of_patient = {}
    for index, patient in enumerate(patients):
        split_of_patient[patient] = "train" if index < n_train else "dev" if index < n_train + n_dev else "test"
    rows: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for row, patient in enumerate(patient_ids):
        rows[split_of_patient[patient]].append(row)
    return rows


def examples_by_patient(patient_ids: Sequence[str]) -> list[list[int]]:
    """Indices of each patient's examples, patients in first-appearance order: the privacy units of
    patient-level DP (every consumer groups the same way, so the units are the same everywhere)."""
    groups: dict[str, list[int]] = {}
    for index, patient in enumerate(patient_ids):
        groups.setdefault(patient, []).append(index)
    return list(groups.values())


def label_counts(notes: Sequence[Note]) -> Counter[str]:
    """Number of notes carrying each code."""
    return Counter(code for note in notes for code in set(note.codes))
