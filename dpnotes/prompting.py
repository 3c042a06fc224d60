"""The codes → note prompt, one format for training, generation and the privacy evaluation.

The prompt carries public knowledge only, so it costs no ε: the kind of document a corpus holds
(from the corpus's public description) and the titles its code system gives the note's codes
(ICD-10-CM from `simple_icd_10_cm`, ICD-9-CM from the CMS list shipped in dpnotes/corpus/data, a
specialty its name and scope from dpnotes/corpus/data/specialty_scopes.tsv). It is an instruction in
the model's chat template when the model has one: the pretrained model then already writes a
plausible note from it, and DP fine-tuning only has to nudge it towards the corpus (Li et al. 2021;
Yue et al. 2023 — bare "Codes: I10" prompts left a 135M model writing off-topic text). Training
masks the prompt out of the loss, so the model learns p(note | codes) and spends no budget on the
(private) code distribution, which is released separately (dpnotes/generation/conditioning.py).

A run may add key terms per code (`keywords`): words of a public vocabulary that the notes of each code
use, released with DP by the training run (dpnotes/privacy/keywords.py) and recorded in its format, so
that generation prompts with exactly the terms training did. Their (ε, δ) is in the run's report.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources

from dpnotes.corpus.code_lists import corpus_kind

IGNORE_INDEX = -100  # the label of prompt and padding tokens: no loss, no gradient

CODE_SYSTEMS = ("icd10cm", "icd9cm", "icd", "specialty", "none")  # "icd": ICD-10-CM, else ICD-9-CM (MIMIC-IV)
PLAIN_NOTE_HEADER = "\nNote:\n"  # ends the prompt of a model without a chat template
SYSTEM_MESSAGE = "You are a physician who writes realistic, concise clinical documentation."


def _shipped_tsv(name: str) -> dict[str, str]:
    text = resources.files("dpnotes.corpus").joinpath("data", name).read_text(encoding="utf-8")
    rows = (line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in rows}


@functools.cache
def _icd9_titles() -> dict[str, str]:
    return _shipped_tsv("icd9cm_titles.tsv")


@functools.cache
def _specialty_scopes() -> dict[str, str]:
    return _shipped_tsv("specialty_scopes.tsv")


def _icd10_title(code: str) -> str | None:
    import simple_icd_10_cm as icd10

    return icd10.get_description(code) if icd10.is_valid_item(code) else None


def public_title(system: str, code: str) -> str | None:
    """The title `system` gives `code`, or None when it has none. A specialty's title is its name and,
    for the mtsamples.com categories, what the specialty covers: "Ophthalmology (eyes: cataract, …)". A
    name alone left a generator and a coder little to go on (docs/utility.md, section 3g)."""
    if system == "specialty":
        scope = _specialty_scopes().get(code)
        return f"{code} ({scope})" if scope else code
    title = None
    if system in ("icd10cm", "icd"):
        title = _icd10_title(code)
    if title is None and system in ("icd9cm", "icd"):
        title = _icd9_titles().get(code)
    return title


# Where each code system's titles come from: a change there changes every prompt of that system.
TITLE_SOURCES = {"icd10cm": ("simple-icd-10-cm",), "icd9cm": ("icd9cm_titles.tsv",),
                 "icd": ("simple-icd-10-cm", "icd9cm_titles.tsv"), "specialty": ("specialty_scopes.tsv",), "none": ()}


def title_source_digest(system: str) -> str:
    """Digest of the title sources of `system` (the shipped tables' bytes, the ICD-10-CM package's
    version): a part of what a trained run depends on that its settings do not show."""
    parts = [importlib.metadata.version(source) if not source.endswith(".tsv")
             else hashlib.sha256(resources.files("dpnotes.corpus").joinpath("data", source).read_bytes()).hexdigest()
             for source in TITLE_SOURCES[system]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def code_title(system: str, code: str) -> str:
    """`code` as a prompt names it: "title (code)", a specialty's title (which starts with its name), or
    the bare code when the system has no title for it."""
    title = public_title(system, code)
    if title is None:
        return code
    return title if system == "specialty" else f"{title} ({code})"


def key_terms(keywords: Mapping[str, Sequence[str]], codes: Sequence[str]) -> list[str]:
    """The distinct key terms of `codes`, in code order."""
    terms: list[str] = []
    for code in codes:
        terms += [word for word in keywords.get(code, ()) if word not in terms]
    return terms


def keywords_line(keywords: Mapping[str, Sequence[str]], codes: Sequence[str]) -> str:
    return ", ".join(key_terms(keywords, codes))


@dataclass(frozen=True)
class PromptFormat:
    document: str = "clinical note"  # what the instruction asks for, e.g. "hospital discharge summary"
    code_system: str = "none"  # one of CODE_SYSTEMS: where code titles come from
    chat_template: bool = True  # phrase it in the tokenizer's chat template when there is one
    keywords: dict[str, list[str]] | None = None  # {code: key terms}, a DP release of the training run

    def __post_init__(self):
        if self.code_system not in CODE_SYSTEMS:
            raise ValueError(f"prompt code_system must be one of {CODE_SYSTEMS}, got {self.code_system!r}")

    def instruction(self, codes: Sequence[str]) -> str:
        heading = "Specialty" if self.code_system == "specialty" else "Diagnoses"
        text = f"Write a {self.document}.\n{heading}: {'; '.join(code_title(self.code_system, c) for c in codes)}"
        terms = keywords_line(self.keywords or {}, codes)
        return f"{text}\nKey terms: {terms}" if terms else text

    def render(self, codes: Sequence[str], tokenizer=None) -> str:
        """The prompt text, ending where the note begins."""
        instruction = self.instruction(codes)
        if self.chat_template and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": instruction}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return instruction + PLAIN_NOTE_HEADER

    def to_dict(self) -> dict:
        return asdict(self)

    def with_keywords(self, keywords: dict[str, list[str]]) -> PromptFormat:
        return replace(self, keywords=keywords)


# What each corpus kind holds, from the data sets' public descriptions.
CORPUS_PROMPTS = {
    "default": PromptFormat("hospital discharge summary", "icd10cm"),
    "mimic3": PromptFormat("hospital discharge summary", "icd9cm"),
    "mimic4": PromptFormat("hospital discharge summary", "icd"),
    "cmc2007": PromptFormat("pediatric radiology report with a clinical history and an impression", "icd9cm"),
    "mtsamples": PromptFormat("medical transcription report", "specialty"),
}


def prompt_format_for(corpus: str | None) -> PromptFormat:
    """The prompt format of a corpus spec (see `corpus_kind`); unknown kinds get a generic one."""
    return CORPUS_PROMPTS.get(corpus_kind(corpus), PromptFormat())


def label_titles(labels: Sequence[str], corpus: str | None) -> dict[str, str]:
    """{code: public title} for the labels the code system of `corpus`'s kind titles (none for an
    unknown kind): knowledge about the label space that costs no ε."""
    system = prompt_format_for(corpus).code_system
    titles = {code: public_title(system, code) for code in labels}
    return {code: title for code, title in titles.items() if title}


def prompt_format_from(report: dict | None, where: str = "the training run") -> PromptFormat:
    """The format a training run recorded in its privacy report: generation and the privacy
    evaluation must prompt exactly as training did."""
    recorded = (report or {}).get("prompt_format")
    if not recorded:
        raise ValueError(f"{where} recorded no prompt format (trained before formats were recorded): retrain it")
    return PromptFormat(**recorded)
