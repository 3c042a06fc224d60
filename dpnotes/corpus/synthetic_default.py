"""The embedded default corpus: synthetic discharge summaries coded with common ICD-10-CM codes.

Needs nothing outside the repo, so the demo and the tests run anywhere. The text depends on the
codes (code-specific symptoms, findings, medications and plans), with noise: a phrase is not always
present, and notes sometimes deny a symptom of a condition the patient does not have. Optional
canaries (fake name + MRN, each in exactly one note) let eval measure memorisation.
"""
from __future__ import annotations

import argparse
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from dpnotes.corpus.default_code_bank import CODE_BANK, CodeProfile
from dpnotes.corpus.readers import write_notes
from dpnotes.corpus.schema import Note

CANARY_KEY = "canary"
REDACTED_IDENTIFIERS = "Patient name: [redacted], MRN [redacted]"
CODES_PER_PATIENT = ((1, 0.4), (2, 0.35), (3, 0.25))
OTHER_HISTORY = ("remote appendectomy", "cholecystectomy", "seasonal allergies", "former tobacco use",
                 "cataract surgery", "gout")
HOSPITAL_COURSE = (
    "The patient was admitted to the medicine service and monitored on telemetry.",
    "Symptoms improved steadily over the admission.",
    "Physical therapy evaluated the patient and recommended discharge home.",
    "The patient tolerated a regular diet and was ambulating independently.",
    "Medication reconciliation was completed with the pharmacist.",
    "Case management arranged home services.",
    "Laboratory values were trended daily and remained stable.",
)
OTHER_MEDICATIONS = ("docusate 100 mg twice daily", "vitamin D3 1000 IU daily",
                     "acetaminophen 650 mg every 6 hours as needed", "multivitamin daily")
SOCIAL_HISTORY = ("Lives with spouse, independent in daily activities.", "Lives alone in an apartment, drives.",
                  "Lives with daughter, uses a cane.", "Retired teacher, drinks alcohol socially.",
                  "Works in construction, quit smoking ten years ago.", "Lives in assisted living.")
FIRST_NAMES = ("Orla", "Tamsin", "Ezra", "Idris", "Marisol", "Caspian", "Wren", "Lucan", "Ottilie",
               "Bastian", "Saoirse", "Thaddeus", "Imelda", "Ambrose", "Zinnia", "Peregrine")
LAST_NAMES = ("Quenby", "Marchetti", "Vasquez-Holt", "Okonkwo", "Lindqvist", "Abernathy", "Fairweather",
              "Castellanos", "Thistlewood", "Nakagawa", "Brannigan", "Oyelaran", "Kowalczyk", "Ravensworth")


def _maybe(rng: random.Random, probability: float) -> bool:
    return rng.random() < probability


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _capitalised(phrase: str) -> str:
    return phrase[0].upper() + phrase[1:]


def _note_text(rng: random.Random, profiles: Sequence[CodeProfile], age: int, sex: str, identifiers: str) -> str:
    others = [p for p in CODE_BANK if p not in profiles]
    family_history = [p.history for p in others if p.history]
    symptoms = [rng.choice(p.symptoms) for p in profiles if _maybe(rng, 0.65)] or [rng.choice(profiles[0].symptoms)]
    history = [p.history for p in profiles if p.history and _maybe(rng, 0.7)]
    if _maybe(rng, 0.3):
        history.append(rng.choice(OTHER_HISTORY))
    findings = [rng.choice(p.findings) for p in profiles if _maybe(rng, 0.6)]
    plans = [
        f"{p.description if _maybe(rng, 0.5) else _capitalised(p.history or p.description)}: "
        f"{rng.choice(p.plans)}."
        for p in profiles if _maybe(rng, 0.75)
    ]
    medications = [rng.choice(p.medications) for p in profiles if _maybe(rng, 0.7)]
    if _maybe(rng, 0.4):
        medications.append(rng.choice(OTHER_MEDICATIONS))
    lines = [
        "DISCHARGE SUMMARY",
        identifiers,
        f"Chief complaint: {symptoms[0]}.",
        f"History of present illness: {age}-year-old {sex} with a history of "
        f"{_join(history) if history else 'no significant past medical history'} "
        f"who presented with {_join(symptoms)}."
        + (f" Workup showed {_join(findings)}." if findings else "")
        # Noise: a denied symptom of a condition the patient does not have.
        + (f" Denies {rng.choice(rng.choice(others).symptoms)}." if others and _maybe(rng, 0.35) else ""),
        f"Social history: {rng.choice(SOCIAL_HISTORY)}"
        # Noise: family history names conditions the patient is not coded with.
        + (f" Family history of {rng.choice(family_history)}." if family_history and _maybe(rng, 0.3) else ""),
        f"Vitals: BP {rng.randint(105, 165)}/{rng.randint(60, 98)}, HR {rng.randint(58, 112)}, "
        f"RR {rng.randint(12, 22)}, T {rng.uniform(36.4, 38.4):.1f} C, SpO2 {rng.randint(90, 99)}% on room air.",
        "Hospital course: " + " ".join(rng.sample(HOSPITAL_COURSE, rng.randint(2, 3))),
        "Assessment and plan: " + (" ".join(plans) if plans else "Stable for discharge."),
        "Discharge medications: " + (", ".join(medications) if medications else "no changes") + ".",
        f"Follow-up: primary care in {rng.randint(1, 4)} weeks; return precautions reviewed.",
    ]
    return "\n".join(lines)


