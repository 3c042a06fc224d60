"""Measured privacy of a fine-tuned LM and of its synthetic notes.

(a) Canary exposure (the "secret sharer", Carlini et al. 2019): the log-perplexity of each planted
    canary is ranked among N random candidates of the same format (same name, random MRN digits);
    exposure = log2(N + 1) − log2(rank), rank 1 = the canary is the most likely. Maximum
    log2(N + 1) when memorised; an unexposed canary's rank is uniform on 1..N+1, so its exposure
    averages log2(N + 1) − log2((N + 1)!)/(N + 1) → log2(e) ≈ 1.44 bits (Stirling).
(b) Loss-based membership inference (Yeom et al. 2018): per-note mean token loss of training
    members vs held-out non-members → ROC AUC and TPR at 1% FPR (lower loss ⇒ "member").
(c) Verbatim leakage of synthetic notes: longest common word substring with any training note,
    fraction of each synthetic note's word n-grams found in the training notes, and whether a
    planted canary (or its identifier number) appears in synthetic output.
(d) One-run audit (Steinke, Nasr, Jagielski 2023): m canaries inserted independently with prob.
    1/2, an auditor guesses in/out for r of them, v correct → a lower bound on ε at δ, at a chosen
    confidence, from the binomial tail of ε-DP randomised response plus the paper's δ term.
"""
from __future__ import annotations

import copy
import inspect
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

from dpnotes.corpus.schema import Note

CANARY_KEY = "canary"  # dpnotes.corpus.synthetic_default.CANARY_KEY


