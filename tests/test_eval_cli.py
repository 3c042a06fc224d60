"""The eval CLI end to end on tiny inputs: JSON written, tables printed, bad input → exit 2."""
import json

import pytest

from dpnotes.corpus import generate_default_corpus, write_notes
from dpnotes.evaluation.cli import keep_top_labels, main, parse_options


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    real = generate_default_corpus(n_patients=60, canaries=3, seed=1)
    synthetic = generate_default_corpus(n_patients=20, seed=2)
    paths = {"real": root / "real.jsonl", "synthetic": root / "synthetic.jsonl", "empty": root / "empty.jsonl"}
    write_notes(real, paths["real"])
    write_notes(synthetic, paths["synthetic"])
    paths["empty"].write_text("")
    return root, paths


def test_coders_tfidf_writes_json(files, capsys):
    root, paths = files
    out = root / "coders.json"
    code = main(["coders", "--corpus", str(paths["real"]), "--synthetic", str(paths["synthetic"]), "--bootstrap", "20",
                 "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"real", "synthetic", "real+synthetic"}
    assert len(result["results"]["real"]["ci"]["micro_f1"]) == 2
    assert "micro-F1" in capsys.readouterr().out


def test_privacy_verbatim_and_audit(files, capsys):
    root, paths = files
    out = root / "privacy.json"
    code = main(["privacy", "--synthetic", str(paths["synthetic"]), "--train-notes", str(paths["real"]),
                 "--guesses", "100,100,100", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["verbatim"]["canaries"]["n"] == 3 and result["verbatim"]["canaries"]["full_in_output"] == 0
    assert result["one_run_audit"]["epsilon_lower_bound"] > 1
    assert "LCS" in capsys.readouterr().out


def test_fidelity_without_embeddings(files):
    root, paths = files
    out = root / "fidelity.json"
    assert main(["fidelity", "--real", str(paths["real"]), "--synthetic", str(paths["synthetic"]), "--no-embeddings",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["codes"]["total_variation"] <= 1 and result["text"]["real"]["n_notes"] >= 60


@pytest.mark.parametrize("argv, message", [
    (["coders", "--corpus", "/nonexistent/notes.jsonl"], "file not found"),
    (["fidelity", "--real", "{real}", "--synthetic", "{empty}", "--no-embeddings"], "no notes"),
    (["coders", "--train", "{real}", "--dev", "{real}"], "go together"),
    (["privacy"], "nothing to do"),
    (["privacy", "--guesses", "1,2"], "m,r,v"),
    (["coders", "--corpus", "{real}", "--train-sets", "synthetic"], "no --synthetic"),
    (["coders", "--corpus", "default", "--option", "bogus=1"], "bad reader option"),
])
def test_bad_input_exits_2_with_a_message(files, capsys, argv, message):
    _, paths = files
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_no_common_labels(files, tmp_path, capsys):
    from dpnotes.corpus import Note

    train = [Note(f"a{i}", f"a{i}", "text one", ["A"]) for i in range(3)]
    test = [Note(f"b{i}", f"b{i}", "text two", ["B"]) for i in range(3)]
    for name, notes in (("train", train), ("dev", train), ("test", test)):
        write_notes(notes, tmp_path / f"{name}.jsonl")
    argv = ["coders"] + [x for name in ("train", "dev", "test") for x in (f"--{name}", str(tmp_path / f"{name}.jsonl"))]
    assert main(argv) == 2 and "no labels in common" in capsys.readouterr().err


def test_helpers():
    assert parse_options(["top-k-labels=10", "exclude_document_types=true", "x=0.5", "name=a"]) == {
        "top_k_labels": 10, "exclude_document_types": True, "x": 0.5, "name": "a"}
    notes = generate_default_corpus(n_patients=30, seed=0)
    kept = keep_top_labels(notes, 2)
    assert len({c for n in kept for c in n.codes}) == 2 and all(n.codes for n in kept)


def test_dp_classifier_needs_a_public_label_space(files, capsys):
    """Labels taken from the private training notes would be released outside the guarantee."""
    _, paths = files
    code = main(["dp-classifier", "--corpus", str(paths["real"]), "--epsilons", "1"])
    assert code == 2
    error = capsys.readouterr().err
    assert "no public label space" in error and error.count("\n") == 1
