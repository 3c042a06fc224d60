"""dpnotes' on-disk caches, and the one way an entry is written into them.

The corpus cache (notes in Arrow) and the token cache hold private notes and their tokens: they are
secret material, written owner-only like the checkpoints (docs/privacy.md); an entry unused for
30 days is removed. The model cache holds public weights.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

UNUSED_DAYS = 30  # an entry not used for this long is removed when another one is stored beside it
STAGING_PREFIX = ".staging-"


def cache_root() -> Path:
    """Root of dpnotes' on-disk cache: ``$DPNOTES_CACHE`` or ``~/.cache/dpnotes``."""
    return Path(os.environ.get("DPNOTES_CACHE") or Path.home() / ".cache" / "dpnotes")


def corpus_cache() -> Path:
    """Where corpora are kept as validated Arrow tables (dpnotes.corpus.arrow), by fingerprint."""
    return cache_root() / "corpus"


def token_cache() -> Path:
    """Where tokenized training corpora are kept (dpnotes.tokenized_notes)."""
    return cache_root() / "tokenized"


def ensure_entry(folder: Path, write: Callable[[Path], None], marker: str) -> Path:
    """The cache entry `folder`, made on a miss: `write(staging)` fills a staging folder beside it,
    owner-only, which is then renamed into place, so a reader sees a whole entry or none. `marker`
    is the file `write` creates last; an entry holding it is complete, and its time is refreshed on
    every use. Another process that stored the same entry first wins: its entry is as good."""
    if (folder / marker).exists():
        (folder / marker).touch()
        return folder
    _remove_unused(folder.parent, marker)
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    previous = os.umask(0o077)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=STAGING_PREFIX))
    try:
        write(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / marker).exists():
                raise OSError(f"{folder} exists but is not a complete cache entry: remove it") from None
    finally:
        os.umask(previous)
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _remove_unused(parent: Path, marker: str) -> None:
    """Entries unused for UNUSED_DAYS, and staging folders a crashed process left for a day."""
    if not parent.is_dir():
        return
    now = time.time()
    for entry in parent.iterdir():
        if entry.name.startswith(STAGING_PREFIX):
            last_used, limit = entry.stat().st_mtime, 86_400
        elif (entry / marker).exists():
            last_used, limit = (entry / marker).stat().st_mtime, UNUSED_DAYS * 86_400
        else:
            continue
        if now - last_used > limit:
            shutil.rmtree(entry, ignore_errors=True)  # a process still mapping its files keeps reading them
