"""Privacy measures: exposure and MIA mechanics on a tiny LLaMA, leakage and the one-run audit."""
import math
import random

import numpy as np
import pytest
import torch
from scipy.stats import binom
from sklearn.metrics import roc_auc_score
from transformers import PreTrainedTokenizerFast

from dpnotes.corpus import Note
from dpnotes.evaluation.leakage import (
    SuffixAutomaton,
    canary_contexts,
    canary_exposure,
    canary_leakage,
    digit_candidates,
    exposure_from_scores,
    membership_inference,
    nll_after_context,
    note_losses,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    sequence_nll,
    verbatim_leakage,
    words,
)
from dpnotes.prompting import prompt_format_for
from dpnotes.testing.tiny_models import tiny_llama

CANARY = "Patient name: Orla Quenby, MRN 48213907"


def prompt_of(codes):  # the plain (no chat template) training prompt of the default corpus
    return prompt_format_for("default").render(codes)


TEXTS = [
    "Codes: J18.9; I21.4; S93.4; N39.0 Note: DISCHARGE SUMMARY Patient name: Orla Quenby, MRN",
    "Chief complaint: cough chest pain radiating to the left arm swollen ankle after a fall fever and dysuria for two days",
    "history plan rest and fluids today",
]



@pytest.fixture(scope="module")
def tokenizer():
    """A small word-level HF tokenizer (digits split one by one): keeps the tiny LM fast."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[PAD]", "[UNK]", "[BOS]"]
    vocab = specials + list("0123456789") + sorted({w for t in TEXTS for w in pre_tokenizers.Whitespace().pre_tokenize_str(t)
                                                    for w in [w[0]] if not w.isdigit()})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")


@pytest.fixture(scope="module")
def memorised(tokenizer):
    """A tiny LLaMA overfit on two notes (one holding the canary): (model, members, non-members)."""
    members = [Note("m0", "p0", f"DISCHARGE SUMMARY\n{CANARY}\nChief complaint: cough.", ["J18.9"], {"canary": CANARY}),
               Note("m1", "p1", "DISCHARGE SUMMARY\nChief complaint: chest pain radiating to the left arm.", ["I21.4"])]
    nonmembers = [Note("h0", "p2", "DISCHARGE SUMMARY\nChief complaint: swollen ankle after a fall.", ["S93.4"]),
                  Note("h1", "p3", "DISCHARGE SUMMARY\nChief complaint: fever and dysuria for two days.", ["N39.0"])]
    model = tiny_llama(vocab=len(tokenizer), hidden=32, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    texts = [prompt_of(n.codes) + n.text for n in members]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    for _ in range(60):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, members, nonmembers


def test_exposure_formula_by_hand():
    assert exposure_from_scores(1.0, [2.0, 3.0, 4.0]) == (1, 2.0)  # best of 4: log2(4) − log2(1)
    rank, exposure = exposure_from_scores(3.5, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert rank == 4 and exposure == pytest.approx(math.log2(8) - 2)
    assert exposure_from_scores(2.0, [2.0, 2.0, 1.0])[0] == 2  # 1 better; ties never lower exposure
    assert exposure_from_scores(5.0, [5.0] * 7) == (1, 3.0)  # all tied: as exposed as a memorised canary


def test_unexposed_canary_averages_log2_e_bits():
    """A canary the model knows nothing about is ranked uniformly among the N + 1 strings."""
    n = 1000
    scores = np.arange(n, dtype=float) + 0.5
    mean = np.mean([exposure_from_scores(float(rank), scores)[1] for rank in range(n + 1)])
    assert mean == pytest.approx(math.log2(math.e), abs=0.01)


def test_digit_candidates():
    candidates = digit_candidates(CANARY, 50, seed=1)
    assert candidates == digit_candidates(CANARY, 50, seed=1)
    assert len(set(candidates)) == 50 and CANARY not in candidates
    for c in candidates:
        assert c.startswith("Patient name: Orla Quenby, MRN ") and len(c) == len(CANARY) and c[-8] != "0"
    with pytest.raises(ValueError, match="only"):
        digit_candidates("code 7", 10)
    with pytest.raises(ValueError, match="no digits"):
        digit_candidates("no digits", 3)


def test_sequence_nll_matches_model_loss(tokenizer):
    model = tiny_llama(vocab=len(tokenizer), seed=1)
    texts, contexts = ["chest pain today", "fever"], ["history :", "plan : rest and fluids"]
    totals, counts = sequence_nll(model, tokenizer, texts, contexts, batch_size=1)
    for text, context, total, count in zip(texts, contexts, totals, counts):
        prefix = [tokenizer.bos_token_id] + tokenizer(context, add_special_tokens=False)["input_ids"]
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix + body])
        labels = torch.tensor([[-100] * len(prefix) + body])
        with torch.no_grad():
            mean = model(input_ids=ids, labels=labels).loss.item()
        assert count == len(body) and total == pytest.approx(mean * len(body), rel=1e-4)
    batched, _ = sequence_nll(model, tokenizer, texts, contexts, batch_size=2)  # padding does not change scores
    np.testing.assert_allclose(batched, totals, rtol=1e-4)


def test_cached_context_scores_equal_full_sequences(tokenizer):
    """Scoring texts after a shared context through its KV cache gives the full forward's NLL."""
    model = tiny_llama(vocab=len(tokenizer), seed=2)
    context = "patient john smith was seen today for a follow up visit . mrn"
    texts = ["1 2 3 4", "9 8 7", "5 5 5 5 5 1", "0"]
    full, _ = sequence_nll(model, tokenizer, texts, context, batch_size=3)
    cached = nll_after_context(model, tokenizer, texts, context, batch_size=3)
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)