# ---------------------------------------------------------------------------------------------
# Scoring text under a causal LM
# ---------------------------------------------------------------------------------------------
def _start_ids(tokenizer) -> list[int]:
    for name in ("bos_token_id", "eos_token_id", "cls_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return [int(value)]
    return []


@torch.no_grad()
def sequence_nll(
    model,
    tokenizer,
    texts: Sequence[str],
    contexts: Sequence[str] | str | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Total NLL (nats) of each text's tokens given its context, and the number of scored tokens.

    ids = [start token] + context ids + text ids (context and text tokenized separately, no special
    tokens; the start token is bos, else eos, else cls, so the first text token is scored even
    without context). `max_length` truncates from the left, keeping the text's end.
    """
    if isinstance(contexts, str) or contexts is None:
        contexts = [contexts or ""] * len(texts)
    if len(contexts) != len(texts):
        raise ValueError(f"{len(contexts)} contexts for {len(texts)} texts")
    start = _start_ids(tokenizer)
    rows = []
    for text, context in zip(texts, contexts):
        prefix = start + (tokenizer(context, add_special_tokens=False)["input_ids"] if context else [])
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, scored = prefix + body, len(body)
        if max_length is not None and len(ids) > max_length:
            ids = ids[-max_length:]
            scored = min(scored, max_length - 1)
        rows.append((ids, scored))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals, counts = np.zeros(len(rows)), np.zeros(len(rows), dtype=int)
    try:
        for begin in range(0, len(rows), batch_size):
            chunk = rows[begin : begin + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for i, (row_ids, scored) in enumerate(chunk):
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                mask[i, : len(row_ids)] = 1
                if scored:
                    labels[i, len(row_ids) - scored : len(row_ids)] = torch.tensor(row_ids[len(row_ids) - scored :])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            target = labels[:, 1:].to(device)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none")
            nll = nll.view(target.shape)
            totals[begin : begin + len(chunk)] = nll.sum(1).cpu().numpy()
            counts[begin : begin + len(chunk)] = (target != -100).sum(1).cpu().numpy()
    finally:
        model.train(was_training)
    return totals, counts


@torch.no_grad()
def nll_after_context(model, tokenizer, texts: Sequence[str], context: str = "", batch_size: int = 64) -> np.ndarray:
    """Total NLL (nats) of each text after one shared context: `sequence_nll(model, tokenizer, texts,
    context)[0]`, with the context run once and its key/value cache reused for every text (scoring
    candidates after a long note prefix costs their own tokens only)."""
    prefix = _start_ids(tokenizer) + (tokenizer(context, add_special_tokens=False)["input_ids"] if context else [])
    bodies = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    if not prefix or not all(bodies):  # nothing to cache, or an empty text: the plain scorer
        return sequence_nll(model, tokenizer, texts, context, batch_size)[0]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        shared = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        # transformers renamed the cache argument and output `past_key_values` → `cache` (5.2x).
        cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        shared_cache = shared["cache"] if "cache" in shared else shared.past_key_values
        # The prefix's last position predicts every text's first token.
        first = F.log_softmax(shared.logits[0, -1].float(), dim=-1)
        totals = np.zeros(len(bodies))
        for begin in range(0, len(bodies), batch_size):
            chunk = bodies[begin : begin + batch_size]
            width = max(len(body) for body in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
            valid = torch.zeros((len(chunk), width), dtype=torch.bool, device=device)
            for i, body in enumerate(chunk):
                ids[i, : len(body)] = torch.tensor(body, device=device)
                valid[i, : len(body)] = True
            cache = copy.deepcopy(shared_cache)
            cache.batch_repeat_interleave(len(chunk))
            mask = torch.cat([torch.ones((len(chunk), len(prefix)), dtype=torch.long, device=device), valid.long()], dim=1)
            logits = model(input_ids=ids, attention_mask=mask, **{cache_keyword: cache}).logits.float()
            log_probs = torch.cat([first.expand(len(chunk), 1, -1), F.log_softmax(logits[:, :-1], dim=-1)], dim=1)
            token = log_probs.gather(2, ids.unsqueeze(-1)).squeeze(-1)
            totals[begin : begin + len(chunk)] = (-(token * valid)).sum(1).cpu().numpy()
    finally:
        model.train(was_training)
    return totals


# ---------------------------------------------------------------------------------------------
# (a) Canary exposure
# ---------------------------------------------------------------------------------------------
_DIGITS = re.compile(r"\d+")


def digit_candidates(secret: str, n: int, seed: int = 0) -> list[str]:
    """`n` distinct strings of the secret's format: every digit run replaced by random digits of
    the same length (no leading zero where the original had none); never the secret itself."""
    runs = list(_DIGITS.finditer(secret))
    if not runs:
        raise ValueError("secret has no digits to randomise")
    space = math.prod(10 ** len(m.group()) if m.group()[0] == "0" or len(m.group()) == 1 else 9 * 10 ** (len(m.group()) - 1)
                      for m in runs)
    if n >= space:
        raise ValueError(f"asked for {n} candidates but the format has only {space} values")
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        pieces, last = [], 0
        for m in runs:
            length = len(m.group())
            first = "0123456789" if m.group()[0] == "0" or length == 1 else "123456789"
            pieces += [secret[last : m.start()], rng.choice(first) + "".join(rng.choice("0123456789") for _ in range(length - 1))]
            last = m.end()
        candidate = "".join(pieces) + secret[last:]
        if candidate != secret:
            out.add(candidate)
    return sorted(out)


def exposure_from_scores(canary_score: float, candidate_scores: Sequence[float]) -> tuple[int, float]:
    """(rank, exposure) of a canary among candidates by log-perplexity (lower = more likely).

    rank = 1 + number of candidates strictly more likely; exposure = log2(N + 1) − log2(rank).
    Ties rank the canary first among its equals: a measure of leakage must not report less
    exposure because the model cannot tell candidates apart.
    """
    scores = np.asarray(candidate_scores, dtype=float)
    rank = 1 + int((scores < canary_score).sum())
    return rank, math.log2(len(scores) + 1) - math.log2(rank)


def canary_exposure(
    model,
    tokenizer,
    canaries: Sequence[str],
    contexts: Sequence[str] | None = None,
    n_candidates: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """Exposure of each canary against `n_candidates` digit-randomised candidates, all scored
    under the same context. Returns per-canary rank/exposure and summary statistics."""
    if not canaries:
        raise ValueError("no canaries to measure")
    contexts = list(contexts) if contexts is not None else [""] * len(canaries)
    rows = []
    for index, (canary, context) in enumerate(zip(canaries, contexts)):
        candidates = digit_candidates(canary, n_candidates, seed + index)
        nll = nll_after_context(model, tokenizer, [canary] + candidates, context, batch_size)
        log_perplexity = nll / math.log(2)  # bits
        rank, exposure = exposure_from_scores(log_perplexity[0], log_perplexity[1:])
        rows.append({"canary_index": index, "rank": rank, "exposure": exposure, "log_perplexity_bits": float(log_perplexity[0]),
                     "candidate_median_log_perplexity_bits": float(np.median(log_perplexity[1:]))})
    exposures = np.array([r["exposure"] for r in rows])
    return {
        "n_candidates": n_candidates, "max_possible_exposure": math.log2(n_candidates + 1),
        "mean_exposure": float(exposures.mean()), "max_exposure": float(exposures.max()),
        "n_rank_1": int(sum(r["rank"] == 1 for r in rows)), "per_canary": rows,
    }


PromptOf = Callable[[Sequence[str]], str]  # codes -> the training prompt (PromptFormat.render with the tokenizer)


def canary_contexts(notes: Sequence[Note], prompt_of: PromptOf | None = None) -> tuple[list[str], list[str]]:
    """(canaries, contexts) for notes with `metadata["canary"]`: the context is the note text before
    the canary line, preceded by the training prompt `prompt_of(codes)` when given."""
    canaries, contexts = [], []
    for note in notes:
        canary = note.metadata.get(CANARY_KEY)
        if not canary:
            continue
        position = note.text.find(canary)
        prefix = note.text[:position] if position >= 0 else ""
        canaries.append(canary)
        contexts.append((prompt_of(note.codes) if prompt_of else "") + prefix)
    return canaries, contexts


# ---------------------------------------------------------------------------------------------
# (b) Loss-based membership inference
# ---------------------------------------------------------------------------------------------
def note_losses(model, tokenizer, notes: Sequence[Note], prompt_of: PromptOf | None = None, batch_size: int = 8,
                max_length: int | None = 512) -> np.ndarray:
    """Mean token NLL of each note's text, given `prompt_of(codes)` (the training prompt) when given."""
    contexts = [prompt_of(n.codes) if prompt_of else "" for n in notes]
    totals, counts = sequence_nll(model, tokenizer, [n.text for n in notes], contexts, batch_size, max_length)
    return totals / np.maximum(counts, 1)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr_level: float = 0.01) -> float:
    """Highest TPR on the ROC curve at FPR <= fpr_level."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(tpr[fpr <= fpr_level].max())


def membership_inference(member_losses: Sequence[float], nonmember_losses: Sequence[float], fpr_level: float = 0.01) -> dict:
    """Loss-threshold attack: score = −loss. AUC, TPR at `fpr_level` FPR, and the balanced
    accuracy of the best threshold."""
    members, nonmembers = np.asarray(member_losses, float), np.asarray(nonmember_losses, float)
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("membership inference needs at least one member and one non-member")
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    scores = -np.r_[members, nonmembers]
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        f"tpr_at_{fpr_level:g}_fpr": tpr_at_fpr(labels, scores, fpr_level),
        "best_balanced_accuracy": float(((tpr + 1 - fpr) / 2).max()),
        "n_members": len(members), "n_nonmembers": len(nonmembers),
        "mean_member_loss": float(members.mean()), "mean_nonmember_loss": float(nonmembers.mean()),
    }


# ---------------------------------------------------------------------------------------------
# (c) Verbatim leakage
# ---------------------------------------------------------------------------------------------
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return _WORD.findall(text.lower())


class SuffixAutomaton:
    """Suffix automaton over several token sequences (separated by unique sentinels, so a match
    never spans two documents): `longest_match(seq)` = longest common substring with any of them."""

    def __init__(self, documents: Iterable[Sequence]):
        self.next: list[dict] = [{}]
        self.link, self.length = [-1], [0]
        self.last = 0
        for number, document in enumerate(documents):
            for token in document:
                self._extend(token)
            self._extend(("<sep>", number))

    def _extend(self, token) -> None:
        nxt, link, length = self.next, self.link, self.length
        current = len(length)
        nxt.append({}), link.append(-1), length.append(length[self.last] + 1)
        state = self.last
        while state != -1 and token not in nxt[state]:
            nxt[state][token] = current
            state = link[state]
        if state == -1:
            link[current] = 0
        else:
            target = nxt[state][token]
            if length[state] + 1 == length[target]:
                link[current] = target
            else:
                clone = len(length)
                nxt.append(dict(nxt[target])), link.append(link[target]), length.append(length[state] + 1)
                while state != -1 and nxt[state].get(token) == target:
                    nxt[state][token] = clone
                    state = link[state]
                link[target] = link[current] = clone
        self.last = current

    def longest_match(self, sequence: Sequence) -> tuple[int, int]:
        """(length, end position in `sequence`) of the longest substring found in the documents."""
        state = matched = best = best_end = 0
        for position, token in enumerate(sequence):
            while state and token not in self.next[state]:
                state = self.link[state]
                matched = self.length[state]
            if token in self.next[state]:
                state = self.next[state][token]
                matched += 1
            if matched > best:
                best, best_end = matched, position + 1
        return best, best_end


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def canary_leakage(synthetic_texts: Sequence[str], canaries: Sequence[str]) -> list[dict]:
    """Per canary: does the full identifier line appear in a synthetic note (whitespace and case
    normalised), and does its identifier number (longest digit run, e.g. the MRN) appear."""
    normalised = [_normalise(t) for t in synthetic_texts]
    rows = []
    for index, canary in enumerate(canaries):
        runs = sorted(_DIGITS.findall(canary), key=len)
        identifier = runs[-1] if runs else None
        full_hits = [i for i, t in enumerate(normalised) if _normalise(canary) in t]
        id_hits = [i for i, t in enumerate(synthetic_texts) if identifier and re.search(rf"(?<!\d){identifier}(?!\d)", t)]
        rows.append({"canary_index": index, "full_in_output": bool(full_hits), "full_hits": len(full_hits),
                     "identifier_in_output": bool(id_hits), "identifier_hits": len(id_hits)})
    return rows


def verbatim_leakage(
    synthetic_texts: Sequence[str],
    train_texts: Sequence[str],
    n: int = 8,
    canaries: Sequence[str] = (),
) -> dict:
    """Word-level copying of training text into synthetic notes (see module docstring)."""
    if not synthetic_texts:
        raise ValueError("no synthetic notes")
    if not train_texts:
        raise ValueError("no training notes")
    train_tokens = [words(t) for t in train_texts]
    automaton = SuffixAutomaton(train_tokens)
    train_ngrams = {gram for tokens in train_tokens for gram in ngrams(tokens, n)}
    per_note = []
    for text in synthetic_texts:
        tokens = words(text)
        lcs, _ = automaton.longest_match(tokens)
        grams = ngrams(tokens, n)
        overlap = sum(g in train_ngrams for g in grams) / len(grams) if grams else 0.0
        per_note.append({"words": len(tokens), "longest_common_substring_words": lcs, f"{n}gram_overlap": overlap})
    lcs = np.array([r["longest_common_substring_words"] for r in per_note])
    overlap = np.array([r[f"{n}gram_overlap"] for r in per_note])
    result = {
        "n": n, "n_synthetic": len(synthetic_texts), "n_train": len(train_texts),
        "lcs_words": {"mean": float(lcs.mean()), "median": float(np.median(lcs)), "max": int(lcs.max()),
                      "p95": float(np.percentile(lcs, 95))},
        f"{n}gram_overlap": {"mean": float(overlap.mean()), "max": float(overlap.max()),
                             "fraction_of_notes_with_any": float((overlap > 0).mean())},
        "per_note": per_note,
    }
    if canaries:
        rows = canary_leakage(synthetic_texts, canaries)
        result["canaries"] = {"n": len(rows), "full_in_output": sum(r["full_in_output"] for r in rows),
                              "identifier_in_output": sum(r["identifier_in_output"] for r in rows), "per_canary": rows}
    return result


# ---------------------------------------------------------------------------------------------
# (d) One-run audit: empirical ε lower bound
# ---------------------------------------------------------------------------------------------
def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P-value of ≥ v correct guesses out of r (m canaries, each included w.p. 1/2) if the
    mechanism were (ε, δ)-DP (Steinke, Nasr, Jagielski 2023, Thm. 3.1/Prop. 5.2 and their
    reference code):  P[Bin(r, q) ≥ v] + 2 m δ · max_{i=1..v} P[v−i ≤ Bin(r, q) < v] / i,
    with q = e^ε / (1 + e^ε) the accuracy of ε-DP randomised response."""
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError("need epsilon >= 0 and 0 <= delta <= 1")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))
    alpha = 0.0
    if delta > 0:
        window = 0.0  # P[v − i <= Bin(r, q) < v]
        for i in range(1, v + 1):
            window += float(binom.pmf(v - i, r, q))
            alpha = max(alpha, window / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """Largest ε such that (ε, δ)-DP is rejected at `confidence` by v correct guesses out of r
    (binary search on `one_run_p_value`, which increases with ε). 0 if even ε = 0 cannot be
    rejected; inf if no finite ε up to 1e4 is consistent with the guesses."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    level = 1 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
        if high > 1e4:
            return math.inf
    for _ in range(40):
        middle = (low + high) / 2
        if one_run_p_value(m, r, v, middle, delta) < level:
            low = middle
        else:
            high = middle
    return low


def one_run_audit(
    scores: Sequence[float],
    inserted: Sequence[bool],
    delta: float = 0.0,
    confidence: float = 0.95,
    guesses: Iterable[tuple[int, int]] | None = None,
) -> dict:
    """Audit from per-canary membership scores (higher = more likely inserted, e.g. −loss).

    The auditor guesses "in" for the k+ highest scores and "out" for the k− lowest, abstaining on
    the rest; every (k+, k−) in `guesses` (default: a small grid) is tried and the best bound is
    reported. NB: choosing the best of several (k+, k−) after seeing the outcome is a multiple
    comparison; report a pre-registered single pair for a strict bound.
    """
    scores, inserted = np.asarray(scores, float), np.asarray(inserted, bool)
    m = len(scores)
    if m == 0 or len(inserted) != m:
        raise ValueError("need one score per canary and at least one canary")
    order = np.argsort(-scores, kind="stable")
    if guesses is None:
        sizes = sorted({max(1, round(m * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)})
        guesses = [(k, k) for k in sizes if 2 * k <= m] + [(k, 0) for k in sizes]
    best = {"epsilon_lower_bound": 0.0, "k_pos": 0, "k_neg": 0, "r": 0, "v": 0}
    for k_pos, k_neg in guesses:
        if k_pos + k_neg > m:
            continue
        guessed_in, guessed_out = order[:k_pos], order[m - k_neg :] if k_neg else order[:0]
        v = int(inserted[guessed_in].sum() + (~inserted[guessed_out]).sum())
        r = k_pos + k_neg
        bound = one_run_epsilon_lower_bound(m, r, v, delta, confidence)
        if bound > best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": bound, "k_pos": k_pos, "k_neg": k_neg, "r": r, "v": v}
    return {**best, "m": m, "delta": delta, "confidence": confidence}
