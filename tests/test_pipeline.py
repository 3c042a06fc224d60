"""The whole pipeline on a tiny LLaMA and a tiny default corpus: every stage, the report, and
re-running skips every completed stage."""
import dataclasses
import json
import math

import pytest

from dpnotes.study.pipeline import Pipeline, load_pipeline_config


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    prior = root / "prior.json"  # a public prior: the tiny corpus is too small for a DP release to keep codes
    prior.write_text(json.dumps({"I10": 3, "E11.9; I10": 2, "J44.9": 1}))
    config = load_pipeline_config(None, [
        f"output_dir={root}",
        "train_config=train/configs/tiny_test.yaml",
        f"train.model={tiny_model_dir}", "train.canaries=8", "train.privacy.seed=1",
        "epsilons=[8.0, .inf]",
        "generation.conditioning=prior", f"generation.prior_path={prior}",
        "synthetic_count=8", "generation.max_new_tokens=12", "generation.batch_size=4",
        "mia_notes=10", "canary_candidates=20", "bootstrap=20",
        "dp_coders=[]", "report_to=none",
        "generation.backend=transformers",  # the tiny model's 8-wide heads are below vLLM CPU kernels' 32
    ])
    report = Pipeline(config).run()
    return config, root, report


def test_pipeline_writes_the_report_with_each_epsilon(study):
    config, root, report = study
    assert report == root / "report.html"
    summary = json.loads((root / "report.json").read_text())
    by_target = {row["target_epsilon"]: row for row in summary["runs"]}
    assert set(by_target) == {8.0, math.inf}
    assert 0 < by_target[8.0]["epsilon_spent"] <= 8.0
    assert math.isinf(by_target[math.inf]["epsilon_spent"])
    for row in summary["runs"]:
        assert row["synthetic_micro_f1"] is not None
        assert row["mean_exposure"] is not None
        assert 0 <= row["mia_auc"] <= 1
    for name in ("f1_vs_epsilon.png", "epsilon_vs_steps.png", "privacy_vs_epsilon.png", "report.md"):
        assert (root / name).exists()
    manifest = json.loads((root / "eps_8" / "synthetic" / "manifest.json").read_text())
    unit = json.loads((root / "eps_8" / "privacy_report.json").read_text())["privacy_unit"]
    assert manifest["training"]["privacy_unit"] == manifest["privacy_unit"] == unit
    assert manifest["conditioning"]["privacy_unit"] is None  # the prior is free and has no unit
    assert by_target[8.0]["total_epsilon_with_conditioning"] == by_target[8.0]["epsilon_spent"]
    assert by_target[8.0]["privacy_unit"] == unit and "privacy_unit" in (root / "report.md").read_text()
    assert summary["baselines"]["real_tfidf"]["metrics"]["micro_f1"] > 0
    assert set(summary["baselines"]["prompt_only"]) == {"8", "inf"}  # beside each ε's notes
    assert all(row["prompt_only_micro_f1"] is not None for row in summary["runs"])


def test_rerun_skips_completed_stages(study, capsys):
    config, root, _ = study
    before = {p: p.stat().st_mtime for p in root.rglob("*.json") if "report" not in p.name}
    Pipeline(config).run()
    out = capsys.readouterr().out
    for stage in ("train", "merge", "generate", "evaluate"):
        for tag in ("eps_8", "eps_inf"):
            assert f"{stage} {tag}: done" in out
    assert "baselines: done" in out
    after = {p: p.stat().st_mtime for p in before}
    changed = [p for p in before if after[p] != before[p] and "manifest" not in p.name]
    assert not changed


def test_a_baseline_is_recomputed_when_its_code_changes(study, capsys, monkeypatch):
    """The cache key covers the coder's code (its defaults), not only the options in the config."""
    import dpnotes.study.pipeline as pipeline

    config, root, _ = study
    real_digest = pipeline.source_digest
    monkeypatch.setattr(pipeline, "source_digest", lambda *modules: "changed" + real_digest(*modules))
    Pipeline(config).run(only="baselines")
    assert "baselines: real_tfidf" in capsys.readouterr().out


def test_an_added_epsilon_runs_alone(study, capsys):
    config, _, _ = study
    Pipeline(dataclasses.replace(config, epsilons=[8.0, 4.0, math.inf])).run()
    out = capsys.readouterr().out
    assert "train eps_4: DP fine-tuning" in out and "evaluate eps_4: coders" in out
    for tag in ("eps_8", "eps_inf"):
        for stage in ("train", "merge", "generate", "evaluate"):
            assert f"{stage} {tag}: done" in out


