"""Secret randomness of DP-SGD: 128-bit keys from OS entropy, counter-based streams.

Whoever knows the draws can undo the mechanism: knowing the noise, subtract it; knowing the Poisson
draws, lose the amplification by sampling. Hence:

- Keys: 128 bits each from `secrets` (OS entropy), one for sampling and an independent one for
  noise; never a default seed, never derived from a model seed. `SecretKeys.from_seed` (tests,
  audits) derives both from a public seed, and everything trained with it says "not private".
- Streams: numpy's Philox4x64 (counter-based, 128-bit key). The stream of (step, rank) starts at the
  counter words (0, 0, step, rank) and only ever advances the two low words, so two streams of one
  key could meet only after one of them drew 2^128 blocks: no (step, rank) pair repeats another's
  draws, for any number of ranks and steps. (Seeding torch's CPU generator per (step, rank) keeps
  32 bits, and 64 ranks × 3,000 steps would then repeat a stream about four times.)
- State: the keys alone. A stream is a function of (key, step, rank), so a resumed run draws
  exactly what the uninterrupted run would have drawn and never reuses a draw.
- Noise on an accelerator is drawn there (`NormalDraws`): copying it from the host would cost more
  than the step at scale (8B full fine-tuning: 32 GB host→device per rank and step).
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch

from dpnotes.privacy.collectives import broadcast_ints

KEY_BITS = 128
REPLICATED = 2**64 - 1  # rank word of a stream that every rank draws identically (DDP-style noise)


@dataclass(frozen=True)
class SecretKeys:
    sampling: int = field(repr=False)  # never in a repr: tracebacks and logs are not secret
    noise: int = field(repr=False)
    fixed_seed: int | None = None  # set when derived from a public seed: results are not private

    @classmethod
    def fresh(cls) -> SecretKeys:
        return cls(secrets.randbits(KEY_BITS), secrets.randbits(KEY_BITS))

    @classmethod
    def from_seed(cls, seed: int) -> SecretKeys:
        """Keys anyone can recompute from `seed`: for tests and audits only."""
        words = np.random.SeedSequence(int(seed)).generate_state(8, dtype=np.uint32)
        return cls(*_join_words([int(w) for w in words]), fixed_seed=int(seed))

    @property
    def private(self) -> bool:
        return self.fixed_seed is None

    def state_dict(self) -> dict:
        # Strings: 128-bit integers do not fit the int64 of tensors or of some serialisers.
        return {"sampling": str(self.sampling), "noise": str(self.noise), "fixed_seed": self.fixed_seed}

    @classmethod
    def from_state(cls, state: dict) -> SecretKeys:
        return cls(int(state["sampling"]), int(state["noise"]), state["fixed_seed"])


def shared_keys(seed: int | None) -> SecretKeys:
    """The same keys on every rank: drawn (or derived) on rank 0 and broadcast."""
    keys = SecretKeys.fresh() if seed is None else SecretKeys.from_seed(seed)
    # 32-bit words: a 128-bit key does not fit the int64 elements collectives move.
    words = [(value >> (32 * i)) & 0xFFFFFFFF for value in (keys.sampling, keys.noise) for i in range(4)]
    return SecretKeys(*_join_words(broadcast_ints(words, src=0)), keys.fixed_seed)


def _join_words(words: list[int]) -> tuple[int, int]:
    """Eight 32-bit words, least significant first, as the (sampling, noise) keys."""
    return tuple(sum(w << (32 * i) for i, w in enumerate(part)) for part in (words[:4], words[4:]))


def stream(key: int, step: int, rank: int = REPLICATED) -> np.random.Generator:
    """The draws of (step, rank) under `key`; see the module docstring for why they never overlap."""
    if not (0 <= step < 2**64 and 0 <= rank < 2**64):
        raise ValueError(f"step and rank must fit 64 bits, got {step}, {rank}")
    counter = np.array([0, 0, step, rank], dtype=np.uint64)  # a list would pass through int64 and wrap
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


def gaussian(draws: np.random.Generator, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Standard normal fp32 CPU tensor of `shape` from the stream, in a fixed order (filled in
    place: ~17 ns per coordinate on one core, against ~8 for torch's mt19937 on two)."""
    out = torch.empty(shape, dtype=torch.float32)
    draws.standard_normal(out=out.numpy().reshape(-1), dtype=np.float32)
    return out


class NormalDraws:
    """Standard normal fp32 draws of the stream of (key, step, rank), made where each tensor lives.

    Host tensors are filled from the Philox4x64 stream itself (`gaussian`). Accelerator tensors
    are drawn on their device: torch's device generators (Philox4x32 on CUDA) take a 64-bit seed,
    so each draw is (z1 + z2) / √2 from two generators seeded with the stream's next two 64-bit
    words. That is exactly N(0, 1), and recomputing the noise needs both seeds: 128 secret bits, as
    the key. Nothing is checkpointed: the seeds are a function of (key, step, rank), so a resumed
    run draws what the uninterrupted one drew (on the same hardware). Tensors draw in call order.
    """

    def __init__(self, key: int, step: int, rank: int = REPLICATED):
        self._host = stream(key, step, rank)
        self._devices: dict[torch.device, tuple[torch.Generator, torch.Generator]] = {}

    def like(self, tensor: torch.Tensor) -> torch.Tensor:
        """N(0, 1) fp32 draws of `tensor`'s shape on its device."""
        if tensor.device.type == "cpu":
            return gaussian(self._host, tensor.shape)
        return self.on_device(tensor.shape, tensor.device)

    def on_device(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        if device not in self._devices:
            seeds = self._host.integers(0, 2**64, size=2, dtype=np.uint64, endpoint=False)
            self._devices[device] = tuple(torch.Generator(device=device).manual_seed(int(s)) for s in seeds)
        first, second = self._devices[device]
        draw = torch.randn(shape, generator=first, device=device, dtype=torch.float32)
        draw.add_(torch.randn(shape, generator=second, device=device, dtype=torch.float32))
        return draw.mul_(math.sqrt(0.5))
