"""The whole study in one command: for each ε of a sweep, train → merge → generate → evaluate,
then one report (privacy–utility trade-off) locally and to W&B. With `audit:` a second, small
pipeline (synthetic_count 0: train → merge → exposure and MIA) runs into output_dir/audit and its
table joins the report.

    dpnotes pipeline --config dpnotes/study/configs/pipeline_demo.yaml
    dpnotes pipeline --config dpnotes/study/configs/pipeline_demo.yaml --only train --epsilon 8
    python -m dpnotes.study.pipeline --config dpnotes/study/configs/pipeline_demo.yaml train.privacy.steps=6

Every stage writes its outputs with the hash of what determined them and is skipped when they
exist for the same hash; training resumes from its last checkpoint (same ε accounting), and
generation resumes without duplicates. With `launcher:` set, training runs under
`accelerate launch --config_file LAUNCHER` (multi-GPU / multi-node).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dpnotes.config import Origin, as_dict, build, command_parser, merge, read_with_overrides, read_yaml
from dpnotes.console import command
from dpnotes import CHECKOUT
from dpnotes.digests import digest, source_digest
from dpnotes.caches import corpus_cache
from dpnotes.corpus import Note, load_configured_splits
from dpnotes.corpus.code_lists import public_label_space
from dpnotes.prompting import label_titles, prompt_format_from
from dpnotes.evaluation.dp_sweep import DPCoderKind, DPCoderSettings
from dpnotes.evaluation.dp_sweep import format_epsilon
from dpnotes.evaluation.dp_linear import FrozenEncoderFeatures
from dpnotes.evaluation.references import prompt_only_coder
from dpnotes.evaluation.stages import dp_coder_baseline, evaluate_generator, real_coder_baseline
from dpnotes.generation.backends import resolve_backend
from dpnotes.generation.merge import merge_run
from dpnotes.generation.synthesize import CONDITIONING, GenerationConfig, conditioning_for, read_done, synthesize
from dpnotes.runs import AUDIT_DIR, MANIFEST, NOTES, PRIVACY_REPORT, RunDir, epsilon_tag, load_synthetic
from dpnotes.study.report import write_report
from dpnotes.training.config import TrainConfig
from dpnotes.training.recipe import train
from dpnotes.errors import UserError

ROOT = CHECKOUT  # recipe scripts and their configs
STAGES = ("train", "merge", "generate", "evaluate", "baselines", "audit", "report")


@dataclass
class PipelineConfig:
    output_dir: str = "runs/demo"
    train_config: str = "train/configs/demo_smollm2.yaml"  # relative paths: to the checkout if not found here
    train: dict = field(default_factory=dict)  # settings over train_config's, e.g. {privacy: {steps: 12}}
    epsilons: list[float] = field(default_factory=lambda: [8.0, math.inf])
    launcher: str | None = None  # accelerate config file for multi-process training
    # Synthetic notes per ε: synthetic_count, else synthetic_per_label × the public label space (a coder
    # needs examples of every label; CMC-2007 has 45 codes, the default corpus 21). synthetic_count 0:
    # no generation, and the evaluation is exposure and MIA only (a memorisation audit).
    synthetic_count: int | None = None
    synthetic_per_label: int = 10
    # The settings of `dpnotes generate` (conditioning: dp-marginals, dp-histogram for whole code sets
    # on large corpora, or prior with prior_path).
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    mia_notes: int = 100  # members and as many non-members
    canary_candidates: int = 500
    bootstrap: int = 200
    # DP coders trained on the real notes: kinds of evaluation.dp_sweep.DP_CODERS ("hashed",
    # "probe", "lora"), each at dp_coder_epsilons (None: the generator's epsilons).
    dp_coders: list[DPCoderKind] = field(default_factory=lambda: ["hashed"])
    dp_coder_epsilons: list[float] | None = None
    # coder kind -> its settings, named as in `dpnotes eval dp-classifier` (unset: the coder's defaults)
    dp_coder_options: dict[str, DPCoderSettings] = field(default_factory=dict)
    dp_coder_labels: str | None = None  # public label list (name or file); None: the corpus kind's public list
    # Trainings of each DP coder per finite ε, each with its own secret seeds. The first is the reported
    # coder; the others measure how far the DP noise alone moves its F1 (on CMC-2007's train partitions one
    # training's ε = 10 gap moved by ~0.035), and a target on a gap is judged on their mean. ε = ∞ is trained once:
    # it adds no noise (with full batches, as on the small corpora, it has no randomness at all).
    dp_coder_draws: int = 1
    report_to: str = "wandb"
    # A memorisation audit shown with this study: a pipeline config (a small corpus seen many times,
    # synthetic_count 0) run into output_dir/audit, whose exposure table this report repeats. The
    # study's own runs see each patient a few times at most: their exposure cannot show what DP prevents.
    audit: str | None = None

    @property
    def generates(self) -> bool:
        """False for a memorisation audit (synthetic_count 0): no notes, exposure and MIA only."""
        return self.synthetic_count != 0


CODER_MODULES = ("dpnotes.evaluation.coders", "dpnotes.evaluation.metrics")
DP_CODER_MODULES = CODER_MODULES + ("dpnotes.evaluation.dp_sweep", "dpnotes.evaluation.dp_classifier", "dpnotes.evaluation.dp_linear", "dpnotes.privacy.engine",
                                    "dpnotes.privacy.accounting")


EVALUATION_MODULES = CODER_MODULES + ("dpnotes.evaluation.stages", "dpnotes.evaluation.leakage", "dpnotes.evaluation.fidelity")
STEERING_MODULES = ("dpnotes.generation.backends", "dpnotes.generation.synthesize")  # which tokens term_bias steers
GENERATION_INPUTS = "inputs.json"  # in each synthetic/ folder: the key of what its notes were made from
RELEASE_INPUTS = frozenset({"training", "conditioning", "conditioning_epsilon", "prior"})  # what the code-set release depends on


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Pipeline:
    def __init__(self, config: PipelineConfig):
        self.config = config
        self.root = Path(config.output_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- per-ε configuration -------------------------------------------------------------------
    def train_config(self, epsilon: float) -> TrainConfig:
        path = train_config_path(self.config)
        per_epsilon = {"privacy": {"target_epsilon": epsilon}, "output_dir": str(self.run_dir(epsilon).root),
                       "report_to": self.config.report_to}
        return build(TrainConfig, merge(read_yaml(path), self.config.train, per_epsilon), str(path))

    def run_dir(self, epsilon: float) -> RunDir:
        return RunDir(self.root / epsilon_tag(epsilon))

    @functools.cached_property
    def splits(self) -> dict[str, list[Note]]:
        """The corpus split once per run (every ε shares it; a large corpus is read once)."""
        config = self.train_config(self.config.epsilons[0])
        return load_configured_splits(config.corpus, default_patients=config.corpus_patients,
                                      canaries=config.canaries, seed=config.split_seed, cache=corpus_cache())

    @functools.cached_property
    def labels(self) -> list[str]:
        """The public label space of the corpus (never the codes found in its notes)."""
        return public_label_space(self.config.dp_coder_labels, self.train_config(self.config.epsilons[0]).corpus)

    @functools.cached_property
    def titles(self) -> dict[str, str]:
        """The public titles of the labels (the DP linear coders start from them)."""
        return label_titles(self.labels, self.train_config(self.config.epsilons[0]).corpus)

    @property
    def synthetic_count(self) -> int:
        if self.config.synthetic_count is not None:
            return self.config.synthetic_count
        return self.config.synthetic_per_label * len(self.labels)

    # ---- stages ----------------------------------------------------------------------------------
    def train(self, epsilon: float) -> dict:
        config = self.train_config(epsilon)
        report = read_json(self.run_dir(epsilon).privacy_report)
        if report and report.get("config_hash") == config.fingerprint():
            log(f"train {epsilon_tag(epsilon)}: done (ε = {report['epsilon']:.4g}), skipped")
            return report
        log(f"train {epsilon_tag(epsilon)}: DP fine-tuning to target ε = {epsilon}")
        if self.config.launcher:
            config_file = self.run_dir(epsilon).root / "train_config.yaml"
            config_file.parent.mkdir(parents=True, exist_ok=True)
            config_file.write_text(yaml.safe_dump(as_dict(config)))
            launched = subprocess.run(["accelerate", "launch", "--config_file", self.config.launcher,
                                       str(ROOT / "train" / "dp_lora.py"), "--config", str(config_file)])
            if launched.returncode != 0:  # its own error line is above
                raise UserError(f"training for ε = {epsilon} under {self.config.launcher} failed (exit {launched.returncode})")
            return read_json(self.run_dir(epsilon).privacy_report)
        return train(config)

    def merge(self, epsilon: float) -> Path:
        run = self.run_dir(epsilon)
        merged = run.merged
        if read_json(merged / PRIVACY_REPORT) == read_json(run.privacy_report):
            log(f"merge {epsilon_tag(epsilon)}: done, skipped")
            return merged
        log(f"merge {epsilon_tag(epsilon)}: LoRA → {merged}")
        return merge_run(run.root, merged)

    def generation_inputs(self, epsilon: float) -> dict:
        """What the synthetic notes of ε depend on: the trained weights, the conditioning release,
        sampling and the backend (each writes other notes). A change regenerates them."""
        g = self.config.generation
        trained = read_json(self.run_dir(epsilon).privacy_report) or {}
        backend = resolve_backend(g.backend)
        prior = Path(g.prior_path) if g.prior_path else None
        return {"training": trained.get("config_hash"), "count": self.synthetic_count,
                "conditioning": g.conditioning, "conditioning_epsilon": g.conditioning_epsilon,
                "prior": hashlib.sha256(prior.read_bytes()).hexdigest() if prior and g.conditioning == "prior" else None,
                "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "term_bias": g.term_bias,
                "frequency_penalty": g.frequency_penalty,
                "steering": source_digest(*STEERING_MODULES) if g.term_bias else None,
                "title_steering": g.title_steering if g.term_bias else None, "backend": backend,
                # transformers seeds each batch, so its notes depend on the batch size; vLLM seeds each note
                "batch_size": g.batch_size if backend == "transformers" else None}

    def generate(self, epsilon: float) -> dict:

        g = self.config.generation
        out = self.run_dir(epsilon).synthetic
        inputs = self.generation_inputs(epsilon)
        key = digest(inputs)
        recorded = read_json(out / GENERATION_INPUTS)
        release = None
        if recorded and recorded["key"] == key:
            manifest = read_json(out / MANIFEST)
            if manifest and len(read_done(out / NOTES)) == inputs["count"]:
                log(f"generate {epsilon_tag(epsilon)}: done, skipped")
                return manifest
        elif out.exists():  # other inputs (or a folder from before keys): its notes are stale
            changed = sorted(k for k in inputs if (recorded or {}).get("inputs", {}).get(k) != inputs[k])
            # A new count or sampling reuses the code-set release: a second DP release would spend its ε again.
            if RELEASE_INPUTS.isdisjoint(changed) and (out / CONDITIONING).exists():
                release = (out / CONDITIONING).read_bytes()
            log(f"generate {epsilon_tag(epsilon)}: inputs changed ({', '.join(changed)}), regenerating"
                + (" from the same code-set release" if release else ""))
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if release:
            (out / CONDITIONING).write_bytes(release)
        (out / GENERATION_INPUTS).write_text(json.dumps({"key": key, "inputs": inputs}, indent=2))
        train_notes = self.splits["train"] if g.conditioning != "prior" else None
        unit = (read_json(self.run_dir(epsilon).privacy_report) or {}).get("privacy_unit")
        # The conditioning is released at the training unit.
        distribution = conditioning_for(out, g.conditioning, train_notes, g.conditioning_epsilon, None,
                                        Path(g.prior_path) if g.prior_path else None, None, privacy_unit=unit)
        log(f"generate {epsilon_tag(epsilon)}: {inputs['count']} notes with {inputs['backend']}")
        options = dict(g.backend_options)
        if inputs["backend"] == "vllm-server" and "url" not in options:
            options.setdefault("server_log", str(out / "vllm_server.log"))  # kept beside the notes it wrote
        return synthesize(self.run_dir(epsilon).merged, out, inputs["count"], distribution, inputs["backend"],
                          g.sampling(), seed=0, backend_options=options)

    def evaluate(self, epsilon: float) -> dict:
        run = self.run_dir(epsilon)
        c, train = self.config, self.train_config(epsilon)
        # The notes (through their generation key), the data split, the evaluation's own settings and code.
        # An audit has no notes: the trained model enters through its training key.
        model_key = (read_json(run.synthetic / GENERATION_INPUTS)["key"] if c.generates
                     else read_json(run.privacy_report)["config_hash"])
        key = digest(model_key,
                     (train.corpus, train.corpus_patients, train.canaries, train.split_seed),
                     c.mia_notes, c.canary_candidates, c.bootstrap, source_digest(*EVALUATION_MODULES))
        done = read_json(run.evaluation)
        if done and done.get("inputs_hash") == key:
            log(f"evaluate {epsilon_tag(epsilon)}: done, skipped")
            return done
        log(f"evaluate {epsilon_tag(epsilon)}: " + ("coders on synthetic vs real, exposure, MIA, leakage, fidelity"
                                                    if c.generates else "exposure and MIA (no synthetic notes)"))
        result = evaluate_generator(run, self.splits, self.config)
        result["inputs_hash"] = key
        run.evaluation.write_text(json.dumps(result, indent=2, default=str))
        return result

    def baselines(self) -> dict:
        """The coder on real notes, and each DP coder at each ε: one file per result, so an interrupted
        run resumes at the next missing one."""

        c, train = self.config, self.train_config(self.config.epsilons[0])
        data_key = (train.corpus, train.corpus_patients, train.canaries, train.split_seed, c.bootstrap)
        folder = self.root / "baselines"
        folder.mkdir(exist_ok=True)
        computed = []

        def cached(name: str, key: str, compute) -> dict:
            done = read_json(folder / f"{name}.json")
            if done and done.get("inputs_hash") == key:
                return done
            log(f"baselines: {name}")
            computed.append(name)
            result = {**compute(), "inputs_hash": key}
            (folder / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
            return result

        coder_code, dp_coder_code = source_digest(*CODER_MODULES), source_digest(*DP_CODER_MODULES)
        result = {"real_tfidf": cached("real_tfidf", digest(data_key, coder_code),
                                       lambda: real_coder_baseline(self.splits, c.bootstrap))}
        if c.generates:
            result["prompt_only"] = self._prompt_only(cached, data_key)
        sweeps = {}
        for coder in c.dp_coders:
            options = c.dp_coder_options.get(coder, DPCoderSettings()).coder_options(coder)
            # The feature cache goes to the computation only, not into the results' key: where the
            # features are kept changes no result.
            computing = {**options, **self._feature_cache(coder, options, folder)}
            by_epsilon, draws = {}, {}
            for epsilon in c.dp_coder_epsilons or c.epsilons:
                tag = format_epsilon(epsilon)
                key = digest(data_key, coder, epsilon, options, self.labels, self.titles, dp_coder_code)

                def train_once() -> dict:
                    return dp_coder_baseline(self.splits, self.labels, self.titles, coder, epsilon, c.bootstrap, computing)

                by_epsilon[tag] = cached(f"dp_{coder}_eps_{tag}", key, train_once)
                if c.dp_coder_draws > 1 and epsilon != math.inf:
                    more = [cached(f"dp_{coder}_eps_{tag}_draw_{k}", digest(key, k), train_once)
                            for k in range(2, c.dp_coder_draws + 1)]
                    draws[tag] = [r["metrics"]["weighted_f1"] for r in (by_epsilon[tag], *more)]
            sweeps[coder] = {"by_epsilon": by_epsilon,
                             "weighted_f1": {tag: r["metrics"]["weighted_f1"] for tag, r in by_epsilon.items()}}
            if draws:
                sweeps[coder]["weighted_f1_draws"] = draws
        if sweeps:
            result["dp_coder"] = sweeps
        if computed or not (self.root / "baselines.json").exists():
            (self.root / "baselines.json").write_text(json.dumps(result, indent=2, default=str))
        else:
            log("baselines: done, skipped")
        return result

    @staticmethod
    def _feature_cache(coder: str, options: dict, folder: Path) -> dict:
        """{"feature_cache": path} for the probe, else {}. Each ε's coder builds its own feature map, so
        without it MiniLM would encode every note once per ε (~3 min per ε on the default corpus);
        with it, once per part. The file holds features of the private notes: it stays in the run's
        baselines folder beside the other private run state. Named by the encoder's spec (model,
        max_length), so another spec gets its own file rather than the cache's refusal."""
        if coder != "probe":  # hashed n-grams are cheap, and LoRA trains its encoder
            return {}
        spec = FrozenEncoderFeatures(**{name: options[name] for name in ("model", "max_length") if name in options}).spec
        return {"feature_cache": folder / f"probe_features_{digest(spec)[:12]}.npz"}

    def _prompt_only(self, cached, data_key: tuple) -> dict:
        """Per ε with finished notes: the coder trained on those notes' code sets written as their
        prompts only, titles and the run's key terms (dpnotes/evaluation/references.py), keyed by the
        notes it stands beside."""
        code = source_digest("dpnotes.evaluation.references", *CODER_MODULES)
        by_epsilon = {}
        for epsilon in self.config.epsilons:
            run = self.run_dir(epsilon)
            recorded = read_json(run.synthetic / GENERATION_INPUTS)
            if recorded is None or len(read_done(run.synthetic / NOTES)) != recorded["inputs"]["count"]:
                continue
            keywords = prompt_format_from(read_json(run.privacy_report), str(run.root)).keywords
            by_epsilon[format_epsilon(epsilon)] = cached(
                f"prompt_only_{epsilon_tag(epsilon)}", digest(data_key, recorded["key"], self.titles, keywords, code),
                lambda: prompt_only_coder(load_synthetic(run.synthetic), self.splits, self.titles, self.config.bootstrap,
                                          keywords))
        return by_epsilon

    def audit(self) -> Path:
        """Runs (or resumes) the memorisation audit of config.audit in output_dir/audit."""
        path = resolve_config_path(self.config.audit)
        log(f"audit: memorisation audit of {path} in {self.root / AUDIT_DIR}")
        audit = load_pipeline_config(path, [f"output_dir={self.root / AUDIT_DIR}", f"report_to={self.config.report_to}"])
        return Pipeline(audit).run(terminal=False)  # this report prints its table

    def report(self, terminal: bool = True) -> Path:
        log("report: plots, tables, examples")
        return write_report(self.root, self.config, terminal)

    def run(self, only: str | None = None, epsilons: list[float] | None = None, terminal: bool = True) -> Path | None:
        generates = self.config.generates
        stages = ("train", "merge", "generate", "evaluate") if generates else ("train", "merge", "evaluate")
        for epsilon in epsilons or self.config.epsilons:
            for stage in stages:
                if only in (None, stage):
                    getattr(self, stage)(epsilon)
        if generates and only in (None, "baselines"):  # an audit trains no coder
            self.baselines()
        if self.config.audit and only in (None, "audit"):
            self.audit()
        if only in (None, "report"):
            return self.report(terminal)
        return None


