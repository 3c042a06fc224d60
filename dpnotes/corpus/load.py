"""One entry point that picks the reader from a spec string (`iter_corpus`), the corpus as an Arrow
table (`corpus_table`, cached by fingerprint) and its patient-level splits (`load_split_tables`)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import datasets

from dpnotes.corpus.arrow import cached_notes_table, notes_of, notes_table
from dpnotes.corpus.mimic import iter_mimic3_dir, iter_mimic4_dir
from dpnotes.corpus.public_corpora import read_cmc2007, read_mtsamples
from dpnotes.corpus.readers import SCHEMA_SUFFIXES, iter_notes
from dpnotes.corpus.schema import CorpusError, Note, NoteValidator, unreadable_as_corpus_error
from dpnotes.corpus.splits import split_rows
from dpnotes.digests import digest, source_digest

PREFIXED_READERS = {
    "mtsamples": read_mtsamples,
    "cmc2007": read_cmc2007,
    "mimic3": iter_mimic3_dir,
    "mimic4": iter_mimic4_dir,
    "notes": iter_notes,
}


def load_corpus(spec: str | Path, **options: Any) -> list[Note]:
    """The notes of `iter_corpus`, as a list."""
    return list(iter_corpus(spec, **options))


def iter_corpus(spec: str | Path, **options: Any) -> Iterator[Note]:
    """The validated notes of a corpus spec, `options` passed to its reader. The schema files, MIMIC
    and the default corpus stream; MTSamples and CMC-2007 (a few thousand texts) are read whole.

    Specs: `mtsamples:PATH`, `cmc2007:PATH`, `mimic3:DIR`, `mimic4:DIR`, `notes:PATH`, `default`
    (the embedded synthetic corpus), or a plain path: `mtsamples.csv`, `*.xml` (CMC-2007), or a
    `.jsonl` / `.csv` / `.parquet` file in the schema.
    """
    text = str(spec)
    if text == "default":
        from dpnotes.corpus.synthetic_default import iter_default_corpus  # see the note in __init__

        yield from NoteValidator("default corpus").stream(iter_default_corpus(**options))
        return
    reader, location = _reader(text)
    with unreadable_as_corpus_error(location):
        yield from reader(location, **options)


def _reader(spec: str) -> tuple[Callable[..., Iterable[Note]], str]:
    prefix, has_prefix, rest = spec.partition(":")
    if has_prefix and prefix in PREFIXED_READERS:
        return PREFIXED_READERS[prefix], rest
    path = Path(spec)
    if not path.exists():
        raise CorpusError(spec, "file not found")
    if path.name.lower() == "mtsamples.csv":
        return read_mtsamples, spec
    if path.suffix.lower() == ".xml":
        return read_cmc2007, spec
    if path.suffix in SCHEMA_SUFFIXES:
        return iter_notes, spec
    raise CorpusError(spec, "unknown corpus (use a prefix such as mtsamples:, cmc2007:, mimic3:, mimic4:)")


def corpus_table(spec: str, cache: Path | None = None, **options: Any) -> datasets.Dataset:
    """The corpus a spec names as a validated Arrow table. With `cache`, it is stored once under
    the corpus's fingerprint and memory-mapped: a later call reads no note."""
    source = "default corpus" if spec == "default" else str(spec)
    if cache is None:
        table = notes_table(iter_corpus(spec, **options))
        if len(table) == 0:
            raise CorpusError(source, "no notes")
        return table
    return cached_notes_table(cache / corpus_fingerprint(spec, **options), lambda: iter_corpus(spec, **options), source)


READER_MODULES = ("dpnotes.corpus.load", "dpnotes.corpus.arrow", "dpnotes.corpus.readers", "dpnotes.corpus.schema", "dpnotes.corpus.mimic",
                  "dpnotes.corpus.public_corpora", "dpnotes.corpus.synthetic_default", "dpnotes.corpus.default_code_bank",
                  "dpnotes.corpus.splits", "dpnotes.corpus.code_lists")


def corpus_fingerprint(spec: str, **options: Any) -> str:
    """A digest that changes whenever the notes a spec names can change, computed without reading
    a note: the spec, the reader options and the readers' code, and for files the path, size and
    modification time of each (the default corpus is a function of its options)."""
    text = str(spec)
    prefix, has_prefix, rest = text.partition(":")
    location = Path(rest if has_prefix and prefix in PREFIXED_READERS else text)
    files = [] if text == "default" else sorted(location.rglob("*")) if location.is_dir() else [location]
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    if text != "default" and not stats:
        raise CorpusError(text, "file not found")
    shipped = sorted((Path(__file__).parent / "data").glob("*"))  # the public code lists readers filter with
    return digest(text, options, stats, source_digest(*READER_MODULES),
                  [hashlib.sha256(f.read_bytes()).hexdigest() for f in shipped])


def load_split_tables(spec: str, *, default_patients: int = 400, canaries: int = 0, seed: int = 0,
                      cache: Path | None = None) -> dict[str, datasets.Dataset]:
    """The corpus a run names, validated before any work, as train/dev/test tables split by patient
    with `seed` (rows keep the corpus order). The embedded default corpus is generated with
    `default_patients` patients, `canaries` planted identifiers and the same `seed`. With `cache`,
    the corpus is read once (see `corpus_table`)."""
    options = {"n_patients": default_patients, "canaries": canaries, "seed": seed} if spec == "default" else {}
    table = corpus_table(spec, cache, **options)
    # keep_in_memory: the row selection is a small index array, not a file beside the cached corpus.
    return {name: table.select(rows, keep_in_memory=True)
            for name, rows in split_rows(table["patient_id"], seed=seed).items()}


def load_configured_splits(spec: str, *, default_patients: int = 400, canaries: int = 0, seed: int = 0,
                           cache: Path | None = None) -> dict[str, list[Note]]:
    """The notes of `load_split_tables`."""
    tables = load_split_tables(spec, default_patients=default_patients, canaries=canaries, seed=seed, cache=cache)
    return {name: notes_of(table) for name, table in tables.items()}
