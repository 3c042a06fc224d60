"""The corpus in Arrow: every reader's notes as one validated table, streamed (never a list of the
whole corpus), cached by fingerprint owner-only, split by patient like the notes, and shared by the
ranks of a launch."""
import json
import os
import socket
import subprocess
import time
import sys
from pathlib import Path

import pytest

import dpnotes.corpus.load as corpus_load
from dpnotes.corpus import (
    CorpusError,
    corpus_table,
    generate_default_corpus,
    load_configured_splits,
    load_split_tables,
    notes_of,
    read_notes,
    split_by_patient,
    write_notes,
)
from dpnotes.corpus.arrow import BATCH_NOTES, TABLE_FILE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def notes():
    notes = generate_default_corpus(n_patients=40, canaries=2, seed=3)
    notes[0].metadata["extra"] = {"nested": [1, 2]}  # metadata survives as a JSON object
    return notes


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_the_table_holds_the_notes_of_every_schema_file(notes, tmp_path, suffix):
    path = write_notes(notes, tmp_path / f"notes{suffix}")
    assert notes_of(corpus_table(str(path))) == read_notes(path) == notes
    cached = corpus_table(str(path), tmp_path / "cache")
    assert cached.cache_files  # memory-mapped from the cache, not held in memory
    assert notes_of(cached) == notes


def test_a_cached_corpus_is_not_read_again_and_is_owner_only(notes, tmp_path, monkeypatch):
    path = write_notes(notes, tmp_path / "notes.jsonl")
    first = notes_of(corpus_table(str(path), tmp_path / "cache"))
    (entry,) = (tmp_path / "cache").iterdir()
    assert all(p.stat().st_mode & 0o077 == 0 for p in [entry, *entry.rglob("*")])

    def unread(*args, **kwargs):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(corpus_load, "iter_corpus", unread)
    assert notes_of(corpus_table(str(path), tmp_path / "cache")) == first
    write_notes(notes[:-1], path)  # another file: another fingerprint, read again
    with pytest.raises(AssertionError, match="read again"):
        corpus_table(str(path), tmp_path / "cache")


def test_readers_stream(tmp_path, monkeypatch):
    """The table is written a batch at a time: the reader is never drained into a list first."""
    path = write_notes(generate_default_corpus(n_patients=int(1.5 * BATCH_NOTES), seed=1), tmp_path / "notes.jsonl")
    seen = []
    reader = corpus_load.iter_corpus

    def watched(*args, **kwargs):
        for note in reader(*args, **kwargs):
            seen.append(note.id)
            yield note

    written = []
    from datasets.arrow_writer import ArrowWriter
    write_batch = ArrowWriter.write_batch

    def record(self, batch, *args, **kwargs):
        written.append(len(seen))
        return write_batch(self, batch, *args, **kwargs)

    monkeypatch.setattr(corpus_load, "iter_corpus", watched)
    monkeypatch.setattr(ArrowWriter, "write_batch", record)
    corpus_table(str(path), tmp_path / "cache")
    assert written[0] <= BATCH_NOTES + 1 < len(seen)  # the first batch was written before the rest was read


@pytest.mark.parametrize("content, problem", [
    (b'{"id": "a", "patient_id": "p", "text": "t", "codes": ["X"]}\n{"id": "a", "patient_id": "q", "text": "u", "codes": ["X"]}\n',
     "row 2: duplicate id 'a' (first at row 1)"),
    (b'{"id": "a", "patient_id": "p", "text": "  ", "codes": ["X"]}\n', "row 1: empty text"),
    (b'\xff\xfe not text\n', "row 1: not UTF-8 text"),
    (b'', "no notes"),
])
def test_bad_input_is_one_error_and_leaves_no_cache_entry(tmp_path, content, problem):
    path = tmp_path / "notes.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        corpus_table(str(path), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no entry, and no staging folder left behind


def test_split_tables_equal_the_split_of_the_notes(tmp_path):
    tables = load_split_tables("default", default_patients=60, canaries=1, seed=4, cache=tmp_path)
    expected = split_by_patient(generate_default_corpus(n_patients=60, canaries=1, seed=4), seed=4)
    assert {name: notes_of(table) for name, table in tables.items()} == expected
    assert load_configured_splits("default", default_patients=60, canaries=1, seed=4) == expected
    assert not [p for p in tmp_path.rglob("cache-*.arrow")]  # the split is an index in memory, not a file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(tiny_model_dir, corpus: Path, cache: Path) -> list[dict]:
    env = {**os.environ, "DPNOTES_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
               "accelerate_configs/cpu_2proc.yaml", "--main_process_port", str(_free_port()),
               str(ROOT / "tests" / "data_ranks_entry.py"), f"model={tiny_model_dir}", f"corpus={corpus}",
               "max_length=64", "report_to=none", "output_dir=unused"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"rank"')),
                  key=lambda rank: rank["rank"])


def test_two_ranks_share_one_cache(tiny_model_dir, tmp_path):
    """One rank reads and tokenizes; the other waits and memory-maps the same files. A re-launch
    reads nothing."""
    corpus = write_notes(generate_default_corpus(n_patients=30, seed=0), tmp_path / "notes.parquet")
    cache = tmp_path / "cache"
    first = _launch_two_ranks(tiny_model_dir, corpus, cache)
    assert [rank["read_corpus"] for rank in first] == [1, 0]
    assert first[0]["files"] == first[1]["files"] and first[0]["first"] == first[1]["first"]
    assert all(Path(f).is_relative_to(cache / "tokenized") for f in first[0]["files"])
    again = _launch_two_ranks(tiny_model_dir, corpus, cache)
    assert [rank["read_corpus"] for rank in again] == [0, 0]
    assert again[0]["files"] == first[0]["files"]


def test_entries_unused_for_a_month_are_removed_when_another_is_stored(notes, tmp_path):
    old, recent = (write_notes(notes[:n], tmp_path / f"notes{n}.jsonl") for n in (5, 6))
    cache = tmp_path / "cache"
    corpus_table(str(old), cache)
    corpus_table(str(recent), cache)
    entries = {p.name for p in cache.iterdir()}
    month_ago = time.time() - 31 * 86_400
    for entry in cache.iterdir():
        os.utime(entry / TABLE_FILE, (month_ago, month_ago))
    corpus_table(str(recent), cache)  # a use refreshes its entry
    corpus_table(str(write_notes(notes[:7], tmp_path / "notes7.jsonl")), cache)  # a store prunes
    left = {p.name for p in cache.iterdir()}
    assert len(left) == 2 and len(entries & left) == 1
