"""The replicated backend of the DP step: one process, or N DDP-style processes that each hold the
full trainable state (no DeepSpeed; for ZeRO see deepspeed.py).

Every rank clips its own share of the logical batch into fp32 clipped sums; the sums are added
across ranks, and every rank then adds the same noise (the replicated stream of the step: noise
lands once per coordinate, and replicas stay identical) and divides by the expected logical batch
size q·N. The result is cast to each parameter's dtype once, set as `.grad`, and the torch
optimizer steps on it.
"""
from __future__ import annotations

import torch
from torch import nn

from dpnotes.privacy.clipping import ClipResult
from dpnotes.privacy.collectives import all_reduce_sum_
from dpnotes.privacy.engine import LossFn, MicroBatch, PrivacyEngine


class TrainableWeights:
    """Checkpoint only what training changes (LoRA adapters, or everything under full FT)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


class ReplicatedBackend:
    """Clip with the clipper's own backward; all-reduce the clipped sums; replicated noise; `.grad`.

    `optimizer=None` leaves the DP gradient in `.grad` (tests, audits) instead of stepping on it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, rank: int = 0,
                 world_size: int = 1):
        self.model = model
        self.optimizer = optimizer
        self.rank = rank
        self.world_size = world_size

    def micro_batch_count(self, local: int) -> int:
        return local  # no collective runs per micro-batch: ranks need not agree on a count

    def clip(self, engine: PrivacyEngine, loss_fn: LossFn, micro: MicroBatch) -> tuple[torch.Tensor, ClipResult]:
        with engine.clipper.recording(micro.size):
            losses = loss_fn(self.model, micro.batch)
        return losses.detach(), engine.clipper.backward(losses, micro.group_index)

    def noise_and_step(self, engine: PrivacyEngine) -> None:
        clipper = engine.clipper
        sums = clipper.summed()
        all_reduce_sum_(sums)  # before the noise: it is drawn once, identically on every rank
        engine.noise.add_(sums, step=engine.steps_taken)
        scale = 1.0 / engine.expected_batch_size
        for param, total in zip(clipper.parameters, sums):
            param.grad = total.mul_(scale).to(param.dtype)
        clipper.reset_sums()  # the sums are the gradients now
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    # ---- what the training run needs beyond the step ---------------------------------------
    def checkpointed(self) -> list:
        """What accelerate's save_state must checkpoint besides the privacy engine."""
        return [TrainableWeights(self.model), self.optimizer]

    def save_weights(self, accelerator, folder, full_model: bool = False) -> None:
        """The trained weights (`save_pretrained`: the adapter under LoRA), or with full_model every
        weight under the model's own key names. Call on every rank; the main process writes."""
        if full_model:
            accelerator.save_model(self.model, folder)
        elif accelerator.is_main_process:
            self.model.save_pretrained(folder)
