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
from dpnotes.corpus.mimic import dotted_icd9


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


def test_read_mimic3_joins_discharge_summaries_with_listed_codes(tmp_path):
    notes = read_mimic3(*mimic3_files(tmp_path))  # default: the public MIMIC-III top-50 list
    # Radiology, ISERROR and admission-less notes are out; note 3 has only 999.9, not on the list.
    assert [(n.id, n.patient_id, n.codes) for n in notes] == [
        ("1", "10", ["250.00", "401.9"]),
        ("2", "10", ["250.00", "401.9"]),
    ]
    assert notes[0].metadata == {"hadm_id": "100"}
    assert [n.id for n in read_mimic3(*mimic3_files(tmp_path), codes=None)] == ["1", "2", "3"]
    assert [n.codes for n in read_mimic3(*mimic3_files(tmp_path), codes="all")] == [
        ["250.00", "401.9"], ["250.00", "401.9"], ["999.9"]]
    assert [n.codes for n in load_corpus(f"mimic3:{tmp_path}", codes=["401.9"])] == [["401.9"], ["401.9"]]


def test_read_mimic3_missing_column(tmp_path):
    notes, diagnoses = mimic3_files(tmp_path)
    write_csv(diagnoses, {"HADM_ID": [100], "ICD_CODE": ["4019"]})
    with pytest.raises(CorpusError, match=r"DIAGNOSES_ICD.csv: missing column\(s\) 'ICD9_CODE'"):
        read_mimic3(notes, diagnoses)


# The diagnosis codes of the public top-50 list, undotted as MIMIC stores them.
TOP50_DIAGNOSES = [
    "4019", "4280", "42731", "41401", "5849", "25000", "2724", "51881", "5990", "53081", "2720",
    "2859", "2449", "486", "2851", "2762", "496", "99592", "V5861", "5070", "0389", "5859", "40390",
    "311", "3051", "412", "2875", "41071", "2761", "V4581", "4240", "V1582", "5119",
]


def mimic3_neighbours(directory, with_extra_patient):
    """50 patients, one admission and note each: 33 with one top-50 diagnosis, 17 with an
    off-list code (50 distinct codes, so a top-50 count over the corpus keeps them all). The extra
    patient has 3 admissions with a very frequent off-list code, 799.3."""
    codes = TOP50_DIAGNOSES + [f"{n:03d}0" for n in range(1, 18)]  # 001.0 ... 017.0: off the list
    patients = list(range(1, len(codes) + 1))
    admissions = [(patient, 1000 + patient, [code]) for patient, code in zip(patients, codes)]
    admissions.append((1, 5000, ["4019", "V5861"]))  # patient 1 has a second admission
    if with_extra_patient:
        admissions += [(999, 9990 + k, ["7993"]) for k in range(3)]
    directory.mkdir()
    write_csv(directory / "NOTEEVENTS.csv", {
        "ROW_ID": range(1, len(admissions) + 1),
        "SUBJECT_ID": [patient for patient, _, _ in admissions],
        "HADM_ID": [hadm for _, hadm, _ in admissions],
        "CATEGORY": ["Discharge summary"] * len(admissions),
        "TEXT": [f"Summary of admission {hadm}." for _, hadm, _ in admissions],
    })
    rows = [(patient, hadm, code) for patient, hadm, codes_ in admissions for code in codes_]
    write_csv(directory / "DIAGNOSES_ICD.csv", {
        "SUBJECT_ID": [patient for patient, _, _ in rows],
        "HADM_ID": [hadm for _, hadm, _ in rows],
        "ICD9_CODE": [code for _, _, code in rows],
    })
    return directory / "NOTEEVENTS.csv", directory / "DIAGNOSES_ICD.csv"


def test_read_mimic3_one_patient_does_not_change_other_patients_codes_or_notes(tmp_path):
    """The kept codes come from a fixed public list, not from counts over the (private) corpus:
    adding or removing one patient, even one with a very frequent code, changes nothing for the
    others. (A top-50 count over the corpus would push 799.3 in and patient 30's V45.81 out.)"""
    without = read_mimic3(*mimic3_neighbours(tmp_path / "without", with_extra_patient=False))
    with_extra = read_mimic3(*mimic3_neighbours(tmp_path / "with", with_extra_patient=True))
    assert [note for note in with_extra if note.patient_id != "999"] == without
    assert len(without) == 34  # the 33 list-code patients (patient 1 twice); off-list-only notes drop
    assert ("30", ["V45.81"]) in [(note.patient_id, note.codes) for note in with_extra]


def test_dotted_icd9_codes_the_caml_way():
    cases = {
        ("4019", False): "401.9", ("486", False): "486", ("25000", False): "250.00",
        ("E8497", False): "E849.7", ("E849", False): "E849", ("V5861", False): "V58.61",
        ("V1582", False): "V15.82", ("0389", False): "038.9", (" 401.9 ", False): "401.9",
        ("9604", False): "960.4", ("9604", True): "96.04", ("966", True): "96.6", ("3893", True): "38.93",
    }
    assert {key: dotted_icd9(*key) for key in cases} == cases


