"""DP fine-tuning of a causal LM on notes: the library behind train/dp_lora.py.

`train(config)` = setup (setup.py: data, accelerator, model, privacy engine and its step backend,
optimizer, resume) → the train loop below (one `PrivacyEngine.step` per logical step, logging,
checkpoints) → export (export.py: weights and privacy_report.json). The benchmarks reuse the
same pieces.
"""
from __future__ import annotations

import math
import time

from dpnotes.privacy.losses import causal_lm_losses
from dpnotes.training.checkpoints import save_checkpoint
from dpnotes.training.config import TrainConfig
from dpnotes.training.export import export
from dpnotes.training.setup import TrainingRun, setup


def train_loop(run: TrainingRun) -> None:
    """DP steps until the step count or the privacy budget is reached, checkpointing on the way."""
    config, engine, accelerator = run.config, run.engine, run.accelerator
    more = engine.budget_allows_step()
    while more:
        start = time.perf_counter()
        stats = engine.step(run.backend, run.fetch, causal_lm_losses)
        elapsed = time.perf_counter() - start
        step = engine.steps_taken
        accelerator.log(
            {
                "epsilon": stats.epsilon,
                "noise_multiplier": engine.noise_multiplier,
                # Computed from the sampled (private) batch, or timed on it (a step's work grows with
                # the batch's size and lengths): outside the DP guarantee.
                "nonprivate/step_seconds": elapsed,
                "nonprivate/loss": stats.loss_sum / max(stats.examples, 1),
                "nonprivate/clipped_fraction": stats.clipped_units / max(stats.units, 1),
                "nonprivate/tokens_per_second": stats.tokens / elapsed,
            },
            step=step,
        )
        more = engine.budget_allows_step()
        if step % config.save_every == 0 or not more:
            save_checkpoint(accelerator, run.model, run.output_dir, step, config.fingerprint())
        accelerator.print(
            f"step {step}/{config.privacy.steps} ε={stats.epsilon:.4g} "
            f"[not private: loss {stats.loss_sum / max(stats.examples, 1):.3f}, {elapsed:.2f}s]"
        )


def train(config: TrainConfig) -> dict:
    """Train (or resume) and return the privacy report; writes adapter/model and report to output_dir."""
    run = setup(config)
    train_loop(run)
    report = export(run)
    run.accelerator.end_training()
    if not math.isinf(report["epsilon"]):
        run.accelerator.print(f"done: ε = {report['epsilon']:.4g} at δ = {report['delta']:.3g} after {report['steps']} steps")
    return report
