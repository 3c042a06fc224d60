r"""Generate synthetic notes conditioned on code sets, as JSONL in the corpus schema + a manifest.

    dpnotes generate --config generate/configs/demo.yaml model=runs/demo/eps_8/merged \
        run_dir=runs/demo/eps_8 output_dir=runs/demo/eps_8/synthetic count=200 conditioning_epsilon=1

Resumable: notes already in OUT/notes.jsonl are kept and only missing indices are generated; the
released code-set distribution is saved once (OUT/conditioning.json) so resuming never spends its
budget again.

The code statistics are released at the training run's privacy unit (`privacy_unit` of its
privacy_report.json), and the manifest adds the two guarantees (basic composition) only at one
common unit: a conditioning released at another unit than the training is refused before anything
is generated. A prior costs nothing and goes with any unit.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from dpnotes.config import command_parser, load
from dpnotes.console import command
from dpnotes.corpus import Note
from dpnotes.generation.backends import SamplingConfig, chunk_size, make_backend, resolve_backend, term_logit_bias
from dpnotes.generation.conditioning import (
    PRIVACY_UNITS,
    CodeSetDistribution,
    check_privacy_unit,
    count_units,
    dp_code_marginals,
    dp_code_set_histogram,
    prior_distribution,
)
from dpnotes.errors import UserError
from dpnotes.privacy.keywords import words_of
from dpnotes.prompting import PromptFormat, key_terms, prompt_format_from, public_title
from dpnotes.runs import MANIFEST, NOTES, PRIVACY_REPORT, RunDir

CONDITIONING = "conditioning.json"
SAMPLED_WITH = "sampled_with.json"  # how the notes in a folder were sampled: a resume must sample the same way
DP_RELEASES = {"dp-histogram": dp_code_set_histogram, "dp-marginals": dp_code_marginals}


def training_report(*folders: Path | None) -> dict:
    """The privacy report of the first folder (merged model, training run) that has one; {} if none."""
    for folder in folders:
        if folder is not None and (Path(folder) / PRIVACY_REPORT).exists():
            return json.loads((Path(folder) / PRIVACY_REPORT).read_text())
    return {}


def conditioning_for(out_dir: Path, source: str, train_notes: list[Note] | None, epsilon: float, delta: float | None,
                     prior: Path | None, seed: int | None, *, privacy_unit: str | None) -> CodeSetDistribution:
    """The code-set distribution saved in out_dir, else a new release: a DP one at `privacy_unit`
    (the training run's unit; δ defaults to 1/(10·N) with N units of that kind), or a prior."""
    saved = out_dir / CONDITIONING
    if saved.exists():
        distribution = CodeSetDistribution.load(saved)
        if not distribution.free and distribution.privacy_unit != privacy_unit:
            raise UserError(
                f"{saved} was released at privacy unit {distribution.privacy_unit!r}, not at the training unit "
                f"{privacy_unit!r}: guarantees of different units cannot be added; use another output_dir"
            )
        return distribution
    if source == "prior":
        if prior is None:
            raise UserError("conditioning prior needs prior_path (a JSON code-set distribution)")
        distribution = prior_distribution(prior)
    elif source in DP_RELEASES:
        if not train_notes:
            raise UserError(f"conditioning {source} needs the training notes (run_dir)")
        if privacy_unit is None:
            raise UserError(f"conditioning {source} is released at the training run's privacy unit, and none was "
                             f"given (its {PRIVACY_REPORT} records none)")
        check_privacy_unit(privacy_unit)
        units = count_units(train_notes, privacy_unit)
        distribution = DP_RELEASES[source](train_notes, epsilon, delta or 1 / (10 * units), seed=seed,
                                           privacy_unit=privacy_unit)
    else:
        raise UserError(f"unknown conditioning {source!r}: {', '.join(DP_RELEASES)} or prior")
    out_dir.mkdir(parents=True, exist_ok=True)
    distribution.save(saved)
    return distribution


# Words of ICD titles that name no condition (laterality, encounter, specificity) and steer notes off it.
TITLE_FILLER = frozenset({"unspecified", "specified", "unsp", "type", "site", "right", "left", "encounter",
                          "initial", "subsequent", "sequela", "general"})


def title_terms(system: str, code: str) -> set[str]:
    """The words of `code`'s public title that name its condition: what follows "without" names an
    absence ("without abnormal findings"), and filler words name none."""
    title = (public_title(system, code) or "").lower().split(" without ")[0]
    return words_of(title) - TITLE_FILLER


def steering_terms(prompt: PromptFormat, codes: list[str], every_title: bool = False) -> list[str]:
    """The words a note for `codes` is steered towards (`SamplingConfig.term_bias`): the prompt's key
    terms, and the condition words of the public title of each code that got none (of every code with
    `every_title`). Both are in the prompt."""
    keywords = prompt.keywords or {}
    terms = key_terms(keywords, codes)
    for code in codes:
        if every_title or not keywords.get(code):
            terms += sorted(title_terms(prompt.code_system, code) - set(terms))
    return terms


def check_same_sampling(out_dir: Path, settings: dict, has_notes: bool) -> None:
    """Refuse to add notes to a folder whose notes were sampled otherwise (another temperature,
    steering, prompt, seed or backend): the set would mix two generators' outputs."""
    saved = out_dir / SAMPLED_WITH
    if has_notes and saved.exists():
        before = json.loads(saved.read_text())
        changed = sorted(key for key in {*before, *settings} if before.get(key) != settings.get(key))
        if changed:
            raise UserError(f"{out_dir} holds notes sampled with other settings ({', '.join(changed)}): "
                            f"use another output_dir, or remove it to start over")
    saved.write_text(json.dumps(settings, indent=2))


def read_done(path: Path) -> dict[int, dict]:
    """Notes already written, by index; a torn last line (crash mid-write) is dropped."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["metadata"]["index"]] = record
    return done


def compose(training: dict, distribution: CodeSetDistribution) -> dict:
    """Total (ε, δ) of the training run (weights and its key terms) + conditioning by basic
    composition, at their common privacy unit.

    Raises ValueError when both are DP guarantees of different (or unknown) units: they bound
    different neighbouring relations and are never added. Without a training report the weights
    carry no guarantee (ε = ∞ at every unit, δ undefined).
    """
    unit = training.get("privacy_unit")
    if not training:
        return {"privacy_unit": None, "total_epsilon": math.inf, "total_delta": None}
    # A run's own releases (its key terms) are in its total; reports from before them have none.
    run_epsilon = training.get("total_epsilon", training.get("epsilon", math.inf))
    run_delta = training.get("total_delta", training.get("delta"))
    if distribution.free:
        return {"privacy_unit": unit, "total_epsilon": run_epsilon, "total_delta": run_delta}
    if distribution.privacy_unit != unit:
        raise UserError(
            f"the conditioning ({distribution.source}) was released at privacy unit {distribution.privacy_unit!r} "
            f"but the model was trained at {unit!r}: guarantees of different units cannot be added; release the "
            f"conditioning at the training unit"
        )
    return {"privacy_unit": unit, "total_epsilon": run_epsilon + distribution.epsilon,
            "total_delta": (run_delta or 0.0) + distribution.delta}


def synthesize(
    model_dir: Path,
    out_dir: Path,
    count: int,
    distribution: CodeSetDistribution,
    backend: str = "transformers",
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    backend_options: dict | None = None,
    run_dir: Path | None = None,
    prompt: PromptFormat | None = None,
) -> dict:
    """Generate `count` notes into out_dir. The training guarantee is read from model_dir's
    privacy report, else from the training run_dir's (the same report the conditioning unit came from);
    so is the prompt format, unless `prompt` is given (a model that was never trained by dpnotes)."""
    from transformers import AutoTokenizer

    sampling = sampling or SamplingConfig()
    training = training_report(model_dir, run_dir)
    total = compose(training, distribution)  # refuses mismatched units before anything is generated
    prompt = prompt or prompt_format_from(training, f"the model in {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    code_sets = distribution.sample(count, seed)
    notes_path = out_dir / NOTES
    done = read_done(notes_path)
    # transformers seeds each batch, so its notes depend on the batch size; vLLM seeds each note
    sampled = {k: v for k, v in asdict(sampling).items() if k != "batch_size" or backend == "transformers"}
    check_same_sampling(out_dir, {"sampling": sampled, "seed": seed, "backend": backend,
                                  "prompt_format": prompt.to_dict()}, bool(done))
    notes_path.write_text("".join(json.dumps(done[i]) + "\n" for i in sorted(done)))  # rewrite without a torn line
    step = chunk_size(backend, sampling)
    todo = [start for start in range(0, count, step) if any(i not in done for i in range(start, min(start + step, count)))]
    engine = make_backend(backend, str(model_dir), **(backend_options or {})) if todo else None
    start_time, new_tokens, written = time.perf_counter(), 0, 0
    with notes_path.open("a") as sink, tqdm(total=count, initial=len(done), desc="synthetic notes", unit="note") as bar:
        try:
            for start in todo:
                indices = [i for i in range(start, min(start + step, count)) if i not in done]
                chunk = range(start, min(start + step, count))
                prompts = [prompt.render(code_sets[i], tokenizer) for i in chunk]
                every_title = sampling.title_steering == "every_code"
                biases = ([term_logit_bias(tokenizer, steering_terms(prompt, code_sets[i], every_title), sampling.term_bias)
                           for i in chunk] if sampling.term_bias else None)
                outputs = engine.generate(prompts, start, seed, sampling, biases)
                for index in indices:
                    output = outputs[index - start]
                    note = Note(f"syn-{index:06d}", f"syn-{index:06d}", output.text, code_sets[index],
                                {"index": index, "seed": seed, "backend": backend, "new_tokens": output.new_tokens})
                    sink.write(json.dumps(asdict(note)) + "\n")
                    sink.flush()
                    new_tokens += output.new_tokens
                    written += 1
                    bar.update(1)
        finally:
            if engine is not None:
                engine.close()  # a server the backend started stops here, also on an error
    elapsed = time.perf_counter() - start_time
    manifest = {
        "model": str(model_dir),
        "backend": backend,
        "count": count,
        "written_this_run": written,
        "seed": seed,
        "sampling": asdict(sampling),
        "prompt_format": prompt.to_dict(),
        "seconds": elapsed,
        "new_tokens": new_tokens,
        "tokens_per_second": new_tokens / elapsed if elapsed > 0 and new_tokens else None,
        "conditioning": {"source": distribution.source, "epsilon": distribution.epsilon, "delta": distribution.delta,
                         "noise_std": distribution.noise_std, "threshold": distribution.threshold,
                         "released_code_sets": len(distribution.weights), "privacy_unit": distribution.privacy_unit},
        "training": {k: training.get(k) for k in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                                                  "privacy_unit", "privacy_units", "config_hash")},
        **total,  # privacy_unit, total_epsilon, total_delta: basic composition at one common unit
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


@dataclass
class GenerationConfig:
    """How notes are generated; also the `generation:` section of a pipeline config."""

    conditioning: Literal["dp-marginals", "dp-histogram", "prior"] = "dp-marginals"
    conditioning_epsilon: float = 1.0
    prior_path: str | None = None  # conditioning: prior (a public code-set distribution, JSON)
    max_new_tokens: int = 256
    temperature: float = 0.8
    term_bias: float = 0.0  # logit bias towards the key terms of each note's prompt (SamplingConfig.term_bias)
    title_steering: Literal["codes_without_terms", "every_code"] = "codes_without_terms"  # SamplingConfig.title_steering
    frequency_penalty: float = 0.0  # SamplingConfig.frequency_penalty
    batch_size: int = 16  # transformers backend; vLLM schedules by itself
    # auto: the vLLM server when `make vllm` built its environment, else transformers.
    backend: Literal["auto", "transformers", "vllm", "vllm-server"] = "auto"
    # Keyword options of the backend (vllm-server: url, concurrency, port, dtype, adapter_dir,
    # max_lora_rank, tensor_parallel_size, enforce_eager, ...).
    backend_options: dict = field(default_factory=dict)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, batch_size=self.batch_size,
                              term_bias=self.term_bias, title_steering=self.title_steering,
                              frequency_penalty=self.frequency_penalty)


@dataclass(kw_only=True)
class SynthesizeConfig(GenerationConfig):
    model: str  # a merged model folder (dpnotes merge)
    output_dir: str
    run_dir: str | None = None  # the training output_dir: its training notes feed a DP release
    count: int = 100
    conditioning_delta: float | None = None  # None: 1 / (10 · privacy units)
    seed: int = 0


def _training_notes(config: SynthesizeConfig, unit: str | None) -> list[Note] | None:
    """The notes a DP conditioning release is computed from (None for a prior)."""
    if config.conditioning == "prior":
        return None
    if config.run_dir is None:
        raise UserError(f"conditioning {config.conditioning} needs run_dir (the training output_dir)")
    if unit not in PRIVACY_UNITS:
        raise UserError(f"conditioning {config.conditioning} is released at the training privacy unit, but "
                        f"{config.model}/{PRIVACY_REPORT} (or the run's) records none")
    return RunDir(Path(config.run_dir)).training_notes()


@command
def main(argv: list[str]) -> None:
    args = command_parser(SynthesizeConfig, __doc__, prog="dpnotes generate").parse_intermixed_args(argv)
    config = load(SynthesizeConfig, args.config, args.overrides)
    model, out = Path(config.model), Path(config.output_dir)
    run_dir = Path(config.run_dir) if config.run_dir else None
    unit = training_report(model, run_dir).get("privacy_unit")
    distribution = conditioning_for(out, config.conditioning, _training_notes(config, unit), config.conditioning_epsilon,
                                    config.conditioning_delta, Path(config.prior_path) if config.prior_path else None,
                                    None, privacy_unit=unit)
    manifest = synthesize(model, out, config.count, distribution, resolve_backend(config.backend), config.sampling(),
                          config.seed, backend_options=config.backend_options, run_dir=run_dir)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
