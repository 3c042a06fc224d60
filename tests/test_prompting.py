"""The prompt format: public code titles, the chat template, one format for training and generation."""
import pytest
from transformers import AutoTokenizer

from dpnotes.corpus import generate_default_corpus
from dpnotes.corpus.code_lists import public_label_space
from dpnotes.prompting import PromptFormat, code_title, label_titles, prompt_format_for, prompt_format_from
from dpnotes.prompting import IGNORE_INDEX
from dpnotes.training.config import TrainConfig
from dpnotes.tokenized_notes import tokenize_notes


def test_titles_come_from_the_public_code_systems():
    assert code_title("icd10cm", "E11.9") == "Type 2 diabetes mellitus without complications (E11.9)"
    assert code_title("icd9cm", "786.2") == "Cough (786.2)"
    assert code_title("icd9cm", "96.04") == "96.04"  # a procedure code has no diagnosis title: shown bare
    assert code_title("icd", "I10") == "Essential (primary) hypertension (I10)"
    assert code_title("icd", "486") == "Pneumonia, organism unspecified (486)"
    assert code_title("specialty", "Ophthalmology") == "Ophthalmology (eyes: cataract, glaucoma, retina, visual acuity, intraocular lens)"
    assert code_title("specialty", "Toxicology") == "Toxicology"  # a specialty without a shipped scope: its name
    assert code_title("none", "I10") == "I10"


def test_label_titles_are_the_bare_public_titles_of_the_corpus_code_system():
    assert label_titles(["786.2", "96.04"], "cmc2007:x") == {"786.2": "Cough"}  # untitled codes are left out
    assert label_titles(["E11.9"], "default") == {"E11.9": "Type 2 diabetes mellitus without complications"}
    assert label_titles(["Urology"], "mtsamples:x")["Urology"].startswith("Urology (urinary tract")
    assert label_titles(["E11.9"], "notes.jsonl") == {}  # an unknown corpus kind has no code system


@pytest.mark.parametrize("corpus", ["default", "cmc2007", "mtsamples"])
def test_every_public_label_of_a_titled_corpus_has_a_title(corpus):
    system = prompt_format_for(corpus if corpus == "default" else f"{corpus}:x").code_system
    untitled = [code for code in public_label_space(None, corpus if corpus == "default" else f"{corpus}:x")
                if code_title(system, code) == code]
    assert untitled == []  # every mtsamples.com category has its scope


def test_a_change_of_titles_is_a_change_of_the_training_run(monkeypatch):
    import dpnotes.prompting as prompting

    config = TrainConfig(corpus="mtsamples:x")
    before, other = config.fingerprint(), TrainConfig(corpus="default").fingerprint()
    monkeypatch.setitem(prompting.TITLE_SOURCES, "specialty", ())
    assert config.fingerprint() != before  # the scopes table shapes every mtsamples prompt
    assert TrainConfig(corpus="default").fingerprint() == other


def test_corpus_kinds_pick_their_formats():
    assert prompt_format_for("default").code_system == "icd10cm"
    assert prompt_format_for("../shared/data/mtsamples.csv").code_system == "specialty"
    assert prompt_format_for("x/cmc2007_radiology_icd9.xml").code_system == "icd9cm"
    assert prompt_format_for("notes:my.jsonl") == PromptFormat()
    with pytest.raises(ValueError, match="code_system"):
        PromptFormat("note", "snomed")


def test_a_chat_model_is_prompted_in_its_template_and_a_plain_model_in_text(tiny_model_dir):
    fmt = prompt_format_for("default")
    plain = fmt.render(["I10", "E11.9"])
    assert plain == ("Write a hospital discharge summary.\nDiagnoses: Essential (primary) hypertension (I10); "
                     "Type 2 diabetes mellitus without complications (E11.9)\nNote:\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    chat = fmt.render(["I10"], tokenizer)
    assert chat.startswith("<system>") and "<user>Write a hospital discharge summary." in chat and chat.endswith("<assistant>")


def test_training_masks_the_prompt_and_learns_the_note_and_its_end(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    notes = generate_default_corpus(3, seed=0)
    fmt = prompt_format_for("default")
    data = tokenize_notes(notes, tokenizer, 10_000, fmt)
    for index, note in enumerate(notes):
        ids, labels = data.example(index)
        prompt = tokenizer(fmt.render(note.codes, tokenizer), add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt)] == prompt and all(label == IGNORE_INDEX for label in labels[: len(prompt)])
        assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == tokenizer.eos_token_id


def test_the_format_is_part_of_the_run_fingerprint_and_recorded_for_generation():
    default = TrainConfig(corpus="default")
    other = TrainConfig(corpus="default", prompt=PromptFormat("clinical note", "none"))
    assert default.fingerprint() != other.fingerprint() and default.prompt_format() == prompt_format_for("default")
    assert prompt_format_from({"prompt_format": other.prompt_format().to_dict()}) == other.prompt_format()
    with pytest.raises(ValueError, match="retrain"):
        prompt_format_from({"epsilon": 1.0})
