"""Notes in the schema as JSONL, CSV or Parquet files."""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from dpnotes.corpus.schema import CorpusError, Note, NoteValidator, check_codes, require_file, unreadable_as_corpus_error

REQUIRED_FIELDS = ("id", "patient_id", "text", "codes")
SCHEMA_SUFFIXES = (".jsonl", ".csv", ".parquet")
CHUNK_ROWS = 10_000  # rows of a CSV or Parquet file held at once


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_id(value: Any) -> str:
    return "" if _is_missing(value) else str(value)


def _parse_codes(value: Any, source: str, row: int, codes_as_text: bool) -> list[str]:
    """Codes as a list or, with `codes_as_text` (CSV), as `A;B` or a JSON list `["A", "B"]`."""
    if codes_as_text and isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError:
                raise CorpusError(source, "malformed codes (invalid JSON list)", row) from None
        else:
            value = [code.strip() for code in stripped.split(";")] if stripped else []
    elif _is_missing(value):
        value = []
    elif hasattr(value, "tolist"):  # Parquet list columns arrive as numpy arrays
        value = value.tolist()
    return check_codes(value, source, row)


def _parse_metadata(value: Any, source: str, row: int) -> dict[str, Any]:
    if _is_missing(value) or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise CorpusError(source, "malformed metadata (invalid JSON)", row) from None
    if not isinstance(value, dict):
        raise CorpusError(source, "metadata must be a JSON object", row)
    return value


def _note_from_record(record: dict[str, Any], source: str, row: int, codes_as_text: bool) -> Note:
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise CorpusError(source, f"missing field {name!r}", row)
    text = record["text"]
    return Note(
        id=_as_id(record["id"]),
        patient_id=_as_id(record["patient_id"]),
        text="" if _is_missing(text) else str(text),
        codes=_parse_codes(record["codes"], source, row, codes_as_text),
        metadata=_parse_metadata(record.get("metadata"), source, row),
    )


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as lines:
        for row, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CorpusError(str(path), "not UTF-8 text", row) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                # error.msg holds the parser's complaint only, never the line's content.
                raise CorpusError(str(path), f"invalid JSON ({error.msg})", row) from None
            if not isinstance(record, dict):
                raise CorpusError(str(path), "a line must be a JSON object", row)
            yield record


def _check_columns(path: Path, columns: Sequence[str]) -> None:
    missing = [name for name in REQUIRED_FIELDS if name not in columns]
    if missing:
        raise CorpusError(str(path), f"missing column(s) {', '.join(map(repr, missing))}")


def _table_records(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV or Parquet file, a chunk in memory at a time."""
    if path.suffix == ".csv":
        _check_columns(path, pd.read_csv(path, nrows=0).columns)
        # Every cell as text, and "NA"/"null" in a note stays text rather than becoming missing.
        for chunk in pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS):
            yield from chunk.to_dict(orient="records")
    else:
        table = pq.ParquetFile(path)
        _check_columns(path, table.schema_arrow.names)
        for batch in table.iter_batches(batch_size=CHUNK_ROWS):
            yield from batch.to_pylist()


def iter_notes(path: str | Path, known_codes: Sequence[str] | None = None) -> Iterator[Note]:
    """Notes in the schema from `.jsonl`, `.csv` or `.parquet`, validated as they are read: a
    corpus of any size streams through a chunk at a time."""
    path = require_file(path)
    if path.suffix not in SCHEMA_SUFFIXES:
        raise CorpusError(str(path), f"unsupported file type (expected one of {', '.join(SCHEMA_SUFFIXES)})")
    codes_as_text = path.suffix == ".csv"
    validator = NoteValidator(str(path), known_codes)
    with unreadable_as_corpus_error(path):
        records = _jsonl_records(path) if path.suffix == ".jsonl" else _table_records(path)
        for row, record in enumerate(records, start=1):
            yield validator.check(_note_from_record(record, str(path), row, codes_as_text))


def read_notes(path: str | Path, known_codes: Sequence[str] | None = None) -> list[Note]:
    """Read notes in the schema from `.jsonl`, `.csv` or `.parquet` and validate them."""
    return list(iter_notes(path, known_codes))


def write_notes(notes: Sequence[Note], path: str | Path) -> Path:
    """Write notes in the schema; the suffix picks JSONL (default), CSV or Parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".csv", ".parquet"):
        frame = pd.DataFrame(
            {
                "id": [note.id for note in notes],
                "patient_id": [note.patient_id for note in notes],
                "text": [note.text for note in notes],
                # A JSON list is unambiguous even if a code ever contains ';'.
                "codes": [json.dumps(note.codes) if path.suffix == ".csv" else note.codes for note in notes],
                "metadata": [json.dumps(note.metadata, ensure_ascii=False) for note in notes],
            }
        )
        if path.suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        return path
    with path.open("w", encoding="utf-8") as out:
        for note in notes:
            out.write(json.dumps(asdict(note), ensure_ascii=False) + "\n")
    return path
