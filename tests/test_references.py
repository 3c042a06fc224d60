"""The prompt-only reference: the synthetic notes' code sets written as their prompts (titles, key terms)."""
from dpnotes.corpus.schema import Note
from dpnotes.evaluation.references import prompt_only_coder, prompt_only_notes

TITLES = {"I10": "Essential (primary) hypertension", "E11.9": "Type 2 diabetes mellitus without complications"}


def test_prompt_only_notes_keep_codes_and_ids_and_write_only_titles():
    notes = [Note("syn-0", "syn-0", "a generated note", ["I10", "E11.9"]), Note("syn-1", "syn-1", "another", ["Z99"])]
    written = prompt_only_notes(notes, TITLES)
    assert [(n.id, n.codes) for n in written] == [("syn-0", ["I10", "E11.9"]), ("syn-1", ["Z99"])]
    assert written[0].text == "Essential (primary) hypertension; Type 2 diabetes mellitus without complications"
    assert written[1].text == "Z99"  # no title: the code stands for itself


def test_prompt_only_coder_is_scored_on_the_real_split():
    def real(i, codes, words):
        return Note(f"r{i}", f"p{i}", words, codes)

    hypertension, diabetes = "blood pressure hypertension lisinopril", "glucose diabetes metformin"
    splits = {split: [real(f"{split}{i}", ["I10"] if i % 2 else ["E11.9"], hypertension if i % 2 else diabetes)
                      for i in range(12)] for split in ("train", "dev", "test")}
    synthetic = [Note(f"s{i}", f"s{i}", "ignored", ["I10"] if i % 2 else ["E11.9"]) for i in range(10)]
    result = prompt_only_coder(synthetic, splits, TITLES, bootstrap=10)
    assert result["metrics"]["micro_f1"] > 0.9  # "hypertension" / "diabetes" are in both titles and real notes
    assert result["n_test"] == 12


def test_prompt_only_notes_add_the_runs_key_terms():
    notes = [Note("syn-0", "syn-0", "a generated note", ["I10", "E11.9"])]
    written = prompt_only_notes(notes, TITLES, {"I10": ["lisinopril"], "E11.9": ["metformin", "lisinopril"]})
    assert written[0].text.endswith("\nKey terms: lisinopril, metformin")
