"""Evaluation stages of the pipeline: one trained generator (utility, privacy, fidelity) and the
coder baselines on real notes (non-private and DP-LoRA per ε)."""
from __future__ import annotations

import json
import random

import torch

from dpnotes.corpus import Note, canary_secrets
from dpnotes.errors import UserError
from dpnotes.evaluation.coders import TfidfCoder, compare_train_sets, evaluate_coder
from dpnotes.evaluation.fidelity import fidelity_report
from dpnotes.evaluation.leakage import canary_contexts, canary_exposure, membership_inference, note_losses, verbatim_leakage
from dpnotes.models import compute_device, compute_dtype, load_causal_lm
from dpnotes.prompting import prompt_format_from
from dpnotes.runs import PRIVACY_REPORT, RunDir, load_synthetic
from dpnotes.evaluation.dp_sweep import dp_epsilon_sweep, format_epsilon


def _sample(notes: list[Note], count: int, seed: int = 0) -> list[Note]:
    return random.Random(seed).sample(notes, min(count, len(notes)))


def evaluate_generator(run: RunDir, splits: dict[str, list[Note]], config) -> dict:
    """Coders trained on the synthetic notes (tested on real), exposure of planted canaries, loss
    MIA, verbatim leakage and fidelity for the generator in the run's merged/. With synthetic_count
    0 (a memorisation audit) there are no notes: exposure and MIA only."""
    train, dev, test = splits["train"], splits["dev"], splits["test"]
    synthetic = load_synthetic(run.synthetic) if config.generates else []
    if config.generates and not synthetic:
        raise UserError(f"{run.synthetic}: no synthetic notes to evaluate (generation wrote none)")
    coders = compare_train_sets(TfidfCoder, train, synthetic, dev, test, n_bootstrap=config.bootstrap) if synthetic else {}

    merged = run.merged
    # Scoring in the dtype training computes in: bf16 moves exposures and MIA losses by rounding only.
    model, tokenizer = load_causal_lm(str(merged), dtype=compute_dtype("auto"))
    model.to(compute_device()).eval()
    prompt = prompt_format_from(json.loads((merged / PRIVACY_REPORT).read_text()), str(merged))

    def prompt_of(codes):
        return prompt.render(codes, tokenizer)

    privacy: dict = {}
    canaries, contexts = canary_contexts(train + dev + test, prompt_of)
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
        members = note_losses(model, tokenizer, _sample(train, config.mia_notes), prompt_of)
        nonmembers = note_losses(model, tokenizer, _sample(test, config.mia_notes), prompt_of)
    privacy["membership_inference"] = membership_inference(members, nonmembers)
    if not config.generates:
        return {"coders": coders, "privacy": privacy, "synthetic_notes": 0}
    privacy["verbatim"] = verbatim_leakage([n.text for n in synthetic], [n.text for n in train],
                                           canaries=canary_secrets(train))
    fidelity = fidelity_report(test, synthetic)
    return {"coders": coders, "privacy": privacy, "fidelity": fidelity, "synthetic_notes": len(synthetic)}


def real_coder_baseline(splits: dict[str, list[Note]], bootstrap: int) -> dict:
    """The coder trained on the real train notes (no privacy): the ceiling synthetic notes aim at."""
    return evaluate_coder(TfidfCoder(), splits["train"], splits["dev"], splits["test"], n_bootstrap=bootstrap)


def dp_coder_baseline(splits: dict[str, list[Note]], labels: list[str], titles: dict[str, str], coder: str,
                      epsilon: float, bootstrap: int, options: dict) -> dict:
    """One DP coder of kind `coder` trained on the real notes at ε over the public `labels` (with
    their public `titles`)."""
    sweep = dp_epsilon_sweep(splits["train"], splits["dev"], splits["test"], labels, epsilons=[epsilon],
                             n_bootstrap=bootstrap, coder=coder, titles=titles, log=print, **options)
    return sweep["by_epsilon"][format_epsilon(epsilon)]
