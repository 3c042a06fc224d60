"""MIMIC-III and MIMIC-IV discharge summaries with their admission's diagnosis codes.

MIMIC cannot be redistributed: these readers take the credentialed user's own files (`.csv` or
`.csv.gz`, as PhysioNet ships them).

Which codes are kept comes from a fixed, public code list (or all codes), never from counts over
the corpus: the corpus is the private data, and a selection computed from it (e.g. "the 50 most
frequent codes") would let one patient change other patients' labels and which of their notes
are kept, a data-dependent step outside the DP guarantee.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pandas as pd

from dpnotes.corpus.code_lists import resolve_code_list
from dpnotes.corpus.schema import CorpusError, Note, NoteValidator, require_file

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


def _notes_with_listed_codes(
    notes: pd.DataFrame, codes: pd.DataFrame, kept: frozenset[str] | None, source: str
) -> Iterator[Note]:
    """`notes` has note_id, subject_id, hadm_id, text; `codes` has hadm_id, code.

    Each admission keeps its codes that are in the fixed set `kept` (from `resolve_code_list`;
    None keeps all); notes left without a code are dropped. The decision for one note depends on
    its own admission's codes and the public list only, never on other patients: no frequency
    ranking over the corpus, which would be a data-dependent selection outside the DP guarantee.
    """
    notes = notes[(notes["hadm_id"] != "") & (notes["text"].str.strip() != "")]
    codes = codes[(codes["code"] != "") & codes["hadm_id"].isin(set(notes["hadm_id"]))].drop_duplicates()
    if kept is not None:
        codes = codes[codes["code"].isin(kept)]
    codes_by_admission = codes.groupby("hadm_id")["code"].apply(lambda group: sorted(set(group))).to_dict()
    validator = NoteValidator(source)
    for row in notes.itertuples(index=False):
        if row.hadm_id in codes_by_admission:
            yield validator.check(Note(id=row.note_id, patient_id=row.subject_id, text=row.text,
                                       codes=codes_by_admission[row.hadm_id], metadata={"hadm_id": row.hadm_id}))


def dotted_icd9(code: str, procedure: bool) -> str:
    """MIMIC's undotted ICD-9-CM code dotted the CAML way (Mullenbach et al. 2018): procedures
    after 2 characters (`9604` -> `96.04`), E-codes after 4 (`E8497` -> `E849.7`), other
    diagnoses after 3 (`4019` -> `401.9`, `V5861` -> `V58.61`; `486` stays `486`). Undotted
    diagnosis and procedure codes collide (diagnosis 960.4 and procedure 96.04 are both `9604`);
    dotted they do not.
    """
    code = code.strip().replace(".", "")
    if procedure:
        split = 2
    elif code[:1].upper() == "E":
        split = 4
    else:
        split = 3
    return f"{code[:split]}.{code[split:]}" if len(code) > split else code


def _flagged_as_error(chunk: pd.DataFrame) -> pd.Series:
    if "ISERROR" not in chunk.columns:
        return pd.Series(False, index=chunk.index)
    return pd.to_numeric(chunk["ISERROR"], errors="coerce").fillna(0) == 1


def _mimic3_codes(path: Path, procedure: bool) -> pd.DataFrame:
    codes = _read_columns(path, ["HADM_ID", "ICD9_CODE"])
    codes = codes[codes["ICD9_CODE"].str.strip() != ""]
    return pd.DataFrame({
        "hadm_id": codes["HADM_ID"],
        "code": [dotted_icd9(code, procedure) for code in codes["ICD9_CODE"]],
    })


def read_mimic3(*files: str | Path | None, **options) -> list[Note]:
    """The notes of `iter_mimic3`, as a list."""
    return list(iter_mimic3(*files, **options))


def iter_mimic3(
    noteevents_csv: str | Path,
    diagnoses_icd_csv: str | Path,
    procedures_icd_csv: str | Path | None = None,
    *,
    codes: str | Path | Sequence[str] | None = "mimic3-top50",
) -> Iterator[Note]:
    """MIMIC-III discharge summaries (NOTEEVENTS, CATEGORY 'Discharge summary', ISERROR not set)
    with the ICD-9 codes of their HADM_ID from DIAGNOSES_ICD and, when given, PROCEDURES_ICD.

    id = ROW_ID, patient_id = SUBJECT_ID. Codes are dotted ICD-9-CM the CAML way (`dotted_icd9`):
    diagnoses `401.9`, `E849.7`, `V58.61`, procedures `96.04`, so a diagnosis and a procedure never
    share a string (both are `9604` undotted in MIMIC).

    `codes` is the fixed list of codes to keep (`resolve_code_list`): by default the published
    MIMIC-III top-50 list (Mullenbach et al. 2018, shipped as `data/mimic3_top50.txt`; 17 of its
    codes are procedures, found only when PROCEDURES_ICD is given), None or "all" for every code,
    a file or a list of dotted codes. It is public and fixed on purpose: counting the most
    frequent codes over the corpus would make one patient change other patients' labels and
    which notes are kept, outside the DP guarantee. Notes left without a kept code are dropped.
    An admission with several discharge summaries (addenda) gives several notes with the same codes.
    """
    noteevents_csv, diagnoses_icd_csv = require_file(noteevents_csv), require_file(diagnoses_icd_csv)
    kept = resolve_code_list(codes)  # before reading: a bad list fails fast
    code_frames = [_mimic3_codes(diagnoses_icd_csv, procedure=False)]
    if procedures_icd_csv is not None:
        code_frames.append(_mimic3_codes(require_file(procedures_icd_csv), procedure=True))
    notes = _read_columns(
        noteevents_csv,
        ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CATEGORY", "TEXT"],
        optional=("ISERROR",),
        keep=lambda chunk: (chunk["CATEGORY"].str.strip() == "Discharge summary") & ~_flagged_as_error(chunk),
    )
    notes = notes.rename(columns={"ROW_ID": "note_id", "SUBJECT_ID": "subject_id", "HADM_ID": "hadm_id", "TEXT": "text"})
    codes_frame = pd.concat(code_frames, ignore_index=True)
    yield from _notes_with_listed_codes(notes, codes_frame, kept, str(noteevents_csv))


def read_mimic4(*files: str | Path, **options) -> list[Note]:
    """The notes of `iter_mimic4`, as a list."""
    return list(iter_mimic4(*files, **options))


def iter_mimic4(
    discharge_csv: str | Path,
    diagnoses_icd_csv: str | Path,
    *,
    codes: str | Path | Sequence[str] | None = None,
    icd_version: int | None = None,
) -> Iterator[Note]:
    """MIMIC-IV-Note `discharge.csv` joined on hadm_id with MIMIC-IV `diagnoses_icd.csv`.

    id = note_id, patient_id = subject_id. `icd_version` (9 or 10) keeps only that version.
    Code convention: MIMIC-IV's undotted codes. With `icd_version` set they are bare (`I10`,
    `4019`); without it every code is prefixed, `icd9:4019` / `icd10:I10`, because the two code
    sets share strings (ICD-9 `E849` is a place of injury, ICD-10 `E849` is cystic fibrosis). The
    prefixing rule depends on the argument only, never on which versions the corpus holds (that
    would let one patient change the others' labels).

    `codes` is a fixed list of codes to keep (`resolve_code_list`), default None: every code. The
    shipped "mimic3-top50" list is dotted ICD-9 and does not match MIMIC-IV codes; give a list in
    MIMIC-IV's own format (e.g. `["I10", "E119"]` with `icd_version=10`, or `["icd10:I10"]`
    without). The list must be public and fixed, not counted over this corpus: a data-dependent
    top-K would be a selection outside the DP guarantee. Notes left without a kept code are dropped.
    """
    discharge_csv, diagnoses_icd_csv = require_file(discharge_csv), require_file(diagnoses_icd_csv)
    kept = resolve_code_list(codes)  # before reading: a bad list fails fast
    notes = _read_columns(discharge_csv, ["note_id", "subject_id", "hadm_id", "text"])
    diagnoses = _read_columns(diagnoses_icd_csv, ["hadm_id", "icd_code", "icd_version"])
    diagnoses["icd_version"] = diagnoses["icd_version"].str.strip()
    code_text = diagnoses["icd_code"].str.strip()
    if icd_version is not None:
        keep = diagnoses["icd_version"] == str(icd_version)
        diagnoses, code_text = diagnoses[keep], code_text[keep]
    else:
        code_text = "icd" + diagnoses["icd_version"] + ":" + code_text
    code_frame = pd.DataFrame({"hadm_id": diagnoses["hadm_id"], "code": code_text})
    yield from _notes_with_listed_codes(notes, code_frame, kept, str(discharge_csv))


def _find_file(directory: str | Path, names: tuple[str, ...]) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CorpusError(str(directory), "directory not found")
    found = _find_optional_file(directory, names)
    if found is None:
        raise CorpusError(str(directory), f"no {' or '.join(names)} found")
    return found


def _find_optional_file(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        found = sorted(directory.rglob(name))
        if found:
            return found[0]
    return None


def iter_mimic3_dir(directory: str | Path, **options) -> Iterator[Note]:
    """`iter_mimic3` on NOTEEVENTS, DIAGNOSES_ICD and, if present, PROCEDURES_ICD found anywhere
    under `directory`; `options` (e.g. `codes=`) go to `iter_mimic3`."""
    notes = _find_file(directory, ("NOTEEVENTS.csv", "NOTEEVENTS.csv.gz"))
    diagnoses = _find_file(directory, ("DIAGNOSES_ICD.csv", "DIAGNOSES_ICD.csv.gz"))
    if "procedures_icd_csv" not in options:
        options["procedures_icd_csv"] = _find_optional_file(
            Path(directory), ("PROCEDURES_ICD.csv", "PROCEDURES_ICD.csv.gz")
        )
    return iter_mimic3(notes, diagnoses, **options)


def iter_mimic4_dir(directory: str | Path, **options) -> Iterator[Note]:
    """`iter_mimic4` on discharge and diagnoses_icd found anywhere under `directory`
    (PhysioNet ships them as `note/discharge.csv.gz` and `hosp/diagnoses_icd.csv.gz`)."""
    return iter_mimic4(
        _find_file(directory, ("discharge.csv", "discharge.csv.gz")),
        _find_file(directory, ("diagnoses_icd.csv", "diagnoses_icd.csv.gz")),
        **options,
    )