def test_exposure_of_a_memorised_canary_is_maximal(memorised, tokenizer):
    model, members, _ = memorised
    canaries, contexts = canary_contexts(members, prompt_of)
    assert canaries == [CANARY] and contexts[0].endswith("DISCHARGE SUMMARY\n") and contexts[0].startswith(prompt_of(["J18.9"]))
    trained = canary_exposure(model, tokenizer, canaries, contexts, n_candidates=63)
    assert trained["per_canary"][0]["rank"] == 1 and trained["max_exposure"] == pytest.approx(6.0)
    fresh = canary_exposure(tiny_llama(vocab=len(tokenizer), seed=0), tokenizer, canaries, contexts, n_candidates=63)
    assert fresh["max_exposure"] < trained["max_exposure"]


def test_membership_inference_on_memorised_notes(memorised, tokenizer):
    model, members, nonmembers = memorised
    mia = membership_inference(note_losses(model, tokenizer, members, prompt_of), note_losses(model, tokenizer, nonmembers, prompt_of))
    assert mia["auc"] == 1.0 and mia["mean_member_loss"] < mia["mean_nonmember_loss"]


def test_membership_inference_against_sklearn():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(1.0, 1, 300), rng.normal(1.5, 1, 300)
    out = membership_inference(members, nonmembers)
    labels = np.r_[np.ones(300), np.zeros(300)]
    assert out["auc"] == pytest.approx(roc_auc_score(labels, -np.r_[members, nonmembers]))
    # TPR at 1% FPR by hand: up to 3 of 300 non-members may be flagged, so every member with a
    # loss below the 4th-lowest non-member loss is caught.
    assert out["tpr_at_0.01_fpr"] == pytest.approx((members < np.sort(nonmembers)[3]).mean())
    with pytest.raises(ValueError):
        membership_inference([], [1.0])


def _brute_lcs(a, b):
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            k = 0
            while i + k < len(a) and j + k < len(b) and a[i + k] == b[j + k]:
                k += 1
            best = max(best, k)
    return best


def test_suffix_automaton_equals_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        docs = [[rng.choice("abc") for _ in range(rng.randint(1, 12))] for _ in range(3)]
        query = [rng.choice("abcd") for _ in range(rng.randint(0, 15))]
        assert SuffixAutomaton(docs).longest_match(query)[0] == max(_brute_lcs(query, d) for d in docs)
    # A match never spans two documents.
    assert SuffixAutomaton([["x", "y"], ["z"]]).longest_match(["y", "z"])[0] == 1


def test_verbatim_leakage_hand_example():
    train = ["the patient was admitted with chest pain and shortness of breath today", "MRN 48213907 noted"]
    synthetic = ["Yesterday the patient was admitted with chest pain and shortness of breath.", "nothing in common here"]
    out = verbatim_leakage(synthetic, train, n=4, canaries=["Patient name: Orla Quenby, MRN 48213907"])
    assert out["per_note"][0]["longest_common_substring_words"] == 11  # "the ... breath"
    grams = len(words(synthetic[0])) - 4 + 1  # 13 tokens (with ".") → 10 4-grams, 8 inside the 11-word match
    assert grams == 10 and out["per_note"][0]["4gram_overlap"] == pytest.approx(8 / 10)
    assert out["per_note"][1]["4gram_overlap"] == 0.0 and out["lcs_words"]["max"] == 11
    assert out["canaries"]["full_in_output"] == 0 and out["canaries"]["identifier_in_output"] == 0


def test_canary_leakage():
    rows = canary_leakage(["Seen today. patient  name: orla quenby, MRN 48213907.", "MRN 148213907"], [CANARY])
    assert rows[0]["full_in_output"] and rows[0]["identifier_hits"] == 1  # 148213907 is another number


def test_one_run_p_value_without_delta_is_the_binomial_tail():
    q = 1 / (1 + math.exp(-1.0))
    assert one_run_p_value(100, 50, 35, 1.0) == pytest.approx(binom.sf(34, 50, q))
    assert one_run_p_value(100, 50, 35, 1.0, delta=1e-5) > one_run_p_value(100, 50, 35, 1.0)
    assert one_run_p_value(100, 50, 35, 0.5) < one_run_p_value(100, 50, 35, 1.0)  # increasing in ε


def test_one_run_bound_all_correct_vs_random():
    # All of r correct with δ=0: the bound solves q^r = 0.05 exactly.
    for r in (20, 100, 1000):
        expected = math.log(0.05 ** (1 / r) / (1 - 0.05 ** (1 / r)))
        assert one_run_epsilon_lower_bound(r, r, r) == pytest.approx(expected, rel=1e-6)
    assert one_run_epsilon_lower_bound(1000, 1000, 1000) > 5
    assert one_run_epsilon_lower_bound(1000, 1000, 1000, delta=1e-5) < one_run_epsilon_lower_bound(1000, 1000, 1000)
    assert one_run_epsilon_lower_bound(1000, 1000, 500) == 0.0  # chance level
    assert one_run_epsilon_lower_bound(1000, 1000, 520) < 0.05
    rng = np.random.default_rng(0)
    inserted = rng.random(1000) < 0.5
    assert one_run_audit(rng.random(1000), inserted)["epsilon_lower_bound"] < 0.3  # random scores
    perfect = one_run_audit(inserted.astype(float) + 0.01 * rng.random(1000), inserted)
    assert perfect["epsilon_lower_bound"] > 3 and perfect["v"] == perfect["r"]