def mimic3_with_procedures(directory):
    notes = write_csv(directory / "NOTEEVENTS.csv", {
        "ROW_ID": [1, 2, 3],
        "SUBJECT_ID": [10, 20, 30],
        "HADM_ID": [100, 200, 300],
        "CATEGORY": ["Discharge summary"] * 3,
        "TEXT": ["Ventilated.", "Poisoned.", "Fall."],
    })
    write_csv(directory / "DIAGNOSES_ICD.csv", {
        "HADM_ID": [100, 200, 300, 300],
        "ICD9_CODE": ["4019", "9604", "E8497", "V5861"],
    })
    procedures = directory / "PROCEDURES_ICD.csv.gz"  # gzipped, as PhysioNet ships it
    pd.DataFrame({"ROW_ID": [1, 2], "HADM_ID": [100, 300], "ICD9_CODE": ["9604", "966"]}).to_csv(procedures, index=False)
    return notes, directory / "DIAGNOSES_ICD.csv", procedures


def test_read_mimic3_dots_diagnoses_and_procedures_apart(tmp_path):
    notes, diagnoses, procedures = mimic3_with_procedures(tmp_path)
    every = read_mimic3(notes, diagnoses, procedures, codes=None)
    # Diagnosis 960.4 (poisoning) and procedure 96.04 (intubation) are both `9604` in MIMIC.
    assert [(n.id, n.codes) for n in every] == [
        ("1", ["401.9", "96.04"]), ("2", ["960.4"]), ("3", ["96.6", "E849.7", "V58.61"])]
    assert load_corpus(f"mimic3:{tmp_path}", codes=None) == every  # PROCEDURES_ICD found in DIR
    # The public list has procedure 96.04, not diagnosis 960.4; without PROCEDURES_ICD no procedure.
    assert [(n.id, n.codes) for n in read_mimic3(notes, diagnoses, procedures)] == [
        ("1", ["401.9", "96.04"]), ("3", ["96.6", "V58.61"])]
    assert [(n.id, n.codes) for n in read_mimic3(notes, diagnoses)] == [("1", ["401.9"]), ("3", ["V58.61"])]


def test_mimic_user_code_list_file_and_sequence(tmp_path):
    notes, diagnoses, procedures = mimic3_with_procedures(tmp_path)
    code_file = tmp_path / "my_codes.txt"
    code_file.write_text("# my public list\n960.4\n\nE849.7  # place of injury\n")
    assert [(n.id, n.codes) for n in read_mimic3(notes, diagnoses, procedures, codes=code_file)] == [
        ("2", ["960.4"]), ("3", ["E849.7"])]
    assert load_corpus(f"mimic3:{tmp_path}", codes=str(code_file)) == read_mimic3(
        notes, diagnoses, procedures, codes=("960.4", "E849.7"))
    assert [(n.id, n.codes) for n in read_mimic3(notes, diagnoses, procedures, codes=["96.04"])] == [
        ("1", ["96.04"])]


def test_mimic_bad_code_list(tmp_path):
    notes, diagnoses = mimic3_files(tmp_path)
    with pytest.raises(CorpusError, match=r"nowhere_codes.txt: code list file not found"):
        read_mimic3(notes, diagnoses, codes=tmp_path / "nowhere_codes.txt")
    with pytest.raises(CorpusError, match=r"mimic3-top5: code list file not found"):
        load_corpus(f"mimic3:{tmp_path}", codes="mimic3-top5")
    (tmp_path / "empty_codes.txt").write_text("# nothing yet\n\n")
    with pytest.raises(CorpusError, match=r"empty_codes.txt: code list has no codes"):
        read_mimic3(notes, diagnoses, codes=tmp_path / "empty_codes.txt")
    with pytest.raises(CorpusError, match=r"^codes: code list is empty"):
        read_mimic3(notes, diagnoses, codes=[])
    with pytest.raises(CorpusError, match=r"^codes: code list has malformed code ''"):
        read_mimic3(notes, diagnoses, codes=["401.9", ""])
    discharge, diagnoses4 = mimic4_files(tmp_path)
    with pytest.raises(CorpusError, match=r"^codes: code list must be .* got int"):
        read_mimic4(discharge, diagnoses4, codes=50)


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


def test_read_mimic4_prefixes_versions_unless_one_is_chosen(tmp_path):
    discharge, diagnoses = mimic4_files(tmp_path)
    notes = read_mimic4(discharge, diagnoses)  # default: every code
    assert [(n.id, n.patient_id, n.codes) for n in notes] == [
        ("10-DS-1", "10", ["icd10:E119", "icd10:I10"]),
        ("20-DS-1", "20", ["icd10:E849", "icd10:I10"]),
        ("30-DS-1", "30", ["icd9:E849"]),
    ]
    ten_only = read_mimic4(discharge, diagnoses, codes=["I10"], icd_version=10)
    assert [(n.id, n.codes) for n in ten_only] == [("10-DS-1", ["I10"]), ("20-DS-1", ["I10"])]
    assert load_corpus(f"mimic4:{tmp_path}", codes=None) == notes
    assert [n.codes for n in load_corpus(f"mimic4:{tmp_path}", codes=["icd9:E849"])] == [["icd9:E849"]]
    # The prefix rule does not depend on the corpus: without the one ICD-9 patient, the others'
    # labels stay prefixed.
    write_csv(diagnoses, pd.read_csv(diagnoses).query("icd_version == 10").to_dict("list"))
    assert read_mimic4(discharge, diagnoses) == notes[:2]


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
