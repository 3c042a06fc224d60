"""Public clinical corpora kept outside the repo (see ../shared/data/README.md): MTSamples and CMC-2007."""
from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pandas as pd

from dpnotes.corpus.schema import CorpusError, Note, require_file, validate_notes

# Values of medical_specialty that name a kind of document rather than a specialty.
MTSAMPLES_DOCUMENT_TYPES = frozenset({
    "SOAP / Chart / Progress Notes",
    "Discharge Summary",
    "Letters",
    "Office Notes",
    "Consult - History and Phy.",
    "Emergency Room Reports",
    "IME-QME-Work Comp etc.",
})
MTSAMPLES_COLUMNS = ("medical_specialty", "transcription")
CMC_TEXT_LABELS = {"CLINICAL_HISTORY": "Clinical history", "IMPRESSION": "Impression"}


def _normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def read_mtsamples(
    path: str | Path, top_k_labels: int | None = None, exclude_document_types: bool = False
) -> list[Note]:
    """MTSamples, one note per distinct transcription (whitespace-normalised).

    The site lists one report under several specialties, so codes = the sorted set of specialties
    of that text. MTSamples has no patients: each text is its own patient, and its id is a stable
    hash of the text. `exclude_document_types` drops the 7 document-type pseudo-specialties
    (`MTSAMPLES_DOCUMENT_TYPES`); `top_k_labels` keeps the most frequent labels (counted over
    distinct texts, ties by name). Notes left without a label are dropped.
    """
    path = require_file(path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [name for name in MTSAMPLES_COLUMNS if name not in frame.columns]
    if missing:
        raise CorpusError(str(path), f"missing column(s) {', '.join(map(repr, missing))}")
    texts: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    sample_ids: dict[str, list[str]] = {}
    for row in frame.itertuples(index=False):
        key = _normalise_whitespace(row.transcription)
        if not key:
            continue
        texts.setdefault(key, row.transcription.strip())
        label = row.medical_specialty.strip()
        if label and not (exclude_document_types and label in MTSAMPLES_DOCUMENT_TYPES):
            labels.setdefault(key, set()).add(label)
        if "sample_id" in frame.columns:
            sample_ids.setdefault(key, []).append(row.sample_id)
    if top_k_labels is not None:
        frequency = Counter(label for label_set in labels.values() for label in label_set)
        ranked = sorted(frequency.items(), key=lambda item: (-item[1], item[0]))
        kept = {label for label, _ in ranked[:top_k_labels]}
        labels = {key: label_set & kept for key, label_set in labels.items()}
    notes = []
    for key, text in texts.items():
        if not labels.get(key):
            continue
        note_id = "mts-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        notes.append(Note(note_id, note_id, text, sorted(labels[key]), {"sample_ids": sample_ids.get(key, [])}))
    validate_notes(notes, str(path))
    return notes


def read_cmc2007(path: str | Path) -> list[Note]:
    """CMC-2007 pediatric radiology reports with their majority-vote ICD-9-CM codes.

    Text = "Clinical history: ...\\nImpression: ..."; id = patient_id = the doc id (one report
    per patient as far as the release tells).
    """
    path = require_file(path)
    try:
        # A local, trusted file (the project's own data folder), so the stdlib parser is fine.
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise CorpusError(str(path), f"invalid XML ({error})") from None
    notes = []
    for doc in root.iter("doc"):
        doc_id = doc.get("id") or ""
        codes = sorted({(code.text or "").strip() for code in doc.findall("codes/code[@origin='CMC_MAJORITY']")})
        sections = [
            f"{CMC_TEXT_LABELS.get(text.get('type', ''), text.get('type', 'Text'))}: {(text.text or '').strip()}"
            for text in doc.findall("texts/text")
            if (text.text or "").strip()
        ]
        notes.append(Note(doc_id, doc_id, "\n".join(sections), codes, {"type": doc.get("type", "")}))
    validate_notes(notes, str(path))
    return notes
