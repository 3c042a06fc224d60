"""`load_corpus`: one entry point that picks the reader from a spec string."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from dpnotes.corpus.mimic import read_mimic3_dir, read_mimic4_dir
from dpnotes.corpus.public_corpora import read_cmc2007, read_mtsamples
from dpnotes.corpus.readers import SCHEMA_SUFFIXES, read_notes
from dpnotes.digests import digest, source_digest
from dpnotes.corpus.schema import CorpusError, Note, unreadable_as_corpus_error, validate_notes
from dpnotes.corpus.splits import split_by_patient

PREFIXED_READERS = {
    "mtsamples": read_mtsamples,
    "cmc2007": read_cmc2007,
    "mimic3": read_mimic3_dir,
    "mimic4": read_mimic4_dir,
    "notes": read_notes,
}


def load_corpus(spec: str | Path, **options: Any) -> list[Note]:
    """Load a corpus from a spec and pass `options` to its reader.

    Specs: `mtsamples:PATH`, `cmc2007:PATH`, `mimic3:DIR`, `mimic4:DIR`, `notes:PATH`, `default`
    (the embedded synthetic corpus), or a plain path: `mtsamples.csv`, `*.xml` (CMC-2007), or a
    `.jsonl` / `.csv` / `.parquet` file in the schema.
    """
    text = str(spec)
    if text == "default":
        from dpnotes.corpus.synthetic_default import generate_default_corpus  # see the note in __init__

        return generate_default_corpus(**options)
    prefix, has_prefix, rest = text.partition(":")
    if has_prefix and prefix in PREFIXED_READERS:
        with unreadable_as_corpus_error(rest):
            return PREFIXED_READERS[prefix](rest, **options)
    path = Path(text)
    if not path.exists():
        raise CorpusError(text, "file not found")
    if path.name.lower() == "mtsamples.csv":
        with unreadable_as_corpus_error(path):
            return read_mtsamples(path, **options)
    if path.suffix.lower() == ".xml":
        with unreadable_as_corpus_error(path):
            return read_cmc2007(path, **options)
    if path.suffix in SCHEMA_SUFFIXES:
        return read_notes(path, **options)
    raise CorpusError(text, "unknown corpus (use a prefix such as mtsamples:, cmc2007:, mimic3:, mimic4:)")


READER_MODULES = ("dpnotes.corpus.load", "dpnotes.corpus.readers", "dpnotes.corpus.schema", "dpnotes.corpus.mimic",
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


def load_configured_splits(spec: str, *, default_patients: int = 400, canaries: int = 0,
                           seed: int = 0) -> dict[str, list[Note]]:
    """The corpus a run names, validated before any work and split by patient with `seed`. The
    embedded default corpus is generated with `default_patients` patients, `canaries` planted
    identifiers and the same `seed`; other specs go to `load_corpus`."""
    if spec == "default":
        notes = load_corpus("default", n_patients=default_patients, canaries=canaries, seed=seed)
        source = "default corpus"
    else:
        notes, source = load_corpus(spec), spec
    validate_notes(notes, source)
    return split_by_patient(notes, seed=seed)
