"""Notes → token ids for causal-LM training (prompt tokens masked from the loss)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from dpnotes.corpus import Note
from dpnotes.prompting import PromptFormat

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss, no gradient


@dataclass
class TokenizedNotes:
    input_ids: list[list[int]]
    labels: list[list[int]]
    patient_ids: list[str]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, indices: list[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Right-padded batch; padding is masked in attention and labels."""
        width = max((len(self.input_ids[i]) for i in indices), default=0)
        ids = torch.full((len(indices), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, index in enumerate(indices):
            length = len(self.input_ids[index])
            ids[row, :length] = torch.tensor(self.input_ids[index])
            labels[row, :length] = torch.tensor(self.labels[index])
            mask[row, :length] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def tokenize_notes(notes: list[Note], tokenizer: PreTrainedTokenizerBase, max_length: int,
                   prompt: PromptFormat) -> TokenizedNotes:
    """prompt(codes) + text + eos, truncated to max_length; only the note text and eos carry loss
    (eos is the chat template's end of turn for chat models, so generation stops where notes end)."""
    input_ids, labels = [], []
    for note in notes:
        prompt_ids = tokenizer(prompt.render(note.codes, tokenizer), add_special_tokens=False)["input_ids"]
        body = tokenizer(note.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + body)[:max_length]
        input_ids.append(ids)
        labels.append(([IGNORE_INDEX] * len(prompt_ids) + body)[:max_length])
    return TokenizedNotes(input_ids, labels, [note.patient_id for note in notes], tokenizer.pad_token_id)
