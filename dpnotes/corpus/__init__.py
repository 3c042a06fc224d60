"""The note corpus layer: one schema (`Note`) shared by train, generate and eval, its streaming
readers and writers, the corpus as an Arrow table (cached by fingerprint), patient-level splits and
the embedded synthetic default corpus.

Names are imported from their modules on first use: a module that needs only the code lists (the
prompt format, hence the privacy layer's losses) does not pull in pandas, pyarrow and datasets, and
`python -m dpnotes.corpus.synthetic_default` does not load that module twice (runpy warns about that).
"""
import importlib

_MODULE_OF = {
    "notes_of": "arrow", "notes_table": "arrow",
    "corpus_fingerprint": "load", "corpus_table": "load", "iter_corpus": "load", "load_configured_splits": "load",
    "load_corpus": "load", "load_split_tables": "load",
    "read_mimic3": "mimic", "read_mimic4": "mimic",
    "MTSAMPLES_DOCUMENT_TYPES": "public_corpora", "read_cmc2007": "public_corpora", "read_mtsamples": "public_corpora",
    "iter_notes": "readers", "read_notes": "readers", "write_notes": "readers",
    "CorpusError": "schema", "Note": "schema", "NoteValidator": "schema", "validate_notes": "schema",
    "examples_by_patient": "splits", "label_counts": "splits", "split_by_patient": "splits", "split_rows": "splits",
    "canary_secrets": "synthetic_default", "generate_default_corpus": "synthetic_default",
    "iter_default_corpus": "synthetic_default",
}


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"dpnotes.corpus.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_MODULE_OF)
