"""The eval CLI end to end on tiny inputs: JSON written, tables printed, bad input → exit 2."""
import json

import pytest

from dpnotes.corpus import generate_default_corpus, write_notes
from dpnotes.evaluation.cli import keep_top_labels, main


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
    main(["coders", f"corpus={paths['real']}", f"synthetic={paths['synthetic']}", "bootstrap=20", f"output_file={out}"])
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"real", "synthetic", "real+synthetic"}
    assert len(result["results"]["real"]["ci"]["micro_f1"]) == 2
    assert "micro-F1" in capsys.readouterr().out


def test_privacy_verbatim_and_audit(files, capsys):
    root, paths = files
    out = root / "privacy.json"
    main(["privacy", f"synthetic={paths['synthetic']}", f"train_notes={paths['real']}", "guesses=[100, 100, 100]",
          f"output_file={out}"])
    result = json.loads(out.read_text())
    assert result["verbatim"]["canaries"]["n"] == 3 and result["verbatim"]["canaries"]["full_in_output"] == 0
    assert result["one_run_audit"]["epsilon_lower_bound"] > 1
    assert "LCS" in capsys.readouterr().out


def test_fidelity_without_embeddings(files):
    root, paths = files
    out = root / "fidelity.json"
    main(["fidelity", f"real={paths['real']}", f"synthetic={paths['synthetic']}", "embeddings=false", f"output_file={out}"])
    result = json.loads(out.read_text())
    assert 0 <= result["codes"]["total_variation"] <= 1 and result["text"]["real"]["n_notes"] >= 60


def exit_status(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    return exit.value.code


@pytest.mark.parametrize("argv, message", [
    (["coders", "corpus=/nonexistent/notes.jsonl"], "file not found"),
    (["fidelity", "real={real}", "synthetic={empty}", "embeddings=false"], "no notes"),
    (["coders", "train={real}", "dev={real}"], "go together"),
    (["privacy"], "nothing to do"),
    (["privacy", "guesses=[1, 2]"], "[m, r, v]"),
    (["coders", "corpus={real}", "train_sets=[synthetic]"], "no synthetic notes"),
    (["coders", "corpus=default", "reader_options.bogus=1"], "bad reader option"),
    (["coders", "corpus=default", "lr=0.1"], "unknown key 'lr'; known: "),
    (["dp-classifier", "corpus=default", "epsilons=[1, -2]"], "must be > 0"),
    (["fidelity", "real={real}"], "missing key 'synthetic'"),
])
def test_bad_input_exits_2_with_a_message(files, capsys, argv, message):
    _, paths = files
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]
    assert exit_status(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_no_common_labels(files, tmp_path, capsys):
    from dpnotes.corpus import Note

    train = [Note(f"a{i}", f"a{i}", "text one", ["A"]) for i in range(3)]
    test = [Note(f"b{i}", f"b{i}", "text two", ["B"]) for i in range(3)]
    for name, notes in (("train", train), ("dev", train), ("test", test)):
        write_notes(notes, tmp_path / f"{name}.jsonl")
    argv = ["coders"] + [f"{name}={tmp_path / f'{name}.jsonl'}" for name in ("train", "dev", "test")]
    assert exit_status(argv) == 2 and "no labels in common" in capsys.readouterr().err


def test_keep_top_labels():
    notes = generate_default_corpus(n_patients=30, seed=0)
    kept = keep_top_labels(notes, 2)
    assert len({c for n in kept for c in n.codes}) == 2 and all(n.codes for n in kept)


def test_dp_classifier_needs_a_public_label_space(files, capsys):
    """Labels taken from the private training notes would be released outside the guarantee."""
    _, paths = files
    assert exit_status(["dp-classifier", f"corpus={paths['real']}", "epsilons=[1]"]) == 2
    error = capsys.readouterr().err
    assert "no public label space" in error and error.count("\n") == 1
