"""Checkpoints of a training run: where they go, who may read them, and which one a run may resume.

A checkpoint holds the secret sampling and noise keys (the privacy engine's state): it is written
owner-only, and the `latest` pointer moves only once it is complete. A run directory is bound to
one configuration, and so is every checkpoint in it.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from dpnotes.privacy.deepspeed import is_deepspeed
from dpnotes.runs import RunDir
from dpnotes.training.config import TrainConfig, config_dict
from dpnotes.errors import UserError

STEP_FOLDER = re.compile(r"step_\d{6,}")  # f"step_{step:06d}"
RUN_STAMP = "dpnotes_run.json"  # in every checkpoint: the config hash it belongs to


class CheckpointError(UserError):
    """A checkpoint that must not be resumed from (foreign run, tampered pointer)."""


def latest_checkpoint(output_dir: Path, config_hash: str) -> Path | None:
    """The checkpoint `checkpoints/latest` names, after checking that the pointer names a sibling
    step folder and that the checkpoint belongs to this run's configuration.

    Resuming unpickles the checkpoint (accelerate/torch): run directories are trusted input.
    These checks stop mistakes (a copied folder, a hand-edited pointer), not an attacker who can
    write to the run directory.
    """
    folder = RunDir(output_dir).checkpoints
    pointer = folder / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not STEP_FOLDER.fullmatch(name) or not (folder / name).is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, not a step_NNNNNN folder beside it: refusing to resume")
    checkpoint = folder / name
    stamp = checkpoint / RUN_STAMP
    recorded = json.loads(stamp.read_text()).get("config_hash") if stamp.exists() else None
    if recorded != config_hash:
        raise CheckpointError(
            f"{checkpoint} belongs to configuration {recorded}, not this run's {config_hash}: refusing to resume"
        )
    return checkpoint


# A checkpoint holds what training changes: trainable weights, optimizer, privacy state. DeepSpeed
# would also write every frozen base weight (140 GB per checkpoint at 70B); on resume those are the
# base model's, already loaded, so the module state is loaded non-strictly (the trainable weights
# come back with it and from the optimizer's fp32 partitions; kill/resume is bit-identical,
# tests/test_scale.py).
LEAN_DEEPSPEED_SAVE = {"exclude_frozen_parameters": True}
LEAN_DEEPSPEED_LOAD = {"load_module_strict": False}


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> None:
    accelerator.load_state(str(checkpoint), **(LEAN_DEEPSPEED_LOAD if is_deepspeed(accelerator) else {}))


def drop_frozen_weights(folder: Path, model: nn.Module) -> None:
    """DeepSpeed's exclude_frozen_parameters goes by named_parameters(), which names a tied weight
    once: a frozen weight tied to another (SmolLM2's lm_head, 113 MB) stays in the module states.
    Drop every frozen tensor there, so that a checkpoint holds what training changes."""
    frozen = {name for name, value in model.state_dict(keep_vars=True).items()
              if isinstance(value, nn.Parameter) and not value.requires_grad}
    for path in folder.rglob("mp_rank_*_model_states.pt"):
        states = torch.load(path, map_location="cpu", weights_only=False)  # written by this process just now
        states["module"] = {name: value for name, value in states["module"].items() if name not in frozen}
        torch.save(states, path)


def save_checkpoint(accelerator: Accelerator, model: nn.Module, output_dir: Path, step: int, config_hash: str) -> None:
    """Write the step's state, owner-only (it holds the secret sampling and noise keys), then move
    the `latest` pointer."""
    name = f"step_{step:06d}"
    folder = RunDir(output_dir).checkpoints
    previous = os.umask(0o077)  # everything written below is owner-only
    try:
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(folder / name), **(LEAN_DEEPSPEED_SAVE if is_deepspeed(accelerator) else {}))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if is_deepspeed(accelerator):
                drop_frozen_weights(folder / name, model)
            restrict_to_owner(folder / name)  # in case a library set modes of its own
            (folder / name / RUN_STAMP).write_text(json.dumps({"config_hash": config_hash, "step": step}))
            # The pointer moves only once the state is fully written: a crash mid-save keeps the old one.
            tmp = folder / "latest.tmp"
            tmp.write_text(name)
            tmp.replace(folder / "latest")
    finally:
        os.umask(previous)


def restrict_to_owner(root: Path) -> None:
    """chmod go-rwx below `root` (files a library wrote with its own modes included)."""
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & 0o700)


STAMP_WAIT_S = 60.0  # NFS caches a lookup that found nothing for up to acdirmax (60 s by default)


def claim_output_dir(accelerator: Accelerator, output_dir: Path, config: TrainConfig) -> None:
    """Bind output_dir to this config: resuming someone else's checkpoints would mix two runs.

    Collective. On a first launch only the main process writes the stamp (whole, by a rename) and
    the others read it after a barrier: reading sooner, on a shared file system, they would find
    no stamp (and skip the check) or half of one. Every rank then checks the same stamp, so a
    mismatch stops them all, and none is left waiting at a barrier the main process never reaches."""
    stamp = RunDir(output_dir).config
    if accelerator.is_main_process and not stamp.exists():
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(stamp.name + ".tmp")
        tmp.write_text(json.dumps({"config_hash": config.fingerprint(), **config_dict(config)}, indent=2))
        tmp.replace(stamp)
    accelerator.wait_for_everyone()
    recorded = json.loads(appeared(stamp).read_text()).get("config_hash")
    if recorded != config.fingerprint():
        raise UserError(
            f"{output_dir} holds a run with another configuration (hash {recorded}, this one "
            f"{config.fingerprint()}): choose another output_dir or delete it"
        )


def appeared(stamp: Path) -> Path:
    """`stamp`, a file the main process wrote before a barrier, once this node sees it."""
    deadline = time.monotonic() + STAMP_WAIT_S
    while not stamp.exists():
        if time.monotonic() > deadline:
            raise UserError(f"{stamp} was written by the main process but is not visible here after "
                            f"{STAMP_WAIT_S:.0f} s: is output_dir on a file system every node shares?")
        time.sleep(0.5)
    return stamp