def test_a_changed_temperature_regenerates_and_reevaluates_without_retraining(study, capsys):
    config, root, _ = study
    notes = root / "eps_8" / "synthetic" / "notes.jsonl"
    before = notes.stat().st_mtime_ns
    saved = root / "eps_8" / "synthetic" / "conditioning.json"
    marked = {**json.loads(saved.read_text()), "weights": {"I10": 1.0}}  # a release no new draw would give
    saved.write_text(json.dumps(marked))
    release = saved.read_bytes()
    generation = dataclasses.replace(config.generation, temperature=0.5)
    Pipeline(dataclasses.replace(config, generation=generation, epsilons=[8.0])).run()
    out = capsys.readouterr().out
    assert "train eps_8: done" in out and "merge eps_8: done" in out
    assert "generate eps_8: inputs changed (temperature), regenerating from the same code-set release" in out
    assert (root / "eps_8" / "synthetic" / "conditioning.json").read_bytes() == release  # not released again
    assert "evaluate eps_8: coders" in out
    assert notes.stat().st_mtime_ns != before  # rewritten (a tiny random model may sample the same words)
    manifest = json.loads((root / "eps_8" / "synthetic" / "manifest.json").read_text())
    assert manifest["sampling"]["temperature"] == 0.5


def test_the_memorisation_audit_runs_without_notes_and_joins_the_report(study, tiny_model_dir, tmp_path, capsys):
    """`audit:` runs a second pipeline (synthetic_count 0: train, merge, exposure and MIA; no
    generation) into output_dir/audit, and the study's report repeats its exposure table."""
    config, root, _ = study
    audit = tmp_path / "audit.yaml"
    audit.write_text(json.dumps({
        "train_config": "train/configs/tiny_test.yaml",
        "train": {"model": str(tiny_model_dir), "canaries": 8, "privacy": {"seed": 1, "steps": 4}},
        "epsilons": [8.0, math.inf], "synthetic_count": 0, "mia_notes": 10, "canary_candidates": 20,
        "bootstrap": 0, "dp_coders": [], "report_to": "wandb"}))  # the study's report_to (none) overrides it
    Pipeline(dataclasses.replace(config, audit=str(audit))).run()
    out = capsys.readouterr().out
    assert out.count("memorisation audit (a small corpus seen many times)") == 1  # the study's summary, not the audit's too
    assert not (root / "audit" / "baselines").exists()  # an audit trains no coder
    audit_log = out.split("audit: memorisation audit of")[1]
    assert "evaluate eps_8: exposure and MIA (no synthetic notes)" in audit_log and "generate" not in audit_log
    assert "memorisation audit" in out  # its table in the terminal summary
    for tag in ("eps_8", "eps_inf"):
        assert not (root / "audit" / tag / "synthetic").exists()
        evaluation = json.loads((root / "audit" / tag / "eval.json").read_text())
        assert evaluation["synthetic_notes"] == 0 and evaluation["coders"] == {}
        assert "exposure" in evaluation["privacy"] and "membership_inference" in evaluation["privacy"]
    assert (root / "audit" / "report.md").read_text().startswith("# dpnotes memorisation audit")
    audit_rows = json.loads((root / "audit" / "report.json").read_text())["runs"]
    assert all("no synthetic notes yet" not in r["caveats"] for r in audit_rows)  # none were asked for
    report = (root / "report.md").read_text()
    assert "## Memorisation audit" in report and "trained canaries ranked 1st (ties count)" in report
    assert "audit/privacy_vs_epsilon.png" in report and (root / "audit" / "privacy_vs_epsilon.png").exists()
    assert not list((root / "audit").glob("wandb"))

    # Another trained model is evaluated again: with no notes, the key holds the training's hash.
    audit_pipeline = Pipeline(load_pipeline_config(audit, [f"output_dir={root / 'audit'}", "report_to=none"]))
    audit_pipeline.evaluate(8.0)
    assert "evaluate eps_8: done, skipped" in capsys.readouterr().out
    report = root / "audit" / "eps_8" / "privacy_report.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "config_hash": "another training"}))
    audit_pipeline.evaluate(8.0)
    assert "evaluate eps_8: exposure and MIA" in capsys.readouterr().out


