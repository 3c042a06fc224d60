"""The embedded synthetic default corpus."""
import time
import warnings

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import MultiLabelBinarizer

from dpnotes.corpus import canary_secrets, generate_default_corpus, read_notes, split_by_patient, validate_notes
from dpnotes.corpus.default_code_bank import CODE_BANK
from dpnotes.corpus.synthetic_default import main


def test_deterministic_valid_and_fast():
    start = time.perf_counter()
    notes = generate_default_corpus(n_patients=1000, seed=7)
    assert time.perf_counter() - start < 1.0
    assert notes == generate_default_corpus(n_patients=1000, seed=7)
    assert notes != generate_default_corpus(n_patients=1000, seed=8)
    validate_notes(notes, "default", known_codes={p.code for p in CODE_BANK})
    assert len({n.patient_id for n in notes}) == 1000
    assert all(1 <= len(n.codes) <= 3 for n in notes)
    words = [len(n.text.split()) for n in notes]
    assert min(words) >= 75 and max(words) <= 210


def test_codes_and_descriptions_are_official_icd10cm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package loads its data via a deprecated API
        import simple_icd_10_cm as cm
    for profile in CODE_BANK:
        assert cm.is_valid_item(profile.code) and cm.is_leaf(profile.code), profile.code
        assert cm.get_description(profile.code) == profile.description


def test_text_depends_on_codes():
    notes = generate_default_corpus(n_patients=1000, seed=0)
    splits = split_by_patient(notes, fractions=(0.8, 0.0, 0.2), seed=0)
    train, test = splits["train"], splits["test"]
    binarizer = MultiLabelBinarizer().fit([n.codes for n in notes])
    vectorizer = TfidfVectorizer(sublinear_tf=True)
    coder = OneVsRestClassifier(LogisticRegression(C=10, max_iter=1000))
    coder.fit(vectorizer.fit_transform([n.text for n in train]), binarizer.transform([n.codes for n in train]))
    predicted = coder.predict(vectorizer.transform([n.text for n in test]))
    assert f1_score(binarizer.transform([n.codes for n in test]), predicted, average="micro") > 0.6


def test_canaries_each_planted_exactly_once():
    notes = generate_default_corpus(n_patients=200, canaries=5, seed=3)
    secrets = canary_secrets(notes)
    assert len(secrets) == len(set(secrets)) == 5
    for secret in secrets:
        assert sum(n.text.count(secret) for n in notes) == 1
    carriers = [n for n in notes if n.metadata]
    assert len({n.patient_id for n in carriers}) == 5 and all(n.metadata["canary"] in n.text for n in carriers)
    assert canary_secrets(generate_default_corpus(n_patients=200, seed=3)) == []


def test_cli_writes_a_readable_corpus(tmp_path, capsys):
    out = tmp_path / "corpus.jsonl"
    main(["--out", str(out), "--patients", "20", "--canaries", "2"])
    notes = read_notes(out)
    assert notes == generate_default_corpus(n_patients=20, canaries=2)
    assert len(canary_secrets(notes)) == 2
    assert "Patient name" not in capsys.readouterr().out


def test_canary_patients_are_independent_of_the_patient_split():
    for seed in range(3):
        notes = generate_default_corpus(n_patients=200, canaries=50, seed=seed)
        in_train = len(canary_secrets(split_by_patient(notes, seed=seed)["train"]))
        assert 28 <= in_train <= 48  # about 80 % of 50
