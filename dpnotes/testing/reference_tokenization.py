"""The reference tokenization: each note on its own, into Python lists (the path before the Arrow
table), for the equality test and as the in-memory side of bench/data.py."""
from __future__ import annotations

from collections.abc import Sequence

from dpnotes.corpus import Note
from dpnotes.prompting import PromptFormat
from dpnotes.prompting import IGNORE_INDEX


def tokenize_note_by_note(notes: Sequence[Note], tokenizer, max_length: int, prompt: PromptFormat) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each note: prompt + text + eos truncated to max_length, prompt masked."""
    examples = []
    for note in notes:
        prompt_ids = tokenizer(prompt.render(note.codes, tokenizer), add_special_tokens=False)["input_ids"]
        body = tokenizer(note.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(((prompt_ids + body)[:max_length], ([IGNORE_INDEX] * len(prompt_ids) + body)[:max_length]))
    return examples
