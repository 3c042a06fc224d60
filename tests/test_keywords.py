"""The DP key-term release (dpnotes/privacy/keywords.py): one unit moves the counts by at most 1 in
L2, only public words are ever released, noise is the Gaussian mechanism's for (ε, δ), and a
training run releases once, records the cost and prompts with the terms."""
import itertools
import json
import math

import numpy as np
import pytest

from dpnotes.corpus import Note
from dpnotes.errors import UserError
from dpnotes.generation.conditioning import CodeSetDistribution
from dpnotes.generation.synthesize import compose
from dpnotes.privacy.accounting import calibrate_noise_multiplier
from dpnotes.privacy.keywords import (
    CodeKeywords,
    dp_code_keywords,
    key_counts,
    keyword_units,
    public_vocabulary,
    words_of,
)
from dpnotes.prompting import PromptFormat, keywords_line, prompt_format_from

VOCABULARY = frozenset({"insulin", "glucose", "wheeze", "inhaler", "cough", "discharge", "stable", "fever"})
LABELS = ["E11.9", "J45.909", "R50.9"]


def corpus(patients: int = 40) -> list[Note]:
    notes = []
    for i in range(patients):
        codes = [LABELS[i % 2]] + (["R50.9"] if i % 5 == 0 else [])
        text = ("Discharge stable. " + ("Insulin for glucose 240." if codes[0] == "E11.9" else "Wheeze, inhaler.")
                + (" Fever." if "R50.9" in codes else "") + " Zyxqor protocol.")
        notes.append(Note(f"n{i}", f"p{i // 2 if i % 3 == 0 else i}", text, codes))
    return notes


def test_one_unit_moves_the_counts_by_at_most_one_in_l2():
    notes = corpus()
    for unit in ("patient", "sequence"):
        units = keyword_units(notes, unit)
        full = key_counts(units, LABELS, sorted(VOCABULARY), max_codes=4)
        for left_out in range(len(units)):
            rest = key_counts(units[:left_out] + units[left_out + 1:], LABELS, sorted(VOCABULARY), max_codes=4)
            assert np.linalg.norm(full - rest) <= 1 + 1e-12


def test_a_patient_unit_holds_all_of_its_notes():
    notes = corpus()
    units = keyword_units(notes, "patient")
    assert len(units) == len({note.patient_id for note in notes})
    assert sum(len(codes) for codes, _ in units) == sum(len(note.codes) for note in notes)


def test_exact_release_ranks_each_codes_own_words_first():
    released = dp_code_keywords(keyword_units(corpus(), "sequence"), LABELS, VOCABULARY, math.inf, 1e-5,
                                privacy_unit="sequence", top_k=2)
    assert set(released.keywords["E11.9"]) == {"insulin", "glucose"}
    assert set(released.keywords["J45.909"]) == {"wheeze", "inhaler"}
    assert released.keywords["R50.9"][0] == "fever"
    assert released.noise_std == 0


def test_words_outside_the_public_vocabulary_are_never_released():
    for _ in range(3):
        released = dp_code_keywords(keyword_units(corpus(), "sequence"), LABELS, VOCABULARY, 0.5, 1e-5,
                                    privacy_unit="sequence", top_k=8)
        assert set(itertools.chain(*released.keywords.values())) <= VOCABULARY
    released = dp_code_keywords(keyword_units(corpus(), "sequence"), LABELS, VOCABULARY, math.inf, 1e-5,
                                privacy_unit="sequence", top_k=8)
    assert "zyxqor" not in set(itertools.chain(*released.keywords.values()))  # the notes' most common rare word


def test_noise_is_the_gaussian_mechanism_of_epsilon_delta_and_fresh_each_time():
    units = keyword_units(corpus(), "sequence")
    first, second = (dp_code_keywords(units, LABELS, VOCABULARY, 2.0, 1e-5, privacy_unit="sequence") for _ in range(2))
    assert first.noise_std == pytest.approx(calibrate_noise_multiplier(2.0, 1e-5, 1.0, 1, accountant="pld"))
    seeded = [dp_code_keywords(units, LABELS, VOCABULARY, 0.3, 1e-5, privacy_unit="sequence", top_k=8, seed=s).keywords
              for s in range(6)]
    assert len({json.dumps(k, sort_keys=True) for k in seeded}) > 1  # the noise moves the ranking


@pytest.mark.parametrize("epsilon, delta", [(0.0, 1e-5), (-1.0, 1e-5), (1.0, 0.0), (1.0, 1.0)])
def test_bad_budgets_are_refused(epsilon, delta):
    with pytest.raises(UserError):
        dp_code_keywords(keyword_units(corpus(), "sequence"), LABELS, VOCABULARY, epsilon, delta, privacy_unit="sequence")


def test_public_vocabulary_is_title_and_tokenizer_words():
    class Tokenizer:
        def get_vocab(self):
            return {"Ġmetformin": 1, "Ġthe": 2, "▁Wheezing": 3, "ing": 4, "Ġab-c": 5, "Ġx1": 6}

    vocabulary = public_vocabulary(Tokenizer())
    assert {"metformin", "wheezing", "hypertension", "pneumonia"} <= vocabulary  # tokens, ICD-10-CM and ICD-9-CM titles
    assert "the" not in vocabulary and "ing" not in vocabulary and "x1" not in vocabulary
    assert words_of("The patient's A1c rose; the") == {"patient", "a1c", "rose"}