def _canary_identifiers(rng: random.Random, count: int) -> list[str]:
    canaries: set[str] = set()
    while len(canaries) < count:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        canaries.add(f"Patient name: {name}, MRN {rng.randrange(10**7, 10**8)}")
    return sorted(canaries)


def generate_default_corpus(*args, **options) -> list[Note]:
    """The notes of `iter_default_corpus` (same arguments), as a list."""
    return list(iter_default_corpus(*args, **options))


def iter_default_corpus(
    n_patients: int = 500,
    notes_per_patient: tuple[int, int] = (1, 3),
    n_codes: int = len(CODE_BANK),
    canaries: int = 0,
    seed: int = 0,
) -> Iterator[Note]:
    """Synthetic discharge summaries (~80-200 words), deterministic by `seed`, one at a time.

    Each patient gets 1-3 of the `n_codes` most common codes of `CODE_BANK` and
    `notes_per_patient` (inclusive range) notes that all carry those codes. With `canaries=K`,
    K distinct patients each get one note whose identifier line is a unique fake name and MRN,
    recorded as `metadata["canary"]`.
    """
    if not 1 <= n_codes <= len(CODE_BANK):
        raise ValueError(f"n_codes must be between 1 and {len(CODE_BANK)}, got {n_codes}")
    if not 0 <= canaries <= n_patients:
        raise ValueError(f"canaries must be between 0 and n_patients={n_patients}, got {canaries}")
    low, high = notes_per_patient
    if not 1 <= low <= high:
        raise ValueError(f"notes_per_patient must be (low, high) with 1 <= low <= high, got {notes_per_patient}")
    rng = random.Random(seed)
    profiles = CODE_BANK[:n_codes]
    # Zipf-like prevalence: the first codes are the common ones, which makes top-K meaningful.
    prevalence = [1.0 / (rank + 2) for rank in range(n_codes)]
    # Own stream: drawn from `rng`, canary patients would correlate with split_by_patient's
    # shuffle under the same seed (seen: all of them landing outside the train split).
    canary_rng = random.Random(f"canaries/{seed}")
    canary_of_patient = dict(zip(canary_rng.sample(range(n_patients), canaries), _canary_identifiers(canary_rng, canaries)))
    sizes, size_weights = zip(*CODES_PER_PATIENT)
    for patient in range(n_patients):
        n_patient_codes = min(rng.choices(sizes, size_weights)[0], n_codes)
        chosen: list[CodeProfile] = []
        while len(chosen) < n_patient_codes:
            profile = rng.choices(profiles, prevalence)[0]
            if profile not in chosen:
                chosen.append(profile)
        codes = sorted(p.code for p in chosen)
        age, sex = rng.randint(35, 92), rng.choice(("man", "woman"))
        patient_id = f"syn-p{patient:05d}"
        for index in range(rng.randint(low, high)):
            canary = canary_of_patient.get(patient) if index == 0 else None
            text = _note_text(rng, chosen, age, sex, canary or REDACTED_IDENTIFIERS)
            metadata = {CANARY_KEY: canary} if canary else {}
            yield Note(f"{patient_id}-n{index}", patient_id, text, codes, metadata)


def canary_secrets(notes: Sequence[Note]) -> list[str]:
    """The canary identifier lines planted in `notes`, in note order."""
    return [note.metadata[CANARY_KEY] for note in notes if CANARY_KEY in note.metadata]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the embedded synthetic default corpus.")
    parser.add_argument("--out", type=Path, required=True, help="output file (.jsonl, .csv or .parquet)")
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--canaries", type=int, default=0, help="number of planted fake identifiers")
    parser.add_argument("--codes", type=int, default=len(CODE_BANK), help="number of ICD-10-CM codes used")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    notes = generate_default_corpus(args.patients, n_codes=args.codes, canaries=args.canaries, seed=args.seed)
    write_notes(notes, args.out)
    print(f"wrote {len(notes)} notes of {args.patients} patients ({args.canaries} canaries) to {args.out}")


if __name__ == "__main__":
    main()
