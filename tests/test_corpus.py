"""Corpus layer: schema validation, schema files, MIMIC readers, load_corpus and patient splits."""
import json

import pandas as pd
import pytest

from dpnotes.corpus import (
    CorpusError,
    Note,
    generate_default_corpus,
    label_counts,
    load_corpus,
    read_mimic3,
    read_mimic4,
    read_notes,
    split_by_patient,
    validate_notes,
    write_notes,
)


def sample_notes() -> list[Note]:
    return [
        Note("n1", "p1", "Chest pain, ruled out MI.", ["I10", "E78.5"], {"hadm_id": "7"}),
        Note("n2", "p1", "Follow-up; BP \"controlled\".\nNA", ["I10"]),
        Note("n3", "p2", "Cough and fever.", []),
    ]


# --- schema -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "broken, problem",
    [
        (Note("n2", "p1", "   ", ["I10"]), "empty text"),
        (Note("", "p1", "text", ["I10"]), "empty id"),
        (Note("n2", "", "text", ["I10"]), "empty patient_id"),
        (Note("n2", "p1", "text", ["I10", ""]), "malformed code"),
        (Note("n2", "p1", "text", "I10"), "codes must be a list"),
        (Note("n1", "p1", "text", ["I10"]), "duplicate id 'n1' (first at row 1)"),
    ],
)
def test_validate_notes_names_source_row_and_problem(broken, problem):
    notes = [Note("n1", "p1", "fine", ["I10"]), broken]
    with pytest.raises(CorpusError) as error:
        validate_notes(notes, "notes.csv")
    assert str(error.value).startswith("notes.csv row 2: ")
    assert problem in str(error.value)


def test_validate_notes_rejects_unknown_codes_and_never_echoes_text():
    notes = [Note("n1", "p1", "SECRET-PHI text", ["I10", "Z99.9"])]
    with pytest.raises(CorpusError, match=r"notes.jsonl row 1: unknown code\(s\) Z99.9") as error:
        validate_notes(notes, "notes.jsonl", known_codes={"I10"})
    assert "SECRET-PHI" not in str(error.value)
    validate_notes(notes, "notes.jsonl", known_codes={"I10", "Z99.9"})


# --- schema files -----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_write_then_read_round_trips(tmp_path, suffix):
    notes = sample_notes()
    path = write_notes(notes, tmp_path / f"notes{suffix}")
    assert read_notes(path) == notes
    assert load_corpus(path) == notes


