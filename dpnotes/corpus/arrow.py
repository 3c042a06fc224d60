"""The corpus in Arrow (HF datasets): notes in the schema, one row each, written a batch at a time
as a reader streams them, so no corpus is ever held as Python objects to be stored.

`cached_notes_table` keeps the table on disk under the corpus's fingerprint; training (every rank),
generation and evaluation then memory-map the same file instead of parsing the corpus again. It
holds private note text: the cache is owner-only (dpnotes.caches, docs/privacy.md).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter

from dpnotes.caches import ensure_entry
from dpnotes.corpus.schema import CorpusError, Note

NOTE_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "patient_id": datasets.Value("string"),
    "text": datasets.Value("string"),
    "codes": datasets.Sequence(datasets.Value("string")),
    "metadata": datasets.Value("string"),  # a JSON object: its keys differ between corpora
})
BATCH_NOTES = 1000  # notes held in Python at once while a table is written
TABLE_FILE = "notes.arrow"


def _batches(notes: Iterable[Note]) -> Iterator[dict[str, list]]:
    batch: dict[str, list] = {name: [] for name in NOTE_FEATURES}
    for note in notes:
        for name in ("id", "patient_id", "text", "codes"):
            batch[name].append(getattr(note, name))
        batch["metadata"].append(json.dumps(note.metadata, ensure_ascii=False))
        if len(batch["id"]) == BATCH_NOTES:
            yield batch
            batch = {name: [] for name in NOTE_FEATURES}
    if batch["id"]:
        yield batch


def notes_table(notes: Iterable[Note]) -> datasets.Dataset:
    """`notes` as an in-memory Arrow table."""
    schema = NOTE_FEATURES.arrow_schema
    tables = [pa.Table.from_pydict(batch, schema=schema) for batch in _batches(notes)]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=NOTE_FEATURES))


def write_notes_table(notes: Iterable[Note], path: Path) -> int:
    """Stream `notes` into an Arrow file at `path`; returns how many were written."""
    writer = ArrowWriter(features=NOTE_FEATURES, path=str(path))
    try:
        for batch in _batches(notes):
            writer.write_batch(batch)
        count, _ = writer.finalize()
    finally:
        writer.close()
    return count


def cached_notes_table(folder: Path, notes: Callable[[], Iterable[Note]], source: str) -> datasets.Dataset:
    """The table stored in cache entry `folder`, memory-mapped; on a miss `notes()` is streamed into
    it first (its reader validates and raises the corpus's errors). An empty corpus is an error."""

    def write(staging: Path) -> None:
        if write_notes_table(notes(), staging / TABLE_FILE) == 0:
            raise CorpusError(source, "no notes")

    return datasets.Dataset.from_file(str(ensure_entry(folder, write, TABLE_FILE) / TABLE_FILE))


def notes_of(table: datasets.Dataset) -> list[Note]:
    """The rows of a notes table as `Note`s (for consumers that hold every text anyway, e.g. coders)."""
    columns = table.to_dict()
    return [Note(id_, patient, text, list(codes), json.loads(metadata)) for id_, patient, text, codes, metadata
            in zip(columns["id"], columns["patient_id"], columns["text"], columns["codes"], columns["metadata"])]
