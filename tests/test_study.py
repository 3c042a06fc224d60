"""The study: parts are pipelines, results.md states each target against what was measured."""
import json
import math

import pytest

from dpnotes.study.parts import StudyConfig, StudyPart, check_targets, load_study_config, part_pipeline, write_results


def summary(f1_by_eps, real=0.9, dp=None):
    runs = [{"target_epsilon": e, "synthetic_micro_f1": f, "f1_ratio_to_real": f / real} for e, f in f1_by_eps.items()]
    sweep = {"by_epsilon": {k: {"metrics": {"weighted_f1": v}} for k, v in (dp or {}).items()}}
    return {"runs": runs, "baselines": {"dp_coder": {"hashed": sweep}} if dp else {}}


def test_targets_are_met_missed_or_not_measured():
    targets = {"synthetic_ratio": {"epsilon": 8, "at_least": 0.75}, "synthetic_gap": {"epsilon": 8, "within": 0.05},
               "dp_gap": {"epsilon": 1, "within": 0.05}}
    lines = check_targets(targets, summary({8.0: 0.72, math.inf: 0.80}, dp={"1": 0.70, "inf": 0.80}))
    assert "**met**" in lines[0] and "0.8 ×" in lines[0]
    assert "**missed**" in lines[1] and "gap 0.08" in lines[1]
    assert "**missed**" in lines[2] and "hashed" in lines[2]
    assert all("not measured yet" in line for line in check_targets(targets, summary({}))[:2])


def test_a_dp_gap_with_several_trainings_is_judged_on_their_mean():
    """One training's noise can put its gap on either side of the target: with dp_coder_draws the verdict
    is the mean's, and the single trainings' range is shown beside it."""
    state = summary({}, dp={"10": 0.70, "inf": 0.80})
    state["baselines"]["dp_coder"]["hashed"]["weighted_f1_draws"] = {"10": [0.70, 0.79, 0.78]}
    line, = check_targets({"dp_gap": {"epsilon": 10, "within": 0.05}}, state)
    assert "**met**" in line and "gap 0.0433, mean of 3 DP trainings; one training's gap 0.01 to 0.1" in line


def test_the_shipped_study_names_existing_pipeline_configs():
    from dpnotes.study.pipeline import ROOT

    study = load_study_config(ROOT / "dpnotes" / "study" / "configs" / "study.yaml")
    assert {"default", "mtsamples", "cmc2007"} <= set(study.parts)
    for name in study.parts:
        config = part_pipeline(study, name)
        assert math.inf in (config.dp_coder_epsilons or config.epsilons)


def test_results_are_written_for_finished_parts_and_say_what_has_not_run(tmp_path):
    root = tmp_path / "study"
    (root / "a").mkdir(parents=True)
    ci = {"micro_f1": [0.8, 0.9], "weighted_f1": [0.7, 0.9]}
    real = {"metrics": {"micro_f1": 0.85, "weighted_f1": 0.8}, "ci": ci, "n_train": 10, "n_dev": 2, "n_test": 3}
    dp = {"metrics": {"micro_f1": 0.5, "weighted_f1": 0.4}, "ci": ci, "privacy": {"epsilon_spent": 0.99, "note": ""}}
    (root / "a" / "baselines.json").write_text(json.dumps(
        {"real_tfidf": real, "dp_coder": {"hashed": {"by_epsilon": {"1": dp, "inf": dp}}}}))
    study = StudyConfig(str(root), str(tmp_path / "results.md"), {
        "a": StudyPart("dpnotes/study/configs/study_default.yaml", "Part A", only="baselines",
                       targets={"dp_gap": {"epsilon": 1, "within": 0.05}}),
        "b": StudyPart("dpnotes/study/configs/study_default.yaml", "Part B"),
    })
    text = write_results(study, {"a": 120.0}).read_text()
    assert "## Part A" in text and "0.850 [0.800, 0.900]" in text and "2.0 min" in text
    assert "DP trainings" not in text  # one training per ε: no spread column
    assert "DP hashed coder at ε = 1 within 0.05 weighted F1 of ε = ∞: **met** (gap 0)" in text
    assert "## Part B\n\nNot run yet." in text


def test_results_show_the_spread_of_several_dp_trainings(tmp_path):
    root = tmp_path / "study"
    (root / "a").mkdir(parents=True)
    dp = {"metrics": {"micro_f1": 0.5, "weighted_f1": 0.5}, "privacy": {"epsilon_spent": 0.99}}
    sweep = {"by_epsilon": {"1": dp, "inf": dp}, "weighted_f1_draws": {"1": [0.5, 0.7]}}
    (root / "a" / "baselines.json").write_text(json.dumps({"dp_coder": {"probe": sweep}}))
    study = StudyConfig(str(root), str(tmp_path / "results.md"),
                        {"a": StudyPart("dpnotes/study/configs/study_default.yaml", "Part A", only="baselines")})
    rows = [line for line in write_results(study, {}).read_text().splitlines() if line.startswith("| probe")]
    assert rows[0].endswith("| 0.600 ± 0.141 (2) |  |") and rows[1].endswith("| — |  |")  # ∞: trained once


def test_a_part_measured_elsewhere_keeps_its_section(tmp_path):
    """Re-running one part on a machine without the others' run folders must not wipe what they measured."""
    root = tmp_path / "study"
    (root / "a").mkdir(parents=True)
    results = tmp_path / "results.md"
    results.write_text("# old\n\n## Part A\n\nold A\n\n## Part B\n\n| measured B | 0.5 |\n\nTargets:\n\n- met\n")
    study = StudyConfig(str(root), str(results), {
        "a": StudyPart("dpnotes/study/configs/study_default.yaml", "Part A", only="baselines"),
        "b": StudyPart("dpnotes/study/configs/study_default.yaml", "Part B"),
        "c": StudyPart("dpnotes/study/configs/study_default.yaml", "Part C"),
    })
    text = write_results(study, {}).read_text()
    assert "old A" not in text  # its folder is here: rewritten from it
    kept = text[text.index("## Part B"):text.index("## Part C")]
    assert "| measured B | 0.5 |" in kept and "- met" in kept and "dpnotes study --only b" in kept
    assert "## Part C\n\nNot run yet." in text
    assert write_results(study, {}).read_text() == text  # kept once, not re-annotated


def test_unknown_parts_are_refused(capsys):
    from dpnotes.study.parts import main

    with pytest.raises(SystemExit):
        main(["--only", "nope"])
    assert "unknown part" in capsys.readouterr().err
