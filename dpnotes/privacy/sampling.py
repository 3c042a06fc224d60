"""Poisson sampling of privacy units and their packing into physical micro-batches.

Each unit (a sequence, or a patient with all their notes) joins a logical batch independently
with probability q, so logical batches vary in size and may be empty: that is what the
subsampled-Gaussian analysis assumes. Micro-batches bound memory whatever the logical size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from dpnotes.privacy.randomness import stream


@dataclass(frozen=True)
class PoissonSampler:
    """Draws the logical batch of each step from the secret sampling key's stream of that step.

    Every rank holds the same key, so all ranks agree on the logical batch; the batch of a step is
    a function of (key, step), so a resumed run samples what the uninterrupted run would have.
    """

    num_units: int
    sample_rate: float
    key: int = field(repr=False)  # secret: whoever knows it knows who was in each batch

    def __post_init__(self):
        if self.num_units <= 0:
            raise ValueError("cannot sample from an empty data set")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_units

    def sample(self, step: int) -> torch.Tensor:
        """Sorted indices of the units in the logical batch of `step` (possibly none)."""
        keep = stream(self.key, step).random(self.num_units) < self.sample_rate
        return torch.from_numpy(keep.nonzero()[0])


def shard_units(units: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of a logical batch that every rank sampled identically (shared sampling key)."""
    return units[rank::world_size]


def pack_micro_batches(
    units: Sequence[int], examples_of_unit: Sequence[Sequence[int]] | None, max_examples: int
) -> list[tuple[list[int], list[int]]]:
    """Greedy packing of whole units into micro-batches of at most `max_examples` examples.

    Returns (example indices, unit position of each example within the micro-batch) per
    micro-batch. A unit is never split across micro-batches (its norm must be of its whole
    gradient); a unit larger than `max_examples` gets a micro-batch of its own.
    """
    batches: list[tuple[list[int], list[int]]] = []
    examples: list[int] = []
    groups: list[int] = []
    for unit in units:
        members = [int(unit)] if examples_of_unit is None else list(examples_of_unit[int(unit)])
        if examples and len(examples) + len(members) > max_examples:
            batches.append((examples, groups))
            examples, groups = [], []
        next_group = groups[-1] + 1 if groups else 0
        examples += members
        groups += [next_group] * len(members)
    if examples:
        batches.append((examples, groups))
    return batches


def micro_batch_count(num_examples: int, max_examples: int) -> int:
    return math.ceil(num_examples / max_examples)
