"""Notes → token ids for causal-LM training (prompt tokens masked from the loss), tokenized once.

The tokens live in an Arrow table (HF datasets): one row per note with its ids (int32) and the
length of its prompt, which is all the labels need. With a cache folder the table is written to
disk under a key of what determines it (the notes, the tokenizer, the prompt format, max_length),
and a second launch, or another rank of the same launch, memory-maps those files instead of
tokenizing again: the corpus costs page cache once per machine, not Python lists per rank.

The cache holds tokens of private notes: it is secret material, written owner-only, like the
checkpoints (docs/privacy.md).
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerBase

from dpnotes.caches import ensure_entry
from dpnotes.corpus import Note, examples_by_patient, notes_table
from dpnotes.digests import source_digest
from dpnotes.prompting import IGNORE_INDEX, PromptFormat

FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                              "prompt_length": datasets.Value("int32"), "patient_id": datasets.Value("string")})
TOKENS_FILE = "tokens.arrow"  # map with k workers writes tokens_0000i_of_0000k.arrow
UNITS_FILE = "examples_by_patient.npz"  # beside the table, written last: the patient-level privacy units


class PatientUnits(Sequence):
    """The example indices of each patient (first-appearance order), as two int arrays: indexing
    gives one patient's list; the whole map is never a Python list of lists."""

    def __init__(self, order: np.ndarray, offsets: np.ndarray):
        self.order, self.offsets = order, offsets

    @classmethod
    def of(cls, patient_ids: Sequence[str]) -> PatientUnits:
        groups = examples_by_patient(patient_ids)
        offsets = np.zeros(len(groups) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(group) for group in groups])
        order = np.fromiter((i for group in groups for i in group), dtype=np.int64, count=int(offsets[-1]))
        return cls(order, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, unit: int) -> list[int]:
        if not 0 <= unit < len(self):
            raise IndexError(unit)
        return self.order[self.offsets[unit] : self.offsets[unit + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[unit] for unit in range(len(self)))

    def capped(self, lengths: np.ndarray, max_tokens: int) -> PatientUnits:
        """Each unit keeps its examples, in order, while their tokens total at most `max_tokens`
        (`lengths[i]`: tokens of example i). Where a unit is cut depends on its own examples only,
        so the capped units are still one per patient; the first example always fits when
        `max_tokens` ≥ max_length, so no unit is emptied."""
        tokens = lengths[self.order]
        running = np.cumsum(tokens)
        before_unit = np.concatenate([[0], running])[self.offsets[:-1]]
        keep = running - np.repeat(before_unit, np.diff(self.offsets)) <= max_tokens
        kept_per_unit = np.add.reduceat(keep.astype(np.int64), self.offsets[:-1]) if len(self) else np.zeros(0, np.int64)
        return PatientUnits(self.order[keep], np.concatenate([[0], np.cumsum(kept_per_unit)]))


class TokenizedNotes:
    """prompt + text + eos of every note, truncated to max_length; only the text and eos carry loss."""

    def __init__(self, table: datasets.Dataset, pad_token_id: int, units: PatientUnits | None = None):
        self.table = table
        self.pad_token_id = pad_token_id
        self._units = units

    def __len__(self) -> int:
        return len(self.table)

    @property
    def examples_of_patient(self) -> PatientUnits:
        if self._units is None:
            self._units = PatientUnits.of(self.table["patient_id"])
        return self._units

    def lengths(self) -> np.ndarray:
        """Tokens of every example, read from the Arrow offsets (no token is copied)."""
        return pc.list_value_length(self.table.data.column("input_ids")).to_numpy()

    def example(self, index: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one note."""
        row = self.table[index]
        ids, prompt = row["input_ids"], row["prompt_length"]
        return ids, [IGNORE_INDEX] * prompt + ids[prompt:]

    def collate(self, indices: list[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Right-padded batch; padding is masked in attention and labels. Reads only these rows."""
        rows = self.table[indices] if indices else {"input_ids": [], "prompt_length": []}
        width = max((len(ids) for ids in rows["input_ids"]), default=0)
        ids = torch.full((len(indices), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, (tokens, prompt) in enumerate(zip(rows["input_ids"], rows["prompt_length"])):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, prompt : len(tokens)] = ids[row, prompt : len(tokens)]
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, prompt: PromptFormat) -> dict:
    bodies = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    prompts: dict[tuple[str, ...], list[int]] = {}  # notes share code sets: render each prompt once
    input_ids, prompt_lengths = [], []
    for codes, body in zip(batch["codes"], bodies):
        key = tuple(codes)
        if key not in prompts:
            prompts[key] = tokenizer(prompt.render(codes, tokenizer), add_special_tokens=False)["input_ids"]
        prompt_ids = prompts[key]
        input_ids.append((prompt_ids + body + [tokenizer.eos_token_id])[:max_length])
        prompt_lengths.append(min(len(prompt_ids), max_length))
    return {"input_ids": input_ids, "prompt_length": prompt_lengths, "patient_id": batch["patient_id"]}


def tokenize_notes(notes: Sequence[Note], tokenizer: PreTrainedTokenizerBase, max_length: int, prompt: PromptFormat,
                   cache: str | Path | None = None, num_proc: int | None = None) -> TokenizedNotes:
    """Tokenize by batched map (the fast tokenizer on 1,000 notes per call). With `cache`, reuse the
    table stored under the key of these notes, or build and store it there (owner-only)."""
    if cache is None:
        return _tokenize(notes_table(notes), tokenizer, max_length, prompt, num_proc)
    return load_tokenized(notes_digest(notes), lambda: notes_table(notes), tokenizer, max_length, prompt, cache, num_proc)


def load_tokenized(source_key: str, read_notes: Callable[[], datasets.Dataset], tokenizer: PreTrainedTokenizerBase,
                   max_length: int, prompt: PromptFormat, cache: str | Path, num_proc: int | None = None) -> TokenizedNotes:
    """The tokens of the notes `source_key` names, from the cache; on a miss `read_notes()` gives
    their table (its reader validates and raises the corpus's errors) and their tokens are stored.
    A re-launch reads no note."""

    def write(staging: Path) -> None:
        data = _tokenize(read_notes(), tokenizer, max_length, prompt, num_proc, output=staging / TOKENS_FILE)
        units = data.examples_of_patient
        np.savez(staging / UNITS_FILE, order=units.order, offsets=units.offsets)  # last: the entry is complete

    folder = ensure_entry(Path(cache) / tokenization_key(source_key, tokenizer, max_length, prompt), write, UNITS_FILE)
    units = np.load(folder / UNITS_FILE)
    shards = sorted(folder.glob(TOKENS_FILE.replace(".arrow", "*.arrow")))  # one per map worker
    table = datasets.concatenate_datasets([datasets.Dataset.from_file(str(shard)) for shard in shards])
    return TokenizedNotes(table, tokenizer.pad_token_id, PatientUnits(units["order"], units["offsets"]))


def _tokenize(notes: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, prompt: PromptFormat,
              num_proc: int | None, output: Path | None = None) -> TokenizedNotes:
    """Tokens of a notes table, in memory or, with `output`, written to Arrow file(s) there."""
    long_work = len(notes) >= 20_000
    workers = num_proc if num_proc is not None else (min(os.cpu_count() or 1, 8) if long_work else None)
    with progress_bar(long_work):  # ours for a large corpus; datasets' own bars stay quiet otherwise
        table = notes.map(_tokenize_batch, batched=True, batch_size=1000, num_proc=workers, features=FEATURES,
                          remove_columns=notes.column_names,
                          cache_file_name=str(output) if output else None, keep_in_memory=output is None,
                          desc="tokenizing notes (once: they are cached)",
                          fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "prompt": prompt})
    return TokenizedNotes(table, tokenizer.pad_token_id)


@contextmanager
def progress_bar(shown: bool):
    """Show datasets' progress bar inside the block iff `shown`, then restore its setting."""
    before = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if shown else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if before else datasets.disable_progress_bars)()


def notes_digest(notes: Sequence[Note]) -> str:
    """Digest of what tokenization reads of the notes: patient, text and codes, in order."""
    digest = hashlib.sha256()
    for note in notes:
        digest.update(json.dumps([note.patient_id, note.text, list(note.codes)]).encode())
    return digest.hexdigest()


def tokenization_key(source_key: str, tokenizer: PreTrainedTokenizerBase, max_length: int, prompt: PromptFormat) -> str:
    """Digest of everything the tokens depend on: their source (`notes_digest`, or the fingerprint
    of a corpus and its split), the tokenizer (its vocabulary and rules, eos and chat template), the
    prompt format and max_length."""
    digest = hashlib.sha256(source_key.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest.update(json.dumps([hashlib.sha256(vocabulary.encode()).hexdigest(), tokenizer.eos_token_id,
                              getattr(tokenizer, "chat_template", None), prompt.to_dict(), max_length,
                              source_digest("dpnotes.tokenized_notes", "dpnotes.prompting")]).encode())
    return digest.hexdigest()[:24]
