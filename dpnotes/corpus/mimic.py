"""MIMIC-III and MIMIC-IV discharge summaries with their admission's diagnosis codes.

MIMIC cannot be redistributed: these readers take the credentialed user's own files (`.csv` or
`.csv.gz`, as PhysioNet ships them).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from dpnotes.corpus.schema import CorpusError, Note, require_file, validate_notes

# The real NOTEEVENTS.csv is ~4 GB: read it in chunks and keep only discharge summaries.
CHUNK_ROWS = 200_000


def _read_columns(
    path: Path, required: list[str], optional: tuple[str, ...] = (),
    keep: Callable[[pd.DataFrame], pd.Series] | None = None,
) -> pd.DataFrame:
    header = pd.read_csv(path, nrows=0).columns
    missing = [name for name in required if name not in header]
    if missing:
        raise CorpusError(str(path), f"missing column(s) {', '.join(map(repr, missing))}")
    wanted = set(required) | (set(optional) & set(header))
    chunks = pd.read_csv(
        path, usecols=lambda name: name in wanted, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS
    )
    frames = [chunk[keep(chunk)] if keep else chunk for chunk in chunks]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=sorted(wanted))
    # Some exports write integer ids as "123.0"; the join needs one spelling.
    for name in frame.columns:
        if name.upper() in ("ROW_ID", "SUBJECT_ID", "HADM_ID", "NOTE_ID"):
            frame[name] = frame[name].str.strip().str.removesuffix(".0")
    return frame


def _notes_with_top_codes(
    notes: pd.DataFrame, codes: pd.DataFrame, top_k: int | None, source: str
) -> list[Note]:
    """`notes` has note_id, subject_id, hadm_id, text; `codes` has hadm_id, code.

    Codes are ranked by the number of the corpus's admissions that carry them (ties by code) and
    only the top `top_k` kept (None keeps all); notes left without a code are dropped.
    """
    notes = notes[(notes["hadm_id"] != "") & (notes["text"].str.strip() != "")]
    codes = codes[(codes["code"] != "") & codes["hadm_id"].isin(set(notes["hadm_id"]))].drop_duplicates()
    admissions_per_code = codes.groupby("code")["hadm_id"].nunique()
    ranked = sorted(admissions_per_code.items(), key=lambda item: (-item[1], item[0]))
    kept = {code for code, _ in ranked[:top_k]} if top_k is not None else set(admissions_per_code.index)
    codes = codes[codes["code"].isin(kept)]
    codes_by_admission = codes.groupby("hadm_id")["code"].apply(lambda group: sorted(set(group))).to_dict()
    result = [
        Note(
            id=row.note_id,
            patient_id=row.subject_id,
            text=row.text,
            codes=codes_by_admission[row.hadm_id],
            metadata={"hadm_id": row.hadm_id},
        )
        for row in notes.itertuples(index=False)
        if row.hadm_id in codes_by_admission
    ]
    validate_notes(result, source)
    return result


def _flagged_as_error(chunk: pd.DataFrame) -> pd.Series:
    if "ISERROR" not in chunk.columns:
        return pd.Series(False, index=chunk.index)
    return pd.to_numeric(chunk["ISERROR"], errors="coerce").fillna(0) == 1


def read_mimic3(
    noteevents_csv: str | Path, diagnoses_icd_csv: str | Path, top_k: int | None = 50
) -> list[Note]:
    """MIMIC-III discharge summaries (NOTEEVENTS, CATEGORY 'Discharge summary', ISERROR not set)
    with the ICD9_CODEs of their HADM_ID from DIAGNOSES_ICD, restricted to the top-K codes.

    id = ROW_ID, patient_id = SUBJECT_ID; codes are MIMIC's undotted ICD-9 codes, e.g. `4019`.
    An admission with several discharge summaries (addenda) gives several notes with the same codes.
    """
    noteevents_csv, diagnoses_icd_csv = require_file(noteevents_csv), require_file(diagnoses_icd_csv)
    notes = _read_columns(
        noteevents_csv,
        ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CATEGORY", "TEXT"],
        optional=("ISERROR",),
        keep=lambda chunk: (chunk["CATEGORY"].str.strip() == "Discharge summary") & ~_flagged_as_error(chunk),
    )
    notes = notes.rename(columns={"ROW_ID": "note_id", "SUBJECT_ID": "subject_id", "HADM_ID": "hadm_id", "TEXT": "text"})
    codes = _read_columns(diagnoses_icd_csv, ["HADM_ID", "ICD9_CODE"])
    codes = pd.DataFrame({"hadm_id": codes["HADM_ID"], "code": codes["ICD9_CODE"].str.strip()})
    return _notes_with_top_codes(notes, codes, top_k, str(noteevents_csv))


def read_mimic4(
    discharge_csv: str | Path,
    diagnoses_icd_csv: str | Path,
    top_k: int | None = 50,
    icd_version: int | None = None,
) -> list[Note]:
    """MIMIC-IV-Note `discharge.csv` joined on hadm_id with MIMIC-IV `diagnoses_icd.csv`.

    id = note_id, patient_id = subject_id. `icd_version` (9 or 10) keeps only that version.
    Code convention: MIMIC's undotted codes (`I10`, `4019`). Only when both versions remain are
    all codes prefixed, `icd9:4019` / `icd10:I10`, because the two code sets share strings
    (ICD-9 `E849` is a place of injury, ICD-10 `E849` is cystic fibrosis). Same top-K rule as MIMIC-III.
    """
    discharge_csv, diagnoses_icd_csv = require_file(discharge_csv), require_file(diagnoses_icd_csv)
    notes = _read_columns(discharge_csv, ["note_id", "subject_id", "hadm_id", "text"])
    codes = _read_columns(diagnoses_icd_csv, ["hadm_id", "icd_code", "icd_version"])
    codes["icd_version"] = codes["icd_version"].str.strip()
    if icd_version is not None:
        codes = codes[codes["icd_version"] == str(icd_version)]
    code_text = codes["icd_code"].str.strip()
    corpus_admissions = codes["hadm_id"].isin(set(notes["hadm_id"]))
    if codes.loc[corpus_admissions, "icd_version"].nunique() > 1:
        code_text = "icd" + codes["icd_version"] + ":" + code_text
    codes = pd.DataFrame({"hadm_id": codes["hadm_id"], "code": code_text})
    return _notes_with_top_codes(notes, codes, top_k, str(discharge_csv))


def _find_file(directory: str | Path, names: tuple[str, ...]) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CorpusError(str(directory), "directory not found")
    for name in names:
        found = sorted(directory.rglob(name))
        if found:
            return found[0]
    raise CorpusError(str(directory), f"no {' or '.join(names)} found")


def read_mimic3_dir(directory: str | Path, **options) -> list[Note]:
    """`read_mimic3` on NOTEEVENTS and DIAGNOSES_ICD found anywhere under `directory`."""
    return read_mimic3(
        _find_file(directory, ("NOTEEVENTS.csv", "NOTEEVENTS.csv.gz")),
        _find_file(directory, ("DIAGNOSES_ICD.csv", "DIAGNOSES_ICD.csv.gz")),
        **options,
    )


def read_mimic4_dir(directory: str | Path, **options) -> list[Note]:
    """`read_mimic4` on discharge and diagnoses_icd found anywhere under `directory`
    (PhysioNet ships them as `note/discharge.csv.gz` and `hosp/diagnoses_icd.csv.gz`)."""
    return read_mimic4(
        _find_file(directory, ("discharge.csv", "discharge.csv.gz")),
        _find_file(directory, ("diagnoses_icd.csv", "diagnoses_icd.csv.gz")),
        **options,
    )
