"""The codes → note prompt format shared by training and generation.

Control codes come first so that generation can condition on them; training masks the prompt
out of the loss, so the model learns p(note | codes) and never spends privacy budget on
learning the (private) code distribution itself.
"""
from __future__ import annotations

from typing import Sequence

CODES_PREFIX = "Codes: "
NOTE_HEADER = "\nNote:\n"


def note_prompt(codes: Sequence[str]) -> str:
    return f"{CODES_PREFIX}{'; '.join(codes)}{NOTE_HEADER}"


def codes_from_prompt(prompt: str) -> list[str]:
    if not prompt.startswith(CODES_PREFIX) or NOTE_HEADER not in prompt:
        raise ValueError("not a dpnotes prompt: expected 'Codes: ...\\nNote:\\n'")
    listed = prompt[len(CODES_PREFIX) : prompt.index(NOTE_HEADER)]
    return [code for code in listed.split("; ") if code]
