"""Every collective dpnotes runs, on the backend's device.

accelerate and DeepSpeed start an NCCL-only process group on GPUs, and NCCL moves CUDA tensors
only (gloo, CPU ones): a CPU tensor handed to NCCL kills the launch before step 1. So no code
calls torch.distributed collectives directly; it calls these, which put every tensor on
`collective_device()` (tests/test_collectives.py checks both, under a fake device rule).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the default group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def collective_device() -> torch.device:
    """Where tensors for collectives must live: NCCL takes CUDA tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Add each tensor over the ranks, in place. A tensor already on the backend's device (the
    usual case: the clipped sums live beside their parameters) is reduced without a copy."""
    if world_size() == 1:
        return
    device = collective_device()
    for tensor in tensors:
        moved = tensor.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not tensor:
            tensor.copy_(moved)


def all_reduce_max(value: int) -> int:
    """The largest `value` over the ranks."""
    if world_size() == 1:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def broadcast_ints(values: list[int], src: int = 0) -> list[int]:
    """`values` as rank `src` has them (each must fit int64)."""
    if world_size() == 1:
        return values
    box = torch.tensor(values, dtype=torch.int64, device=collective_device())
    dist.broadcast(box, src=src)
    return [int(v) for v in box.tolist()]


def barrier() -> None:
    """Wait for every rank. Under NCCL on the current device: without device_ids NCCL guesses
    the device from the rank, which is wrong whenever ranks and GPUs are not numbered alike."""
    if world_size() == 1:
        return
    device = collective_device()
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
