"""ε sweeps of the DP coders: one coder per ε over the public labels, scored on real test notes.

Coders by name (`DP_CODERS`): "lora" (DP-LoRA MiniLM, dp_classifier), "probe" and "hashed" (DP
linear models on frozen MiniLM features or hashed n-grams, dp_linear).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal

from dpnotes.corpus import Note
from dpnotes.evaluation.coders import EvalInputError, _require_notes, evaluate_coder
from dpnotes.evaluation.dp_classifier import DEFAULT_EPSILONS, DPCoder, DPLoRACoder
from dpnotes.evaluation.dp_linear import linear_coders


def _lora_coders(labels: Sequence[str], titles: Mapping[str, str] | None, **options) -> Callable[[float], DPCoder]:
    return lambda epsilon: DPLoRACoder(epsilon, labels, titles=titles, **options)


def _linear_coders(kind: str) -> Callable[..., Callable[[float], DPCoder]]:
    def make(labels: Sequence[str], titles: Mapping[str, str] | None, **options) -> Callable[[float], DPCoder]:
        return linear_coders(kind, labels, titles=titles, **options)

    return make


# name -> (public labels, public titles, **options) -> (ε -> coder): one maker per sweep, so the linear coders
# share one feature map (MiniLM encodes each note once for every ε).
DP_CODERS: dict[str, Callable[..., Callable[[float], DPCoder]]] = {
    "lora": _lora_coders, "probe": _linear_coders("probe"), "hashed": _linear_coders("hashed"),
}


DPCoderKind = Literal[tuple(DP_CODERS)]  # what configs may name


def check_coder(coder: str) -> None:
    if coder not in DP_CODERS:
        raise EvalInputError(f"unknown DP coder {coder!r}: choose from {', '.join(DP_CODERS)}")


@dataclass(kw_only=True)
class DPCoderSettings:
    """A DP coder's training settings, named as in training; None keeps the chosen coder's default
    (they differ: a linear head wants larger batches and learning rates than LoRA)."""

    model: str | None = None  # encoder alias or folder (lora, probe)
    max_length: int | None = None  # tokens per note (lora, probe)
    lora_rank: int | None = None  # lora
    steps: int | None = None
    expected_batch_size: int | None = None
    learning_rate: float | None = None
    max_grad_norm: float | None = None

    def coder_options(self, coder: str) -> dict:
        """The settings given, as keyword options of the coder of kind `coder`."""
        check_coder(coder)
        # Only these settings: a config that extends them (eval's DPClassifierConfig) holds others too.
        options = {f.name: getattr(self, f.name) for f in fields(DPCoderSettings) if getattr(self, f.name) is not None}
        if coder == "hashed" and {"model", "max_length"} & set(options):
            raise EvalInputError("model and max_length configure an encoder: coder hashed has none")
        if coder != "lora" and "lora_rank" in options:
            raise EvalInputError(f"lora_rank configures LoRA adapters: coder {coder} has none")
        return options


def dp_epsilon_sweep(
    train: Sequence[Note],
    dev: Sequence[Note],
    test: Sequence[Note],
    labels: Sequence[str],
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    n_bootstrap: int = 1000,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    coder: str = "lora",
    titles: Mapping[str, str] | None = None,
    **coder_options,
) -> dict:
    """Train one DP coder per ε over the public `labels`; weighted-F1 (and the rest) on real test
    notes. `coder`: a name of `DP_CODERS` ("lora": DP-LoRA MiniLM; "probe": DP linear probe on
    frozen MiniLM features; "hashed": DP logistic regression on hashed n-grams); `coder_options`
    go to it. `titles` ({code: public title}, `prompting.label_titles`): the linear coders' heads
    start from them. `seed` seeds model initialisation and the bootstrap, never the privacy keys.

    Returns {"by_epsilon": {str(ε): result}, "weighted_f1": {str(ε): value}} where each result is
    `evaluate_coder`'s dict plus "privacy" and "seconds" (fit, predictions and bootstrap; a
    shared feature map is computed in the first ε's).
    """
    for name, notes in (("train", train), ("dev", dev), ("test", test)):
        _require_notes(notes, name)
    if not epsilons:
        raise ValueError("no epsilon given")
    check_coder(coder)
    make_coder = DP_CODERS[coder](labels, titles, seed=seed, log=log, **coder_options)
    results = {}
    for epsilon in epsilons:
        trained = make_coder(epsilon)
        started = time.perf_counter()
        result = evaluate_coder(trained, train, dev, test, n_bootstrap=n_bootstrap, seed=seed)
        result["privacy"], result["seconds"] = trained.privacy_, time.perf_counter() - started
        results[format_epsilon(epsilon)] = result
        if log:
            log(f"ε={format_epsilon(epsilon)}: weighted F1 {result['metrics']['weighted_f1']:.4f} "
                f"(σ={trained.privacy_['noise_multiplier']:.3g}, {trained.privacy_['steps_taken']} steps)")
    return {"by_epsilon": results, "weighted_f1": {eps: r["metrics"]["weighted_f1"] for eps, r in results.items()}}


def format_epsilon(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def parse_epsilon(text: str) -> float:
    value = float("inf") if text.strip().lower() in ("inf", "∞", "infinity") else float(text)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"epsilon must be > 0 or 'inf', got {text!r}")
    return value
