"""The note corpus layer: one schema (`Note`) shared by train, generate and eval, its streaming
readers and writers, the corpus as an Arrow table (cached by fingerprint), patient-level splits and
the embedded synthetic default corpus."""
from dpnotes.corpus.arrow import notes_of, notes_table
from dpnotes.corpus.load import (corpus_fingerprint, corpus_table, iter_corpus, load_configured_splits, load_corpus,
                                 load_split_tables)
from dpnotes.corpus.mimic import read_mimic3, read_mimic4
from dpnotes.corpus.public_corpora import MTSAMPLES_DOCUMENT_TYPES, read_cmc2007, read_mtsamples
from dpnotes.corpus.readers import iter_notes, read_notes, write_notes
from dpnotes.corpus.schema import CorpusError, Note, NoteValidator, validate_notes
from dpnotes.corpus.splits import examples_by_patient, label_counts, split_by_patient, split_rows

# synthetic_default is imported on first use: importing it here would make
# `python -m dpnotes.corpus.synthetic_default` load the module twice (runpy warns about that).
_SYNTHETIC_NAMES = ("canary_secrets", "generate_default_corpus", "iter_default_corpus")


def __getattr__(name: str):
    if name in _SYNTHETIC_NAMES:
        from dpnotes.corpus import synthetic_default

        return getattr(synthetic_default, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MTSAMPLES_DOCUMENT_TYPES",
    "CorpusError",
    "Note",
    "NoteValidator",
    "canary_secrets",
    "corpus_fingerprint",
    "corpus_table",
    "generate_default_corpus",
    "examples_by_patient",
    "iter_corpus",
    "iter_default_corpus",
    "iter_notes",
    "label_counts",
    "load_configured_splits",
    "load_corpus",
    "load_split_tables",
    "notes_of",
    "notes_table",
    "read_cmc2007",
    "read_mimic3",
    "read_mimic4",
    "read_mtsamples",
    "read_notes",
    "split_by_patient",
    "split_rows",
    "validate_notes",
    "write_notes",
]