def test_csv_accepts_semicolon_codes_and_integer_ids(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text('id,patient_id,text,codes\n1,10,"Text one",I10; E11.9\n2,10,Text two,\n')
    notes = read_notes(path)
    assert [n.id for n in notes] == ["1", "2"] and notes[0].patient_id == "10"
    assert notes[0].codes == ["I10", "E11.9"] and notes[1].codes == []


def test_csv_missing_column_names_column_and_file(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("id,patient_id,text\n1,10,Text\n")
    with pytest.raises(CorpusError, match=r"notes.csv: missing column\(s\) 'codes'"):
        read_notes(path)


def test_csv_empty_text_and_malformed_codes_name_the_row(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text('id,patient_id,text,codes\n1,10,Text,I10\n2,10,  ,I10\n')
    with pytest.raises(CorpusError, match=r"notes.csv row 2: empty text"):
        read_notes(path)
    path.write_text('id,patient_id,text,codes\n1,10,Text,I10\n2,10,Text,"[""I10"", 3]"\n3,1,T,"[oops"\n')
    with pytest.raises(CorpusError, match=r"notes.csv row 2: malformed code 3"):
        read_notes(path)
    path.write_text('id,patient_id,text,codes\n1,10,Text,I10;;E11.9\n')
    with pytest.raises(CorpusError, match=r"notes.csv row 1: malformed code"):
        read_notes(path)


def test_jsonl_errors_name_the_row(tmp_path):
    path = tmp_path / "notes.jsonl"
    good = json.dumps({"id": "a", "patient_id": "p", "text": "t", "codes": ["I10"]})
    path.write_text(good + "\n" + json.dumps({"id": "b", "patient_id": "p", "text": "t"}) + "\n")
    with pytest.raises(CorpusError, match=r"notes.jsonl row 2: missing field 'codes'"):
        read_notes(path)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(CorpusError, match=r"notes.jsonl row 2: invalid JSON"):
        read_notes(path)
    path.write_text(json.dumps({"id": "b", "patient_id": "p", "text": "t", "codes": "I10"}) + "\n")
    with pytest.raises(CorpusError, match=r"notes.jsonl row 1: codes must be a list"):
        read_notes(path)


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "notes.parquet"
    pd.DataFrame({"id": ["1"], "text": ["t"], "codes": [["I10"]]}).to_parquet(path)
    with pytest.raises(CorpusError, match=r"notes.parquet: missing column\(s\) 'patient_id'"):
        read_notes(path)


def test_load_corpus_errors_and_default(tmp_path):
    with pytest.raises(CorpusError, match="nowhere.jsonl: file not found"):
        load_corpus(tmp_path / "nowhere.jsonl")
    with pytest.raises(CorpusError, match="file not found"):
        load_corpus(f"mtsamples:{tmp_path / 'mtsamples.csv'}")
    with pytest.raises(CorpusError, match="directory not found"):
        load_corpus(f"mimic3:{tmp_path / 'mimic'}")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CorpusError, match="unknown corpus"):
        load_corpus(tmp_path / "notes.txt")
    assert load_corpus("default", n_patients=5) == generate_default_corpus(5)


# --- MIMIC ------------------------------------------------------------------------------------

def write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def mimic3_files(directory):
    notes = write_csv(directory / "NOTEEVENTS.csv", {
        "ROW_ID": [1, 2, 3, 4, 5, 6],
        "SUBJECT_ID": [10, 10, 20, 30, 40, 50],
        "HADM_ID": [100, 101, 200, 300, 400, None],
        "CATEGORY": ["Discharge summary", "Discharge summary", "Discharge summary", "Radiology",
                     "Discharge summary", "Discharge summary"],
        "ISERROR": [None, None, None, None, 1, None],
        "TEXT": ["Admission one.", "Admission two.", "Only rare codes.", "CXR.", "Erroneous.", "No admission."],
    })
    diagnoses = write_csv(directory / "DIAGNOSES_ICD.csv", {
        "ROW_ID": range(1, 9),
        "SUBJECT_ID": [10, 10, 10, 10, 20, 30, 30, 40],
        "HADM_ID": [100, 100, 101, 101, 200, 300, 300, 400],
        "SEQ_NUM": [1, 2, 1, 2, 1, 1, 2, 1],
        "ICD9_CODE": ["4019", "25000", "4019", "25000", "9999", "4019", "25000", "4019"],
    })
    return notes, diagnoses


def test_read_mimic3_joins_discharge_summaries_with_top_k_codes(tmp_path):
    notes = read_mimic3(*mimic3_files(tmp_path), top_k=2)
    # Radiology, ISERROR and admission-less notes are out; note 3 has only a rare code, so it goes too.
    assert [(n.id, n.patient_id, n.codes) for n in notes] == [
        ("1", "10", ["25000", "4019"]),
        ("2", "10", ["25000", "4019"]),
    ]
    assert notes[0].metadata == {"hadm_id": "100"}
    assert [n.id for n in read_mimic3(*mimic3_files(tmp_path), top_k=None)] == ["1", "2", "3"]
    # 4019 and 25000 tie at two admissions: ties go to the smaller code string.
    assert [n.codes for n in load_corpus(f"mimic3:{tmp_path}", top_k=1)] == [["25000"], ["25000"]]


def test_read_mimic3_missing_column(tmp_path):
    notes, diagnoses = mimic3_files(tmp_path)
    write_csv(diagnoses, {"HADM_ID": [100], "ICD_CODE": ["4019"]})
    with pytest.raises(CorpusError, match=r"DIAGNOSES_ICD.csv: missing column\(s\) 'ICD9_CODE'"):
        read_mimic3(notes, diagnoses)


def mimic4_files(directory):
    (directory / "note").mkdir()
    (directory / "hosp").mkdir()
    discharge = write_csv(directory / "note" / "discharge.csv", {
        "note_id": ["10-DS-1", "20-DS-1", "30-DS-1"],
        "subject_id": [10, 20, 30],
        "hadm_id": [100, 200, 300],
        "note_type": ["DS"] * 3,
        "note_seq": [1, 1, 1],
        "text": ["Ten.", "Twenty.", "Thirty."],
    })
    diagnoses = write_csv(directory / "hosp" / "diagnoses_icd.csv", {
        "subject_id": [10, 10, 20, 20, 30],
        "hadm_id": [100, 100, 200, 200, 300],
        "seq_num": [1, 2, 1, 2, 1],
        "icd_code": ["I10", "E119", "I10", "E849", "E849"],
        "icd_version": [10, 10, 10, 10, 9],
    })
    return discharge, diagnoses


def test_read_mimic4_prefixes_versions_only_when_both_appear(tmp_path):
    discharge, diagnoses = mimic4_files(tmp_path)
    notes = read_mimic4(discharge, diagnoses, top_k=None)
    assert [(n.id, n.patient_id, n.codes) for n in notes] == [
        ("10-DS-1", "10", ["icd10:E119", "icd10:I10"]),
        ("20-DS-1", "20", ["icd10:E849", "icd10:I10"]),
        ("30-DS-1", "30", ["icd9:E849"]),
    ]
    ten_only = read_mimic4(discharge, diagnoses, top_k=1, icd_version=10)
    assert [(n.id, n.codes) for n in ten_only] == [("10-DS-1", ["I10"]), ("20-DS-1", ["I10"])]
    assert load_corpus(f"mimic4:{tmp_path}", top_k=None) == notes


# --- splits -----------------------------------------------------------------------------------

def test_split_by_patient_keeps_patients_together_and_is_deterministic():
    notes = generate_default_corpus(n_patients=300, seed=1)
    splits = split_by_patient(notes, seed=3)
    assert set(splits) == {"train", "dev", "test"}
    patients = {name: {n.patient_id for n in split} for name, split in splits.items()}
    ids = {name: {n.id for n in split} for name, split in splits.items()}
    for a, b in [("train", "dev"), ("train", "test"), ("dev", "test")]:
        assert not patients[a] & patients[b] and not ids[a] & ids[b]
    assert sum(len(split) for split in splits.values()) == len(notes)
    assert [len(patients[name]) for name in ("train", "dev", "test")] == [240, 30, 30]
    assert split_by_patient(list(reversed(notes)), seed=3)["test"] == list(reversed(splits["test"]))
    assert split_by_patient(notes, seed=3) == splits
    assert split_by_patient(notes, seed=4)["test"] != splits["test"]
    with pytest.raises(ValueError):
        split_by_patient(notes, fractions=(0.8, 0.3, 0.1))


def test_label_counts_counts_notes_per_code():
    assert label_counts(sample_notes()) == {"I10": 2, "E78.5": 1}
