"""Fixed, public code lists: which codes a corpus keeps, and the label space of a DP coder.

Nothing here looks at a corpus. A list computed from the private notes ("the 50 most frequent
codes", "the codes that occur in training") would let one patient change other patients' labels,
or reveal a rare code through the width of a classifier head: a release outside the guarantee.
"""
from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from dpnotes.corpus.schema import CorpusError
from dpnotes.corpus.default_code_bank import CODE_BANK

# Lists shipped with the package, by name (files under dpnotes/corpus/data/).
CODE_LISTS = {
    "mimic3-top50": "mimic3_top50.txt",
    "cmc2007": "icd9_codes_cmc_challenge_2007.txt",
    "mtsamples-specialties": "specialties_of_mtsamples_site.txt",
}
ALL_CODES = "all"  # `codes="all"` is `codes=None`, for option strings (e.g. `--option codes=all`)
DEFAULT_CORPUS = "default-corpus"  # the embedded corpus's code bank (ICD-10-CM codes)

CORPUS_KINDS = ("default", "mimic3", "mimic4", "cmc2007", "mtsamples", "notes")
# The public label space of each corpus kind the project reads, by corpus spec prefix.
CORPUS_LABELS = {"default": DEFAULT_CORPUS, "mimic3": "mimic3-top50", "cmc2007": "cmc2007",
                 "mtsamples": "mtsamples-specialties"}


def _parse_code_list(text: str, source: str) -> list[str]:
    codes = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    codes = [code for code in codes if code]
    if not codes:
        raise CorpusError(source, "code list has no codes (one code per line, '#' comments)")
    return codes


def resolve_code_list(codes: str | Path | Sequence[str] | None) -> frozenset[str] | None:
    """The fixed set of codes: None (or "all") for every code; a name in `CODE_LISTS` or
    "default-corpus"; a path to a text file with one code per line and `#` comments; or a sequence
    of code strings. Bad input raises `CorpusError`."""
    if codes is None or (isinstance(codes, str) and codes == ALL_CODES):
        return None
    if isinstance(codes, str) and codes == DEFAULT_CORPUS:
        return frozenset(profile.code for profile in CODE_BANK)
    if isinstance(codes, str) and codes in CODE_LISTS:
        resource = resources.files("dpnotes.corpus").joinpath("data", CODE_LISTS[codes])
        text = resource.read_text(encoding="utf-8")
        return frozenset(_parse_code_list(text, f"code list {codes!r} ({resource})"))
    if isinstance(codes, (str, Path)):
        path = Path(codes)
        if not path.is_file():
            names = ", ".join(map(repr, [*CODE_LISTS, DEFAULT_CORPUS]))
            raise CorpusError(
                str(path),
                f"code list file not found (codes= takes None, {ALL_CODES!r}, {names}, a file or a list)",
            )
        return frozenset(_parse_code_list(path.read_text(encoding="utf-8"), str(path)))
    if isinstance(codes, Sequence) and not isinstance(codes, bytes):
        if not codes:
            raise CorpusError("codes", "code list is empty")
        bad = [code for code in codes if not isinstance(code, str) or not code.strip()]
        if bad:
            raise CorpusError("codes", f"code list has malformed code {bad[0]!r} (codes must be non-empty strings)")
        return frozenset(code.strip() for code in codes)
    raise CorpusError("codes", f"code list must be None, a name, a path or a list of strings, got {type(codes).__name__}")


def corpus_kind(corpus: str | Path | None) -> str | None:
    """The kind of corpus a spec names ("default", "cmc2007", "mimic3", "mimic4", "mtsamples",
    "notes"): its prefix, or for a plain path what `load_corpus` reads it as; None when unknown."""
    text = "" if corpus is None else str(corpus)
    prefix, has_prefix, _ = text.partition(":")
    if text == "default" or (has_prefix and prefix in CORPUS_KINDS):
        return prefix
    if Path(text).name.lower() == "mtsamples.csv":
        return "mtsamples"
    return "cmc2007" if Path(text).suffix.lower() == ".xml" else None


def public_label_space(labels: str | Path | Sequence[str] | None, corpus: str | None = None) -> list[str]:
    """The sorted public label list of a DP coder: `labels` (a list name, file or sequence), or,
    when None, the public list of the corpus kind `corpus` names ("default", "cmc2007:...",
    "mimic3:...", "mtsamples:..."). Anything else needs an explicit list."""
    if labels is None and corpus is not None:
        labels = CORPUS_LABELS.get(corpus_kind(corpus))
    if labels is None:
        raise CorpusError(
            str(corpus), "no public label space for this corpus: give a label list (a file with one code per line, "
            f"or one of {', '.join([*CODE_LISTS, DEFAULT_CORPUS])}); labels taken from the private notes would be "
            "released outside the guarantee"
        )
    resolved = resolve_code_list(labels)
    if resolved is None:
        raise CorpusError("labels", f"{ALL_CODES!r} is not a label space: name a fixed list")
    return sorted(resolved)
