"""Gaussian mechanism on the clipped sum: N(0, σ²C²) once per coordinate per logical step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from dpnotes.privacy.randomness import REPLICATED, NormalDraws


@dataclass(frozen=True)
class GaussianNoise:
    """Noise of std σC drawn from the secret noise key's stream of (step, rank)."""

    noise_multiplier: float
    max_grad_norm: float
    key: int = field(repr=False)  # secret: whoever knows it can subtract the noise

    def __post_init__(self):
        if self.noise_multiplier < 0:
            raise ValueError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm

    def add_(self, tensors: Iterable[torch.Tensor], step: int, rank: int = REPLICATED) -> None:
        """Add independent N(0, std²) to every coordinate of the (fp32) tensors, drawn in order from
        the stream of (step, rank), on each tensor's device (NormalDraws)."""
        if self.std == 0:
            return
        draws = NormalDraws(self.key, step, rank)
        for tensor in tensors:
            tensor.add_(draws.like(tensor).to(tensor.dtype), alpha=self.std)
