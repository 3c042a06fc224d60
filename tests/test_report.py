"""The study report from a fake run folder: honest axes, CIs, escaped example notes, robustness to
missing pieces, and no real note text."""
import json
import math
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest

from dpnotes.study.report import (
    collect,
    dp_coder_sweeps,
    example_note,
    f1_figure,
    privacy_figure,
    summary_table,
    write_report,
)

INF = math.inf
REAL_TEXT = "Patient Jane Realperson admitted with chest pain"  # must never reach the report
MARKUP_NOTE = "Assessment: <b>hypertension</b> & diabetes, stable."


def coder(f1, ci):
    return {"metrics": {"micro_f1": f1, "weighted_f1": f1}, "ci": {"micro_f1": ci}, "ci_confidence": 0.95}


def sweep(epsilons):
    return {"by_epsilon": {key: {**coder(0.1 * i + 0.2, [0.1 * i + 0.1, 0.1 * i + 0.3]),
                                 "privacy": {"epsilon_spent": float(key) * 0.9, "private": True}}
                           for i, key in enumerate(epsilons)}}


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def fake_run(run, epsilon, f1, evaluated=True):
    # 3 steps: the ε-vs-step curve costs one accountant call per step here
    write_json(run / "privacy_report.json", {
        "epsilon": epsilon, "delta": 1e-5, "noise_multiplier": 0.0 if math.isinf(epsilon) else 1.2,
        "sample_rate": 0.05, "steps": 3, "privacy_unit": "patient", "accountant": "rdp", "private": True})
    write_json(run / "synthetic" / "manifest.json", {"total_epsilon": epsilon + 1, "privacy_unit": "patient"})
    texts = ["Short.", MARKUP_NOTE + f" eps {epsilon}", "A much longer synthetic note " * 5]  # the median is the markup one
    (run / "synthetic" / "notes.jsonl").write_text("".join(
        json.dumps({"id": f"syn-{i}", "patient_id": f"syn-{i}", "text": t, "codes": ["I10", "E11.9"], "metadata": {"index": i}}) + "\n"
        for i, t in enumerate(texts)))
    if not evaluated:
        return
    per_canary = [{"canary_index": i, "exposure": e, "member": m}
                  for i, (e, m) in enumerate([(4.0, True), (3.0, True), (1.0, False), (0.5, False)])]
    write_json(run / "eval.json", {
        "coders": {"real": coder(0.8, [0.7, 0.9]), "synthetic": coder(f1, [f1 - 0.1, f1 + 0.1]),
                   "real+synthetic": coder(0.75, [0.65, 0.85])},
        "privacy": {"exposure": {"per_canary": per_canary, "mean_exposure": 2.125, "mean_member_exposure": 3.5,
                                 "mean_nonmember_exposure": 0.75, "max_exposure": 4.0,
                                 "max_possible_exposure": math.log2(21), "n_candidates": 20},
                    "membership_inference": {"auc": 0.55},
                    "verbatim": {"lcs_words": {"max": 7}, "canaries": {"identifier_in_output": 0}}}})


@pytest.fixture
def study(tmp_path):
    """Generators at ε = 1 (trained, not evaluated yet), 8 and ∞; a real corpus beside them."""
    fake_run(tmp_path / "eps_1", 1.0, 0.2, evaluated=False)
    fake_run(tmp_path / "eps_8", 8.0, 0.4)
    fake_run(tmp_path / "eps_inf", INF, 0.6)
    write_json(tmp_path / "baselines.json", {"real_tfidf": coder(0.8, [0.7, 0.9]), "dp_coder": sweep(["0.1", "1", "10", "inf"])})
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.jsonl").write_text(json.dumps({"id": "r1", "patient_id": "p1", "text": REAL_TEXT, "codes": ["I10"]}))
    return tmp_path, SimpleNamespace(epsilons=[1.0, 8.0, INF], report_to="none", generates=True, audit=None)


def test_report_shows_one_escaped_synthetic_note_per_epsilon(study):
    root, config = study
    page = write_report(root, config).read_text()
    for epsilon in (1.0, 8.0, INF):
        assert f"<pre>Assessment: &lt;b&gt;hypertension&lt;/b&gt; &amp; diabetes, stable. eps {epsilon}</pre>" in page
    assert "<b>" not in page
    assert "codes: I10, E11.9" in page
    assert "A much longer" not in page  # one note per ε, the median-length one