def resolve_config_path(name: str) -> Path:
    """A config named relative to the working directory, else to the checkout."""
    path = Path(name)
    return path if path.exists() else ROOT / path


def train_config_path(config: PipelineConfig) -> Path:
    return resolve_config_path(config.train_config)


def pipeline_config(values: dict, origin: Origin | str) -> PipelineConfig:
    """A PipelineConfig whose training config, `train` settings and DP coder settings are checked now,
    not after hours of earlier stages."""
    config = build(PipelineConfig, values, origin)
    path = train_config_path(config)
    build(TrainConfig, read_yaml(path), str(path))
    build(TrainConfig, config.train, origin, "train.")
    for coder in {*config.dp_coders, *config.dp_coder_options}:
        config.dp_coder_options.get(coder, DPCoderSettings()).coder_options(coder)

    def where(key: str) -> str:
        return origin.of(key) if isinstance(origin, Origin) else origin

    if config.dp_coder_draws < 1:
        raise UserError(f"{where('dp_coder_draws')}: dp_coder_draws must be ≥ 1, got {config.dp_coder_draws}")
    if config.synthetic_count is not None and config.synthetic_count < 0:
        raise UserError(f"{where('synthetic_count')}: synthetic_count must be ≥ 0 (0: an audit, no notes), got {config.synthetic_count}")
    if config.synthetic_per_label < 1:
        raise UserError(f"{where('synthetic_per_label')}: synthetic_per_label must be ≥ 1, got {config.synthetic_per_label}")
    if config.audit:
        path = resolve_config_path(config.audit)
        if not path.is_file():
            raise UserError(f"{where('audit')}: audit: no pipeline config at {config.audit}")
        values, audit_origin = read_with_overrides(path, [])
        if values.get("audit"):  # checked before loading it: a cycle would recurse
            raise UserError(f"{path}: an audit config cannot name an audit of its own (audit: null)")
        audit = pipeline_config(values, audit_origin)
        if audit.generates:
            raise UserError(f"{path}: an audit config writes no notes (synthetic_count: 0)")
    return config


def load_pipeline_config(path: str | Path | None, overrides: list[str] = ()) -> PipelineConfig:
    return pipeline_config(*read_with_overrides(path, overrides))


@command
def main(argv: list[str]) -> None:
    parser = command_parser(PipelineConfig, __doc__, ROOT / "dpnotes" / "study" / "configs" / "pipeline_demo.yaml",
                            prog="dpnotes pipeline")
    parser.add_argument("--only", choices=STAGES, help="run one stage")
    parser.add_argument("--epsilon", type=float, action="append", help="restrict to these ε (repeatable)")
    args = parser.parse_intermixed_args(argv)
    report = Pipeline(load_pipeline_config(args.config, args.overrides)).run(args.only, args.epsilon)
    if report:
        print(f"\nreport: {report}")


if __name__ == "__main__":
    main()