def test_bad_audit_and_count_settings_are_one_line_before_any_work(tmp_path):
    from dpnotes.errors import UserError

    with pytest.raises(UserError, match="audit: no pipeline config at nowhere.yaml"):
        load_pipeline_config(None, [f"output_dir={tmp_path}", "audit=nowhere.yaml"])
    with pytest.raises(UserError, match="synthetic_count must be ≥ 0"):
        load_pipeline_config(None, [f"output_dir={tmp_path}", "synthetic_count=-1"])
    with pytest.raises(UserError, match="synthetic_per_label must be ≥ 1"):
        load_pipeline_config(None, [f"output_dir={tmp_path}", "synthetic_per_label=0"])
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(json.dumps({"synthetic_count": 0, "audit": str(second)}))
    second.write_text(json.dumps({"synthetic_count": 0, "audit": str(first)}))
    with pytest.raises(UserError, match="cannot name an audit of its own"):  # a cycle, not a RecursionError
        load_pipeline_config(first)
    generating = tmp_path / "generating.yaml"
    generating.write_text(json.dumps({"synthetic_count": 5}))
    with pytest.raises(UserError, match="an audit config writes no notes"):
        load_pipeline_config(None, [f"output_dir={tmp_path}", f"audit={generating}"])


def test_the_probe_encodes_each_note_once_for_every_epsilon(tmp_path, monkeypatch, capsys):
    """The DP probe's features are cached in the run's baselines folder: each ε's coder reads them, and
    the cache path enters no result's key."""
    import hashlib

    import numpy as np

    import dpnotes.study.pipeline as pipeline
    from dpnotes.evaluation.dp_linear import FrozenEncoderFeatures

    encoded, keys = [], []

    def encode(self, texts):  # a stand-in for MiniLM: unit rows seeded by the text
        encoded.extend(texts)
        rows = [np.random.default_rng(list(hashlib.sha256(t.encode()).digest())).normal(size=8) for t in texts]
        return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)

    real_digest = pipeline.digest
    monkeypatch.setattr(FrozenEncoderFeatures, "_encode", encode)
    monkeypatch.setattr(pipeline, "digest", lambda *parts: keys.append(parts) or real_digest(*parts))
    config = load_pipeline_config(None, [
        f"output_dir={tmp_path}", "train_config=train/configs/tiny_test.yaml", "bootstrap=0", "report_to=none",
        "dp_coders=[probe]", "dp_coder_epsilons=[1.0, .inf]", "dp_coder_options.probe.max_length=32",
        "dp_coder_options.probe.steps=2", "dp_coder_options.probe.expected_batch_size=10000",
    ])
    first = Pipeline(config)
    result = first.baselines()
    assert set(result["dp_coder"]["probe"]["by_epsilon"]) == {"1", "inf"}
    notes = {n.text for split in first.splits.values() for n in split}
    assert len(encoded) == len(set(encoded)) and notes <= set(encoded)  # each note once, not once per ε
    assert len(list((tmp_path / "baselines").glob("probe_features_*.npz"))) == 1
    assert not any(".npz" in json.dumps(parts, default=str) for parts in keys)  # cached results stay valid
    encoded.clear()
    Pipeline(dataclasses.replace(config, dp_coder_epsilons=[1.0, 2.0])).baselines()  # a new ε, a new run
    assert "baselines: dp_probe_eps_2" in capsys.readouterr().out and encoded == []


def test_dp_coder_draws_train_each_finite_epsilon_again_and_resume(tmp_path, capsys):
    """dp_coder_draws: more trainings at each finite ε (never at ∞, which has no noise), each cached on its
    own; the first stays the reported coder, so raising the count trains only the new draws."""
    config = load_pipeline_config(None, [
        f"output_dir={tmp_path}", "train_config=train/configs/tiny_test.yaml", "bootstrap=0", "report_to=none",
        "dp_coders=[hashed]", "dp_coder_epsilons=[1.0, .inf]", "dp_coder_draws=3",
        "dp_coder_options.hashed.steps=2", "dp_coder_options.hashed.expected_batch_size=10000",
    ])
    sweep = Pipeline(config).baselines()["dp_coder"]["hashed"]
    assert list(sweep["weighted_f1_draws"]) == ["1"] and len(sweep["weighted_f1_draws"]["1"]) == 3
    assert sweep["weighted_f1_draws"]["1"][0] == sweep["weighted_f1"]["1"]
    assert sorted(p.name for p in (tmp_path / "baselines").glob("dp_hashed_eps_1*")) == [
        "dp_hashed_eps_1.json", "dp_hashed_eps_1_draw_2.json", "dp_hashed_eps_1_draw_3.json"]
    capsys.readouterr()
    Pipeline(dataclasses.replace(config, dp_coder_draws=4)).baselines()
    trained = [line.split("] ")[1] for line in capsys.readouterr().out.splitlines() if "] baselines: dp_" in line]
    assert trained == ["baselines: dp_hashed_eps_1_draw_4"]
    from dpnotes.errors import UserError

    with pytest.raises(UserError, match="dp_coder_draws must be ≥ 1"):
        load_pipeline_config(None, [f"output_dir={tmp_path}", "dp_coder_draws=0"])
