"""MTSamples and CMC-2007 from ../shared/data (real public text, not part of the repo)."""
from pathlib import Path

import pytest

from dpnotes.corpus import MTSAMPLES_DOCUMENT_TYPES, label_counts, load_corpus, read_cmc2007, read_mtsamples

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared/data"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="module")
def mtsamples():
    return read_mtsamples(shared_file("mtsamples.csv"))


def test_mtsamples_one_note_per_distinct_text_with_specialty_sets(mtsamples):
    assert abs(len(mtsamples) - 2376) <= 10
    assert len({n.id for n in mtsamples}) == len(mtsamples)
    assert all(n.patient_id == n.id and n.codes == sorted(set(n.codes)) and n.codes for n in mtsamples)
    assert len(label_counts(mtsamples)) == 40
    assert any(len(n.codes) > 1 for n in mtsamples)


def test_mtsamples_ids_are_stable_and_load_corpus_detects_the_file(mtsamples):
    path = shared_file("mtsamples.csv")
    assert [n.id for n in load_corpus(path)] == [n.id for n in mtsamples]
    assert len(load_corpus(f"mtsamples:{path}")) == len(mtsamples)


def test_mtsamples_label_options():
    path = shared_file("mtsamples.csv")
    specialties = read_mtsamples(path, exclude_document_types=True)
    labels = label_counts(specialties)
    assert len(labels) == 40 - len(MTSAMPLES_DOCUMENT_TYPES) and not set(labels) & MTSAMPLES_DOCUMENT_TYPES
    top = read_mtsamples(path, exclude_document_types=True, top_k_labels=10)
    assert len(label_counts(top)) == 10 and len(top) < len(specialties)
    assert set(label_counts(top)) == {label for label, _ in labels.most_common(10)}


def test_cmc2007_has_978_documents_and_45_codes():
    path = shared_file("cmc2007_radiology_icd9.xml")
    notes = read_cmc2007(path)
    assert len(notes) == 978 and len(label_counts(notes)) == 45
    assert all(n.text.startswith("Clinical history: ") and "\nImpression: " in n.text for n in notes)
    assert notes[0].id == notes[0].patient_id == "97636670" and notes[0].codes == ["786.2"]
    assert load_corpus(path) == notes
