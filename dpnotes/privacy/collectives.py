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


BUCKET_BYTES = 64 * 2**20  # bounds the extra memory of the flattened copies


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Add each tensor over the ranks, in place, in few calls: tensors of one dtype are flattened
    into buckets of at most BUCKET_BYTES, one all-reduce each (a LoRA model has hundreds of small
    tensors, and a collective per tensor costs more than its data). A tensor as large as a bucket,
    on the backend's device, is reduced where it is, without a copy."""
    if world_size() == 1:
        return
    device = collective_device()
    for bucket in _buckets(tensors):
        if len(bucket) == 1:
            moved = bucket[0].to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            if moved is not bucket[0]:
                bucket[0].copy_(moved)
            continue
        flat = torch.cat([t.reshape(-1).to(device) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for tensor, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            tensor.copy_(part.view_as(tensor))


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = []
    open_bucket: dict[torch.dtype, tuple[list[torch.Tensor], int]] = {}
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        bucket, used = open_bucket.get(tensor.dtype, (None, 0))
        if bucket is None or used + size > BUCKET_BYTES:
            bucket, used = [], 0
            buckets.append(bucket)
        bucket.append(tensor)
        open_bucket[tensor.dtype] = (bucket, used + size)
    return buckets


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
