"""The one note schema shared by train, generate and eval."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpnotes.errors import UserError


@dataclass
class Note:
    """One clinical note. `patient_id` is the privacy unit: DP accounting and splits group by it."""

    id: str
    patient_id: str
    text: str
    codes: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


class CorpusError(UserError):
    """A corpus that cannot be used. The message names the file, the row or record and the problem,
    never the note text (it may hold PHI)."""

    def __init__(self, source: str, problem: str, row: int | str | None = None):
        where = f"{source} row {row}" if row is not None else str(source)
        super().__init__(f"{where}: {problem}")
        self.source, self.row, self.problem = str(source), row, problem


@contextmanager
def unreadable_as_corpus_error(source: str | Path):
    """Turn a file that cannot be decoded or parsed (a binary file, a broken CSV, Parquet or XML)
    into a CorpusError naming the file, never its content."""
    import xml.etree.ElementTree as ET

    import pandas as pd
    import pyarrow as pa

    try:
        yield
    except UnicodeDecodeError as error:
        raise CorpusError(str(source), f"not UTF-8 text (undecodable byte at offset {error.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise CorpusError(str(source), f"not a readable CSV file ({type(error).__name__})") from None
    except (pa.ArrowException, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise CorpusError(str(source), f"not a readable file ({type(error).__name__})") from None
    except ET.ParseError as error:
        raise CorpusError(str(source), f"not well-formed XML (line {error.position[0]})") from None


def require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(str(path), "file not found")
    return path


def check_codes(codes: Any, source: str, row: int | str) -> list[str]:
    """Return `codes` if it is a list of non-empty strings, else raise naming the row."""
    if not isinstance(codes, list):
        raise CorpusError(source, f"codes must be a list of strings, got {type(codes).__name__}", row)
    for code in codes:
        if not isinstance(code, str) or not code.strip():
            raise CorpusError(source, f"malformed code {code!r} (codes must be non-empty strings)", row)
    return codes


class NoteValidator:
    """Checks notes one at a time, as a reader streams them: ids, patient ids, text and codes of
    each, and that ids are unique so far. With `known_codes`, a code outside that set is an error.
    Rows are reported 1-based in the order the notes are checked (the file's data row order)."""

    def __init__(self, source: str, known_codes: Iterable[str] | None = None):
        self.source = source
        self.known = set(known_codes) if known_codes is not None else None
        self.first_row_of_id: dict[str, int] = {}

    def check(self, note: Note) -> Note:
        row, source = len(self.first_row_of_id) + 1, self.source
        for name in ("id", "patient_id", "text"):
            value = getattr(note, name)
            if not isinstance(value, str) or not value.strip():
                raise CorpusError(source, f"empty {name}", row)
        check_codes(note.codes, source, row)
        if self.known is not None:
            unknown = sorted(set(note.codes) - self.known)
            if unknown:
                raise CorpusError(source, f"unknown code(s) {', '.join(unknown)}", row)
        if not isinstance(note.metadata, dict):
            raise CorpusError(source, "metadata must be a dict", row)
        if note.id in self.first_row_of_id:
            raise CorpusError(source, f"duplicate id {note.id!r} (first at row {self.first_row_of_id[note.id]})", row)
        self.first_row_of_id[note.id] = row
        return note

    def stream(self, notes: Iterable[Note]) -> Iterator[Note]:
        return (self.check(note) for note in notes)


def validate_notes(notes: Sequence[Note], source: str, known_codes: Iterable[str] | None = None) -> None:
    """Check every note of `notes` (see `NoteValidator`)."""
    validator = NoteValidator(source, known_codes)
    for note in notes:
        validator.check(note)
