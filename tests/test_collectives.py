"""Every collective runs on the backend's device (issue 13, item 1): NCCL takes CUDA tensors only,
so a CPU tensor handed to it kills a multi-GPU launch before step 1, which no CPU run can see.

Two guards: no code but dpnotes/privacy/collectives.py calls a torch.distributed collective, and under a fake
device rule (the backend's device is one no CPU tensor has) every collective the DP step runs
receives a tensor on that device."""
import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dpnotes.privacy import collectives
from dpnotes.privacy.backends import ReplicatedBackend
from dpnotes.privacy.deepspeed import DeepSpeedBackend
from dpnotes.privacy.randomness import shared_keys

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "dpnotes" / "privacy" / "collectives.py"
FAKE_DEVICE = torch.device("meta")  # stands for cuda:N: a device the CPU tensors of the tests lack


# What moves tensors between ranks (setting up or tearing down a process group does not).
COLLECTIVES = {"all_reduce", "broadcast", "barrier", "reduce", "all_gather", "all_gather_into_tensor", "gather",
               "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv",
               "isend", "irecv", "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
               "monitored_barrier"}


def collectives_called(path: Path) -> list[str]:
    """torch.distributed collectives `path` calls or imports, however it names the module."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}  # names bound to torch.distributed
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [a.name for a in node.names if a.name in COLLECTIVES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in aliases:
            found.append(node.attr)
    return found


def test_only_the_helper_module_runs_collectives():
    files = [p for folder in ("dpnotes", "bench", "train") for p in (ROOT / folder).rglob("*.py") if p != HELPER]
    assert {str(p.relative_to(ROOT)): collectives_called(p) for p in files if collectives_called(p)} == {}
    assert set(collectives_called(HELPER)) == {"all_reduce", "broadcast", "barrier"}  # the check sees them


class Reached(Exception):
    """The collective was called with a tensor on the backend's device (the test stops there)."""


@pytest.fixture
def fake_nccl(monkeypatch):
    """Two ranks whose backend only takes tensors on FAKE_DEVICE; each collective checks its tensor."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(collectives, "collective_device", lambda: FAKE_DEVICE)

    def collective(tensor, *args, **kwargs):
        assert tensor.device == FAKE_DEVICE, f"collective on {tensor.device}, backend takes {FAKE_DEVICE}"
        raise Reached

    for name in ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        monkeypatch.setattr(dist, name, collective)


def test_the_key_broadcast_runs_on_the_backend_device(fake_nccl):
    with pytest.raises(Reached):
        shared_keys(seed=0)


def test_the_micro_batch_count_agreement_runs_on_the_backend_device(fake_nccl):
    with pytest.raises(Reached):
        DeepSpeedBackend(None, None, None, rank=0, world_size=2, stage=2).micro_batch_count(3)


def test_the_clipped_sums_are_reduced_on_the_backend_device(fake_nccl):
    # The sums of a DDP-style step, on the CPU here: the helper moves them; a direct dist.all_reduce would not.
    engine = SimpleNamespace(clipper=SimpleNamespace(summed=lambda: [torch.zeros(3), torch.zeros(2, 2)]))
    with pytest.raises(Reached):
        ReplicatedBackend(torch.nn.Linear(2, 2), rank=0, world_size=2).noise_and_step(engine)



def test_clipped_sums_are_reduced_in_a_few_bucketed_calls(monkeypatch):
    """Hundreds of small tensors: one all-reduce per bucket of one dtype, not one per tensor; every
    tensor gets its own sum back in place (the fake reduction doubles: two ranks holding the same)."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(collectives, "collective_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(collectives, "BUCKET_BYTES", 4 * 1000)
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: calls.append(tensor.numel()) or tensor.mul_(2))
    small = [torch.randn(3, 5) for _ in range(300)]  # 60 B each: 67 to a 4,000-byte bucket
    other = [torch.randn(4, dtype=torch.float64)]
    big = [torch.randn(2000)]  # over a bucket: reduced alone, in place
    tensors = small[:150] + other + big + small[150:]
    expected = [2 * t for t in tensors]
    collectives.all_reduce_sum_(tensors)
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
    # 150 small ones before the large one and 150 after: 3 buckets each; fp64 and the large one alone
    assert len(calls) == 3 + 1 + 1 + 3 and sum(calls) == sum(t.numel() for t in tensors)
