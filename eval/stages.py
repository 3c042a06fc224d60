"""Evaluation stages of the pipeline: one trained generator (utility, privacy, fidelity) and the
coder baselines on real notes (non-private and DP-LoRA per ε)."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from dpnotes.corpus import Note, canary_secrets
from dpnotes.eval.coders import TfidfCoder, compare_train_sets, evaluate_coder
from dpnotes.eval.fidelity import fidelity_report
from dpnotes.eval.privacy import canary_contexts, canary_exposure, membership_inference, note_losses, verbatim_leakage
from dpnotes.generate.synthesize import load_synthetic


def _sample(notes: list[Note], count: int, seed: int = 0) -> list[Note]:
    return random.Random(seed).sample(notes, min(count, len(notes)))


def evaluate_generator(run_dir: Path, splits: dict[str, list[Note]], config) -> dict:
    """Coders trained on the synthetic notes (tested on real), exposure of planted canaries, loss
    MIA, verbatim leakage and fidelity for the generator in run_dir/merged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, dev, test = splits["train"], splits["dev"], splits["test"]
    synthetic = load_synthetic(run_dir / "synthetic")
    coders = compare_train_sets(TfidfCoder, train, synthetic, dev, test, n_bootstrap=config.bootstrap)

    merged = run_dir / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    privacy: dict = {}
    canaries, contexts = canary_contexts(train + dev + test)
    if canaries:
        # Canaries of held-out patients are the control: the model never saw them.
        exposure = canary_exposure(model, tokenizer, canaries, contexts, n_candidates=config.canary_candidates)
        trained_on = set(canary_secrets(train))
        for row, canary in zip(exposure["per_canary"], canaries):
            row["member"] = canary in trained_on
        for group, member in (("member", True), ("nonmember", False)):
            values = [r["exposure"] for r in exposure["per_canary"] if r["member"] == member]
            exposure[f"mean_{group}_exposure"] = sum(values) / len(values) if values else None
        privacy["exposure"] = exposure
    with torch.no_grad():
        members = note_losses(model, tokenizer, _sample(train, config.mia_notes))
        nonmembers = note_losses(model, tokenizer, _sample(test, config.mia_notes))
    privacy["membership_inference"] = membership_inference(members, nonmembers)
    privacy["verbatim"] = verbatim_leakage([n.text for n in synthetic], [n.text for n in train],
                                           canaries=canary_secrets(train))
    fidelity = fidelity_report(test, synthetic)
    return {"coders": coders, "privacy": privacy, "fidelity": fidelity, "synthetic_notes": len(synthetic)}


def coder_baselines(splits: dict[str, list[Note]], config, dp_labels: list[str]) -> dict:
    """The coder trained on real notes (no privacy), and DP-LoRA coders on real notes per ε over
    the public label list `dp_labels`."""
    from dpnotes.eval.dp_classifier import dp_epsilon_sweep

    train, dev, test = splits["train"], splits["dev"], splits["test"]
    result = {"real_tfidf": evaluate_coder(TfidfCoder(), train, dev, test, n_bootstrap=config.bootstrap)}
    if config.dp_coder:
        result["dp_coder"] = dp_epsilon_sweep(train, dev, test, dp_labels, epsilons=config.epsilons, n_bootstrap=config.bootstrap,
                                              model=config.dp_coder_model, steps=config.dp_coder_steps, log=print)
    return result