def test_prompts_list_the_terms_of_their_codes_and_round_trip_through_the_report():
    prompt = PromptFormat("hospital discharge summary", "icd10cm").with_keywords(
        {"E11.9": ["insulin", "glucose"], "I10": ["lisinopril", "glucose"]})
    text = prompt.instruction(["E11.9", "I10"])
    assert text.endswith("\nKey terms: insulin, glucose, lisinopril")
    assert "Key terms" not in prompt.instruction(["J45.909"])
    assert prompt_format_from({"prompt_format": json.loads(json.dumps(prompt.to_dict()))}) == prompt
    assert keywords_line({"A": ["x"]}, ["B"]) == ""


def test_generation_adds_the_runs_key_terms_to_the_conditioning():
    training = {"epsilon": 8.0, "delta": 1e-5, "total_epsilon": 10.0, "total_delta": 2e-5, "privacy_unit": "patient"}
    conditioning = CodeSetDistribution({"I10": 3.0}, 1.0, 1e-5, "dp-marginals", privacy_unit="patient")
    assert compose(training, conditioning) == {"privacy_unit": "patient", "total_epsilon": 11.0,
                                               "total_delta": pytest.approx(3e-5)}
    old = {"epsilon": 8.0, "delta": 1e-5, "privacy_unit": "patient"}  # a report from before key terms
    assert compose(old, conditioning)["total_epsilon"] == 9.0


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_the_run_total_composes_weights_and_key_terms_through_each_accountant(name):
    """The key terms are one unsampled Gaussian step: each accountant composes it with the DP-SGD
    steps at the weights' δ, tighter than basic composition, and as dp_accounting's PLD does."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    from dpnotes.privacy.accounting import make_accountant
    from dpnotes.privacy.engine import PrivacyConfig
    from dpnotes.training.export import run_guarantee

    class Engine:  # what run_guarantee reads of a PrivacyEngine
        delta, noise_multiplier, sample_rate, steps_taken = 1e-5, 1.0, 0.02, 200
        config = PrivacyConfig(privacy_unit="patient")
        accountant = make_accountant(name)
        accountant.step(noise_multiplier, sample_rate, steps_taken)

        def epsilon(self):
            return self.accountant.epsilon(self.delta)

    engine = Engine()
    terms = CodeKeywords({}, 2.0, 1e-5, "patient", calibrate_noise_multiplier(2.0, 1e-5, 1.0, 1, "pld"), 3.0, 10, 6)
    epsilon, delta = run_guarantee(engine, terms)
    assert delta == engine.delta
    assert max(engine.epsilon(), 2.0) < epsilon < engine.epsilon() + 2.0
    independent = RdpAccountant() if name == "rdp" else PLDAccountant()  # PRV and PLD are both near-exact
    independent.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            engine.sample_rate, dp_accounting.GaussianDpEvent(engine.noise_multiplier)), engine.steps_taken),
        dp_accounting.GaussianDpEvent(terms.noise_std)]))
    assert epsilon == pytest.approx(independent.get_epsilon(delta), rel=0.02)
    assert run_guarantee(engine, None) == (engine.epsilon(), engine.delta)
    exact = CodeKeywords({}, math.inf, 1e-5, "patient", 0.0, 0.0, 10, 6)  # target ε = ∞: the exact ranking
    assert run_guarantee(engine, exact) == (math.inf, 2e-5)
    loose = CodeKeywords({}, 0.01, 1e-5, "patient", 0.5, 3.0, 10, 6)  # a mislabelled σ: basic composition is smaller
    assert run_guarantee(engine, loose) == (pytest.approx(engine.epsilon() + 0.01), 2e-5)
    with pytest.raises(ValueError, match="different units are never added"):
        run_guarantee(engine, CodeKeywords({}, 2.0, 1e-5, "sequence", terms.noise_std, 3.0, 10, 6))


def test_a_training_run_releases_once_records_the_cost_and_prompts_with_the_terms(tmp_path, tiny_model_dir, monkeypatch):
    from dpnotes.training import setup as training_setup
    from dpnotes.training.config import load_config
    from dpnotes.training.recipe import train

    releases = []
    release = training_setup.dp_code_keywords
    monkeypatch.setattr(training_setup, "dp_code_keywords", lambda *a, **k: releases.append(1) or release(*a, **k))
    out = tmp_path / "run"
    overrides = [f"model={tiny_model_dir}", f"output_dir={out}", "privacy.seed=5", "keywords_epsilon=2"]
    report = train(load_config("train/configs/tiny_test.yaml", overrides))
    released = CodeKeywords.load(out / "keywords.json")
    assert report["key_terms"]["epsilon"] == released.epsilon == 2.0
    # The accountant composes the key terms (one Gaussian step) with the DP-SGD steps at the weights'
    # δ: tighter than adding the two (ε, δ), and what an independent accountant (dp_accounting's RDP) gives.
    assert report["total_delta"] == report["delta"] < report["delta"] + released.delta
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    assert max(report["epsilon"], 2.0) < report["total_epsilon"] < report["epsilon"] + 2.0
    independent = RdpAccountant()
    independent.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            report["sample_rate"], dp_accounting.GaussianDpEvent(report["noise_multiplier"])), report["steps"]),
        dp_accounting.GaussianDpEvent(released.noise_std)]))
    assert report["total_epsilon"] == pytest.approx(independent.get_epsilon(report["total_delta"]), rel=0.05)
    assert report["prompt_format"]["keywords"] == released.keywords
    train(load_config("train/configs/tiny_test.yaml", overrides))  # finished run: resumes, releases nothing again
    assert releases == [1]
    with pytest.raises(ValueError, match="keywords_epsilon must be > 0"):
        train(load_config("train/configs/tiny_test.yaml", [*overrides[:1], f"output_dir={tmp_path / 'bad'}",
                                                           "keywords_epsilon=0"]))
