"""Gaussian mechanism on the clipped sum: N(0, σ²C²) once per coordinate per logical step."""
from __future__ import annotations

from typing import Iterable

import torch

from dpnotes.train.dp.sampling import secret_generator


class GaussianNoise:
    """Noise source whose generator state is saved with the privacy state, so that a resumed run
    draws exactly the noise the uninterrupted run would have drawn (never a repeat of used noise).

    `seed=None` (the default) seeds from OS entropy: whoever knows the seed can subtract the noise,
    so a fixed seed is for tests and audits only.
    """

    def __init__(self, noise_multiplier: float, max_grad_norm: float, seed: int | None = None):
        if noise_multiplier < 0:
            raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.generator = secret_generator(seed)

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm

    def add_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Add independent N(0, std²) to every coordinate, drawn on the CPU generator in a fixed
        order (so the draw does not depend on the device or on how tensors are placed)."""
        if self.std == 0:
            return
        for tensor in tensors:
            draw = torch.randn(tensor.shape, generator=self.generator, dtype=torch.float32)
            tensor.add_(draw.to(device=tensor.device, dtype=tensor.dtype), alpha=self.std)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
