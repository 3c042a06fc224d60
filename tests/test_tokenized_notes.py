"""Notes tokenized once into Arrow: the same ids and labels as note-by-note tokenization, cached by
what determines them, reused without tokenizing again, owner-only on disk."""
import datasets
import pytest
from transformers import AutoTokenizer

from dpnotes.corpus import corpus_fingerprint, corpus_table, examples_by_patient, generate_default_corpus, split_by_patient, write_notes
from dpnotes.prompting import PromptFormat, prompt_format_for
from dpnotes.testing.reference_tokenization import tokenize_note_by_note
from dpnotes.prompting import IGNORE_INDEX
from dpnotes.tokenized_notes import load_tokenized, notes_digest, tokenization_key, tokenize_notes


@pytest.fixture(scope="module")
def demo_notes():
    """The demo's training notes (train/configs/demo_smollm2.yaml: 2,000 patients, split seed 0)."""
    return split_by_patient(generate_default_corpus(n_patients=2000, seed=0), seed=0)["train"]


@pytest.mark.parametrize("max_length", [160, 4096])
def test_ids_and_labels_equal_note_by_note_tokenization_on_the_demo_corpus(demo_notes, tiny_model_dir, max_length):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = prompt_format_for("default")
    data = tokenize_notes(demo_notes, tokenizer, max_length, prompt)
    assert len(data) == len(demo_notes)
    for index, expected in enumerate(tokenize_note_by_note(demo_notes, tokenizer, max_length, prompt)):
        assert data.example(index) == expected


def test_a_batch_collates_the_labels_of_its_examples(demo_notes, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = tokenize_notes(demo_notes[:20], tokenizer, 160, prompt_format_for("default"))
    batch = data.collate([3, 0, 7])
    for row, index in enumerate([3, 0, 7]):
        ids, labels = data.example(index)
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        assert batch["labels"][row].tolist() == labels + [IGNORE_INDEX] * (batch["labels"].shape[1] - len(ids))
        assert batch["attention_mask"][row].sum() == len(ids)


def test_patient_units_equal_the_corpus_grouping(demo_notes, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = tokenize_notes(demo_notes[:300], tokenizer, 160, prompt_format_for("default"))
    assert list(data.examples_of_patient) == examples_by_patient([n.patient_id for n in demo_notes[:300]])


def test_the_cache_is_reused_without_tokenizing_and_is_owner_only(demo_notes, tiny_model_dir, tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt, notes = prompt_format_for("default"), demo_notes[:200]
    first = tokenize_notes(notes, tokenizer, 160, prompt, cache=tmp_path)
    (entry,) = [p for p in tmp_path.iterdir()]
    assert entry.name == tokenization_key(notes_digest(notes), tokenizer, 160, prompt)
    assert all(path.stat().st_mode & 0o077 == 0 for path in [entry, *entry.rglob("*")])

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(datasets.Dataset, "map", no_tokenizing)
    again = tokenize_notes(notes, tokenizer, 160, prompt, cache=tmp_path)
    assert [again.example(i) for i in range(len(notes))] == [first.example(i) for i in range(len(notes))]
    assert list(again.examples_of_patient) == list(first.examples_of_patient)


def test_the_key_changes_with_what_the_tokens_depend_on(demo_notes, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    notes, prompt = demo_notes[:50], prompt_format_for("default")
    key = tokenization_key(notes_digest(notes), tokenizer, 160, prompt)
    assert tokenization_key(notes_digest(notes[:-1]), tokenizer, 160, prompt) != key
    assert tokenization_key(notes_digest(notes), tokenizer, 161, prompt) != key
    assert tokenization_key(notes_digest(notes), tokenizer, 160, PromptFormat("clinical note", "none")) != key
    edited = [notes[0].__class__(notes[0].id, notes[0].patient_id, notes[0].text + ".", notes[0].codes), *notes[1:]]
    assert tokenization_key(notes_digest(edited), tokenizer, 160, prompt) != key


def test_a_cached_corpus_is_not_read_again(demo_notes, tiny_model_dir, tmp_path):
    """A re-launch finds the tokens under the corpus's fingerprint and never reads a note."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    corpus = tmp_path / "notes.jsonl"
    write_notes(demo_notes[:100], corpus)
    source, prompt = corpus_fingerprint(str(corpus)), prompt_format_for("default")
    first = load_tokenized(source, lambda: corpus_table(str(corpus)), tokenizer, 160, prompt, tmp_path / "cache")

    def unread():
        raise AssertionError("the corpus was read again")

    again = load_tokenized(source, unread, tokenizer, 160, prompt, tmp_path / "cache")
    assert [again.example(i) for i in range(100)] == [first.example(i) for i in range(100)]
    write_notes(demo_notes[:99], corpus)  # the file changed: another fingerprint, read again
    assert corpus_fingerprint(str(corpus)) != source


def test_the_token_cap_keeps_each_patients_first_notes_that_fit(demo_notes, tiny_model_dir):
    """Brute force: walk each patient's notes in order, keep while the running total is ≤ the cap."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = tokenize_notes(demo_notes[:400], tokenizer, 160, prompt_format_for("default"))
    lengths = data.lengths()
    assert lengths.tolist() == [len(data.example(i)[0]) for i in range(len(data))]
    for cap in (160, 250, 400, 10_000):
        expected = []
        for unit in data.examples_of_patient:
            total, kept = 0, []
            for example in unit:
                total += lengths[example]
                if total > cap:
                    break
                kept.append(example)
            expected.append(kept)
        capped = data.examples_of_patient.capped(lengths, cap)
        assert list(capped) == expected and all(expected)
    assert sum(map(len, data.examples_of_patient.capped(lengths, 160))) < len(data)  # the cap did cut


def test_a_patients_cut_depends_on_that_patient_only(demo_notes, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = prompt_format_for("default")
    notes = demo_notes[:200]
    dropped = notes[0].patient_id
    neighbour = [n for n in notes if n.patient_id != dropped]

    def kept_ids(subset):
        data = tokenize_notes(subset, tokenizer, 160, prompt)
        return [[subset[i].id for i in unit] for unit in data.examples_of_patient.capped(data.lengths(), 250)]

    assert kept_ids(notes)[1:] == kept_ids(neighbour)
