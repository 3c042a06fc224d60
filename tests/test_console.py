"""The terminal: undecodable files are corpus errors, user errors print one line and exit 2,
--debug shows the traceback, third-party noise is off unless --verbose."""
import logging
import os
import warnings

import pytest

from dpnotes.console import EXIT_USER_ERROR, QUIET_ENVIRONMENT, command
from dpnotes.corpus import CorpusError, load_corpus, read_notes
from dpnotes.errors import UserError


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_binary_file_is_a_corpus_error_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00binary")
    with pytest.raises(CorpusError, match=f"notes{suffix}"):
        read_notes(path)


def test_an_undecodable_jsonl_line_names_its_row(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_bytes(b'{"id": "1", "patient_id": "p", "text": "ok", "codes": []}\n\xff\xfe\n')
    with pytest.raises(CorpusError, match="row 2: not UTF-8 text"):
        read_notes(path)


def test_a_binary_mtsamples_file_is_a_corpus_error(tmp_path):
    path = tmp_path / "mtsamples.csv"
    path.write_bytes(b"\xff\xfe\x00binary\x00\xff")
    with pytest.raises(CorpusError, match="mtsamples.csv"):
        load_corpus(path)


@command
def _fails(argv):
    raise UserError("settings.yaml row 3: epsilon must be > 0")


def test_a_user_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        _fails([])
    assert exit_.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: settings.yaml row 3: epsilon must be > 0\n"


def test_debug_shows_the_traceback():
    with pytest.raises(UserError):
        _fails(["--debug"])


def test_a_bug_keeps_its_traceback():
    @command
    def broken(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        broken([])


def test_third_party_noise_is_off_unless_verbose(monkeypatch):
    monkeypatch.delenv("DPNOTES_VERBOSE", raising=False)
    for name in QUIET_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    seen = {}

    @command
    def probe(argv):
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("third-party", FutureWarning)
        seen["warnings"] = len(caught)
        seen["logging"] = logging.getLogger("DeepSpeed").isEnabledFor(logging.INFO)
        seen["env"] = os.environ.get("TRANSFORMERS_VERBOSITY")

    with warnings.catch_warnings():
        try:
            probe([])
            quiet = dict(seen)
        finally:
            logging.disable(logging.NOTSET)
    assert quiet == {"warnings": 0, "logging": False, "env": "error"}
