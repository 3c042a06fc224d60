"""Short content digests: the keys of cached results (pipeline stages, tokenized corpora)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_digest(*modules: str) -> str:
    """Digest of the named modules' source files: a cached result is recomputed when the code that
    computed it changes (its defaults included), not only when its options do."""
    return digest(*(hashlib.sha256(Path(importlib.util.find_spec(m).origin).read_bytes()).hexdigest() for m in modules))