def test_no_real_note_text_reaches_the_report(study):
    root, config = study
    write_report(root, config)
    for name in ("report.html", "report.md", "report.json"):
        assert "Realperson" not in (root / name).read_text()


def test_summary_table_per_epsilon(study):
    root, _ = study
    header, rows = summary_table(collect(root, [1.0, 8.0, INF]))
    table = [dict(zip(header, row)) for row in rows]
    eps_1, eps_8, eps_inf = table
    assert eps_8["ε total (weights + key terms + conditioning)"] == "9"
    assert eps_8["synthetic-coder micro-F1 [95 % CI]"] == "0.4 [0.3, 0.5]"
    assert eps_8["÷ real-trained coder"] == "0.5"
    assert eps_inf["÷ real-trained coder"] == "0.75"
    assert (eps_8["exposure: trained canaries (mean bits)"], eps_8["exposure: held-out canaries (mean bits)"]) == ("3.5", "0.75")
    assert eps_8["MIA AUC (0.5 = chance)"] == "0.55"
    assert eps_inf["ε (target)"] == "∞" and eps_inf["ε total (weights + key terms + conditioning)"] == "∞"
    assert eps_1["synthetic-coder micro-F1 [95 % CI]"] == "–" and "not evaluated yet" in eps_1["caveats"]


def test_prompt_only_reference_sits_beside_its_epsilon(study):
    root, _ = study
    baselines = json.loads((root / "baselines.json").read_text())
    write_json(root / "baselines.json", {**baselines, "prompt_only": {"8": coder(0.55, [0.5, 0.6]), "inf": coder(0.5, None)}})
    header, rows = summary_table(collect(root, [1.0, 8.0, INF]))
    column = [dict(zip(header, row))["prompt-only coder micro-F1 [95 % CI] (same code sets, no model)"] for row in rows]
    assert column == ["–", "0.55 [0.5, 0.6]", "0.5"]


def test_f1_figure_has_a_fixed_axis_ci_bars_and_infinity_at_the_right(study):
    fig = f1_figure({"synthetic": {8.0: (0.4, [0.3, 0.5]), INF: (0.6, [0.5, 0.7]), 1.0: (0.2, None)}},
                    (0.8, [0.7, 0.9]), "title")
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8", "∞"]
    assert ax.get_xticks()[-1] > 8
    bars = ax.containers[0].lines[2][0].get_segments()
    assert [tuple(segment[:, 1]) for segment in bars] == [(0.2, 0.2), (0.3, 0.5), (0.5, 0.7)]  # no CI: no bar
    assert any(line.get_ydata()[0] == 0.8 and line.get_linestyle() == "--" for line in ax.get_lines())
    plt.close(fig)


def test_exposure_axis_ends_at_the_maximum_with_members_against_held_out(study):
    root, _ = study
    fig = privacy_figure(collect(root, [1.0, 8.0, INF])["runs"])
    exposure, mia = fig.axes
    assert exposure.get_ylim() == (0.0, math.log2(21))
    assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == math.log2(21) for line in exposure.get_lines())
    means = {line.get_label(): list(line.get_ydata()) for line in exposure.get_lines()}
    trained, held_out = means["canaries trained on: mean (dots: each)"], means["held-out canaries (chance): mean (dots: each)"]
    assert trained[0] == trained[2] == 3.5 and held_out[0] == held_out[2] == 0.75
    assert math.isnan(trained[1])  # the line stops before the axis break at ∞
    assert mia.get_ylim() == (0.0, 1.0)
    plt.close(fig)


def test_dp_coders_as_one_sweep_or_several_by_name():
    assert set(dp_coder_sweeps({"dp_coder": sweep(["0.1", "inf"])})["DP-LoRA coder"]) == {0.1, INF}
    several = dp_coder_sweeps({"dp_coder": {"probe": sweep(["1", "inf"]), "hashed": sweep(["10"])}})
    assert {name: sorted(s) for name, s in several.items()} == {"probe": [1.0, INF], "hashed": [10.0]}
    assert dp_coder_sweeps({}) == {}


def test_dp_coder_figure_and_table_on_their_own_epsilon_grid(study):
    root, config = study
    write_report(root, config)
    assert (root / "dp_coder_f1_vs_epsilon.png").exists()
    page = (root / "report.html").read_text()
    assert "<td>DP-LoRA coder</td><td>0.1</td><td>0.09</td><td>0.2 [0.1, 0.3]</td><td>0.25</td>" in page


def test_missing_pieces_are_noted_not_fatal(study):
    root, config = study
    (root / "baselines.json").unlink()
    for path in (root / "eps_8" / "eval.json", root / "eps_inf" / "eval.json"):
        path.unlink()
    (root / "eps_inf" / "synthetic" / "notes.jsonl").unlink()
    page = write_report(root, config).read_text()
    assert "not evaluated yet" in page and "no synthetic notes yet" in page
    assert "No DP coder baseline" in page and "f1_vs_epsilon: nothing to plot yet." in page
    assert not (root / "privacy_vs_epsilon.png").exists()
    assert (root / "epsilon_vs_steps.png").exists()  # training finished: its curve is still drawn


def test_no_canaries_is_a_caveat(study):
    root, config = study
    evaluation = json.loads((root / "eps_8" / "eval.json").read_text())
    del evaluation["privacy"]["exposure"]
    (root / "eps_8" / "eval.json").write_text(json.dumps(evaluation))
    header, rows = summary_table(collect(root, config.epsilons))
    assert "no canaries measured" in rows[1][header.index("caveats")]
    write_report(root, config)


def test_example_note_is_the_median_length_one_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "notes.jsonl"
    lines = [json.dumps({"id": f"n{i}", "text": "x" * n, "codes": []}) for i, n in enumerate([5, 1, 3, 3])]
    path.write_text("\n".join(lines) + '\n{"id": "torn", "te')
    assert example_note(path)["id"] == "n2"
    assert example_note(tmp_path / "absent.jsonl") is None


def test_chance_exposure_is_the_mean_over_uniform_ranks():
    from dpnotes.study.report import chance_exposure

    n = 100
    top = math.log2(n + 1)
    brute = sum(top - math.log2(rank) for rank in range(1, n + 2)) / (n + 1)
    assert chance_exposure(top) == pytest.approx(brute)
    assert 1.3 < chance_exposure(top) < 1.45


def test_audit_intro_reads_the_sampling_from_the_runs():
    from dpnotes.study.report import audit_intro

    main = [{"sample_rate": 0.02, "steps": 12, "max_possible_exposure": math.log2(101)}]
    audit = [{"sample_rate": 0.625, "steps": 20, "max_possible_exposure": math.log2(101)}]
    text = audit_intro(main, audit)
    assert "about 0.24 times" in text and "about 12 times" in text and "100 random candidates" in text
    assert "random random" not in audit_intro(None, [{"sample_rate": None, "steps": None, "max_possible_exposure": None}])


def test_terminal_summary_fits_80_columns_without_cutting_a_number(study, capsys, monkeypatch):
    from dpnotes.study.report import _print_summary

    monkeypatch.setenv("COLUMNS", "80")
    root, _ = study
    _print_summary(collect(root, [1.0, 8.0, INF]))
    out = capsys.readouterr().out
    assert "…" not in out and "0.4" in out and "95 % CIs: report.html" in out
    assert "[0.3, 0.5]" not in out  # the CI is the report's; the terminal shows the value
    assert max(map(len, out.splitlines())) <= 80


def test_terminal_summary_drops_columns_with_nothing_measured(study, capsys, monkeypatch):
    """A part without canaries (MTSamples, CMC-2007) has '–' in both exposure columns: they are left
    out rather than squeezing the numbers into folded lines."""
    from dpnotes.study.report import _print_summary

    monkeypatch.setenv("COLUMNS", "80")
    root, _ = study
    summary = collect(root, [1.0, 8.0, INF])
    for run in summary["runs"]:
        run["mean_member_exposure"] = run["mean_nonmember_exposure"] = None
    _print_summary(summary)
    out = capsys.readouterr().out
    assert "exposu" not in out and "MIA AUC" in out and "0.4" in out  # a folded header would read "exposu / re"
