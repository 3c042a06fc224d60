"""Generation: merge == base + adapter, DP code-set histogram, schema, determinism and resume,
and the backends' interface (transformers here; the vLLM server client against a loopback stub;
real vLLM in test_vllm_server.py)."""
import json
import math
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpnotes.corpus import Note, generate_default_corpus
from dpnotes.generation.backends import OutputFrequencyPenalty, SamplingConfig, make_backend, term_logit_bias
from dpnotes.generation.conditioning import (
    CodeSetDistribution,
    dp_code_marginals,
    dp_code_set_histogram,
    prior_distribution,
    unit_contributions,
)
from dpnotes.generation.merge import merge_run
from dpnotes.generation.synthesize import CONDITIONING, conditioning_for, steering_terms, synthesize
from dpnotes.runs import MANIFEST, NOTES, load_synthetic
from dpnotes.prompting import prompt_format_for
from dpnotes.testing.tiny_runs import tiny_training_run
from dpnotes.privacy.accounting import compute_epsilon


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A training output_dir as the recipe leaves it: adapter/ and privacy_report.json."""
    return tiny_training_run(tmp_path_factory.mktemp("run"), tiny_model_dir)


@pytest.fixture(scope="module")
def merged_dir(run_dir):
    return merge_run(run_dir, run_dir / "merged")


def test_merged_model_gives_the_logits_of_base_plus_adapter(run_dir, merged_dir, tiny_model_dir):
    from peft import PeftModel

    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)
    card = (merged_dir / "README.md").read_text()
    assert "| ε | 3.2 |" in card and "| training config hash | abc |" in card
    assert "accounted at the same privacy unit\n(patient)" in card and "manifest.json" in card
    assert (merged_dir / "model.safetensors").exists()


def notes_with_code_sets(sets_and_counts):
    notes = []
    for key, count in sets_and_counts.items():
        for i in range(count):
            pid = f"{key}-{i}"
            notes.append(Note(pid, pid, "text", key.split("; ")))
    return notes


def test_dp_histogram_spends_its_epsilon_and_respects_the_threshold():
    notes = notes_with_code_sets({"I10": 400, "E11.9; I10": 250, **{f"Z{i:02d}": 1 for i in range(200)}})
    distribution = dp_code_set_histogram(notes, epsilon=1.0, delta=1e-4, seed=0, privacy_unit="patient")
    assert distribution.epsilon == pytest.approx(1.0, rel=0.01)
    assert distribution.epsilon <= 1.0 + 1e-9
    assert compute_epsilon(distribution.noise_std, 1.0, 1, 0.5e-4, "pld") == pytest.approx(distribution.epsilon, rel=1e-6)
    assert set(distribution.weights) == {"I10", "E11.9; I10"}  # the 200 singletons never clear the threshold
    assert all(count >= distribution.threshold for count in distribution.weights.values())
    assert distribution.threshold > 1 + 3 * distribution.noise_std
    raised = dp_code_set_histogram(notes, epsilon=1.0, delta=1e-4, min_count=300, seed=0, privacy_unit="patient")
    assert set(raised.weights) == {"I10"}


def test_dp_histogram_counts_a_patient_once():
    notes = [Note(f"n{i}", "same-patient", "t", ["I10"]) for i in range(500)]
    distribution = dp_code_set_histogram(notes + notes_with_code_sets({"E11.9": 300}), 1.0, 1e-4, seed=0,
                                         privacy_unit="patient")
    assert "I10" not in distribution.weights and distribution.privacy_unit == "patient"


def patients_with_three_notes(patients):
    """Each patient: 3 notes with 3 different code sets (A, then B, then C)."""
    sets = (["I10"], ["E11.9", "I10"], ["J44.9"])
    return [Note(f"p{p}-n{i}", f"p{p}", "text", codes) for p in range(patients) for i, codes in enumerate(sets)]


def test_sequence_unit_counts_every_note_of_a_patient():
    notes = patients_with_three_notes(1)
    assert unit_contributions(notes, "sequence") == [["I10"], ["E11.9", "I10"], ["J44.9"]]  # 3 contributions
    many = patients_with_three_notes(300)
    distribution = dp_code_set_histogram(many, 1.0, 1e-4, seed=0, privacy_unit="sequence")
    assert distribution.privacy_unit == "sequence"
    assert set(distribution.weights) == {"I10", "E11.9; I10", "J44.9"}  # every note counts, not only the first
    for count in distribution.weights.values():
        assert abs(count - 300) < 6 * distribution.noise_std  # 300 notes each, sensitivity still 1
    marginals = dp_code_marginals(many, 1.0, 1e-4, max_codes=2, seed=0, privacy_unit="sequence")
    assert set(marginals.weights) == {"I10", "E11.9", "J44.9"}
    assert abs(marginals.weights["I10"] - 600) < 6 * marginals.noise_std
    assert abs(marginals.set_sizes["1"] - 600) < 6 * marginals.noise_std  # one size per note
    with pytest.raises(ValueError, match=r"1/N\) with N = 15 notes"):  # δ < 1/patients, but not < 1/notes
        dp_code_set_histogram(patients_with_three_notes(5), 1.0, 0.1, privacy_unit="sequence")


def test_patient_unit_counts_the_first_note_of_each_patient_only():
    notes = patients_with_three_notes(1)
    assert unit_contributions(notes, "patient") == [["I10"]]
    many = patients_with_three_notes(300)
    distribution = dp_code_set_histogram(many, 1.0, 1e-4, seed=0, privacy_unit="patient")
    assert set(distribution.weights) == {"I10"} and distribution.privacy_unit == "patient"
    assert abs(distribution.weights["I10"] - 300) < 6 * distribution.noise_std
    marginals = dp_code_marginals(many, 1.0, 1e-4, max_codes=2, seed=0, privacy_unit="patient")
    assert set(marginals.weights) == {"I10"}
    assert dp_code_set_histogram(patients_with_three_notes(5), 1.0, 0.1, privacy_unit="patient").delta == 0.1
    with pytest.raises(ValueError, match="privacy_unit must be one of"):
        dp_code_set_histogram(many, 1.0, 1e-4, privacy_unit="admission")


def test_conditioning_json_round_trips_the_privacy_unit(tmp_path):
    released = dp_code_marginals(patients_with_three_notes(300), 1.0, 1e-4, seed=0, privacy_unit="sequence")
    released.save(tmp_path / CONDITIONING)
    assert json.loads((tmp_path / CONDITIONING).read_text())["privacy_unit"] == "sequence"
    assert CodeSetDistribution.load(tmp_path / CONDITIONING) == released
    legacy = {k: v for k, v in json.loads((tmp_path / CONDITIONING).read_text()).items() if k != "privacy_unit"}
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="does not record its privacy unit"):  # refused, not guessed
        CodeSetDistribution.load(tmp_path / "legacy.json")
    with pytest.raises(ValueError, match="must record its privacy_unit"):
        CodeSetDistribution({"I10": 1.0}, 1.0, 1e-4, "dp-histogram")
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"I10": 1}))
    prior_distribution(prior).save(tmp_path / "free.json")
    loaded = CodeSetDistribution.load(tmp_path / "free.json")
    assert loaded.free and loaded.privacy_unit is None


def test_bad_conditioning_inputs(tmp_path):
    with pytest.raises(ValueError, match="finite and > 0"):
        dp_code_set_histogram(notes_with_code_sets({"I10": 5}), 0.0, 1e-3, privacy_unit="patient")
    with pytest.raises(ValueError, match="1/N"):
        dp_code_set_histogram(notes_with_code_sets({"I10": 5}), 1.0, 0.5, privacy_unit="patient")
    with pytest.raises(ValueError, match="survived the DP threshold"):
        CodeSetDistribution({}, 1.0, 1e-4, "dp-histogram", privacy_unit="patient").sample(3, 0)
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"I10;E11.9": 2, "J44.9": 1}))
    assert set(prior_distribution(prior).weights) == {"E11.9; I10", "J44.9"}


def test_synthesize_writes_schema_notes_deterministically_and_resumes_without_duplicates(merged_dir, tmp_path):
    distribution = CodeSetDistribution({"I10": 3.0, "E11.9; J44.9": 1.0}, 0.5, 1e-5, "dp-histogram",
                                       privacy_unit="patient")
    sampling = SamplingConfig(max_new_tokens=8, batch_size=4)
    whole = synthesize(merged_dir, tmp_path / "whole", 10, distribution, sampling=sampling, seed=1)
    assert whole["count"] == 10 and whole["total_epsilon"] == pytest.approx(3.2 + 0.5)
    reference = load_synthetic(tmp_path / "whole")
    assert [n.id for n in reference] == [f"syn-{i:06d}" for i in range(10)]
    assert all(n.codes in (["I10"], ["E11.9", "J44.9"]) for n in reference)

    crashed = tmp_path / "crashed"
    synthesize(merged_dir, crashed, 10, distribution, sampling=sampling, seed=1)
    lines = (crashed / NOTES).read_text().splitlines()
    (crashed / NOTES).write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # crash mid-line
    resumed = synthesize(merged_dir, crashed, 10, distribution, sampling=sampling, seed=1)
    assert resumed["written_this_run"] == 5
    notes = load_synthetic(crashed)
    assert [n.id for n in notes] == [n.id for n in reference]
    assert [n.text for n in notes] == [n.text for n in reference]


def test_synthesize_adds_epsilons_only_at_one_privacy_unit(merged_dir, tmp_path):
    sampling = SamplingConfig(max_new_tokens=4, batch_size=2)
    same = CodeSetDistribution({"I10": 3.0}, 0.5, 1e-5, "dp-marginals", privacy_unit="patient")
    manifest = synthesize(merged_dir, tmp_path / "same", 2, same, sampling=sampling)
    assert manifest["conditioning"]["privacy_unit"] == manifest["training"]["privacy_unit"] == "patient"
    assert manifest["privacy_unit"] == "patient"
    assert manifest["total_epsilon"] == pytest.approx(3.2 + 0.5)
    assert manifest["total_delta"] == pytest.approx(1e-4 + 1e-5)
    assert json.loads((tmp_path / "same" / MANIFEST).read_text())["total_epsilon"] == pytest.approx(3.7)

    other = CodeSetDistribution({"I10": 3.0}, 0.5, 1e-5, "dp-marginals", privacy_unit="sequence")
    with pytest.raises(ValueError, match="different units cannot be added"):
        synthesize(merged_dir, tmp_path / "other", 2, other, sampling=sampling)
    assert not (tmp_path / "other").exists()  # refused before anything is generated or written

    other.save(tmp_path / CONDITIONING)  # a saved release at another unit than the training's
    with pytest.raises(ValueError, match="different units cannot be added"):
        conditioning_for(tmp_path, "dp-marginals", None, 1.0, None, None, 0, privacy_unit="patient")
    notes = patients_with_three_notes(300)
    with pytest.raises(ValueError, match="none was given"):
        conditioning_for(tmp_path / "new", "dp-marginals", notes, 1.0, None, None, 0, privacy_unit=None)
    released = conditioning_for(tmp_path / "new", "dp-marginals", notes, 1.0, None, None, 0, privacy_unit="sequence")
    assert released.privacy_unit == "sequence" and released.delta == pytest.approx(1 / (10 * 900))  # δ = 1/(10·notes)

    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"I10": 1}))
    free = conditioning_for(tmp_path / "free", "prior", None, 1.0, None, prior, 0, privacy_unit=None)
    manifest = synthesize(merged_dir, tmp_path / "free", 2, free, sampling=sampling)
    assert manifest["conditioning"]["privacy_unit"] is None and manifest["privacy_unit"] == "patient"
    assert manifest["total_epsilon"] == 3.2 and manifest["total_delta"] == 1e-4


def test_the_merge_and_generate_commands_take_settings(run_dir, tmp_path, capsys):
    from dpnotes.generation import merge, synthesize as synthesize_command

    merge.main([f"run_dir={run_dir}", f"output_dir={tmp_path / 'merged'}"])
    assert (tmp_path / "merged" / "model.safetensors").exists()
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"I10": 1}))
    synthesize_command.main([f"model={tmp_path / 'merged'}", f"output_dir={tmp_path / 'notes'}", "count=2",
                             "conditioning=prior", f"prior_path={prior}", "max_new_tokens=4", "backend=transformers"])
    assert len(load_synthetic(tmp_path / "notes")) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a DP release needs the training notes
        synthesize_command.main([f"model={tmp_path / 'merged'}", f"output_dir={tmp_path / 'dp'}"])
    assert capsys.readouterr().err == "error: conditioning dp-marginals needs run_dir (the training output_dir)\n"


def test_the_training_report_may_come_from_the_run_when_the_model_folder_has_none(merged_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(merged_dir, model)
    run = tmp_path / "run"
    run.mkdir()
    (model / "privacy_report.json").rename(run / "privacy_report.json")
    sampling = SamplingConfig(max_new_tokens=4, batch_size=2)
    release = CodeSetDistribution({"I10": 3.0}, 0.5, 1e-5, "dp-marginals", privacy_unit="patient")
    assert synthesize(model, tmp_path / "a", 2, release, sampling=sampling, run_dir=run)["total_epsilon"] == pytest.approx(3.7)
    with pytest.raises(ValueError, match="recorded no prompt format"):  # nothing says how it was trained
        synthesize(model, tmp_path / "b", 2, release, sampling=sampling)
    alone = synthesize(model, tmp_path / "b", 2, release, sampling=sampling, prompt=prompt_format_for("default"))
    assert math.isinf(alone["total_epsilon"]) and alone["total_delta"] is None  # no report: no guarantee claimed


class CompletionsServer(BaseHTTPRequestHandler):
    """A stand-in OpenAI completions endpoint: `answer(body) -> (status, reply)`."""

    def answer(self, body: dict) -> tuple[int, dict]:
        raise NotImplementedError

    def do_POST(self):
        status, reply = self.answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        payload = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextmanager
def serving(handler: type[CompletionsServer]):
    """A vllm-server backend talking to `handler` on a free loopback port."""
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield make_backend("vllm-server", "merged", url=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


class FakeCompletions(CompletionsServer):
    def answer(self, body):
        return 200, {"choices": [{"text": f" note for {body['prompt'].splitlines()[0]} seed {body['seed']}"}],
                     "usage": {"completion_tokens": 7}}


class BiasEchoingCompletions(CompletionsServer):
    def answer(self, body):
        return 200, {"choices": [{"text": json.dumps(body.get("logit_bias"))}], "usage": {"completion_tokens": 1}}


class RefusingCompletions(CompletionsServer):
    def answer(self, body):
        return 400, {"error": {"message": "prompt longer than max_model_len"}}


def test_vllm_server_client_speaks_the_openai_completions_protocol():
    with serving(FakeCompletions) as backend:
        out = backend.generate(["Codes: I10\nNote:\n", "Codes: J44.9\nNote:\n"], 4, 2, SamplingConfig())
    assert [o.text for o in out] == ["note for Codes: I10 seed 2000010", "note for Codes: J44.9 seed 2000011"]
    assert all(o.new_tokens == 7 for o in out)


def test_vllm_server_client_sends_each_prompts_own_logit_bias():
    with serving(BiasEchoingCompletions) as backend:
        out = backend.generate(["a", "b", "c"], 0, 0, SamplingConfig(), [{7: 2.0}, {}, {9: -1.0, 11: 3.0}])
        plain = backend.generate(["a"], 0, 0, SamplingConfig())
    assert [json.loads(o.text) for o in out] == [{"7": 2.0}, None, {"9": -1.0, "11": 3.0}]
    assert json.loads(plain[0].text) is None


class PenaltyEchoingCompletions(CompletionsServer):
    def answer(self, body):
        return 200, {"choices": [{"text": json.dumps(body.get("frequency_penalty"))}], "usage": {"completion_tokens": 1}}


def test_the_frequency_penalty_counts_the_notes_own_tokens_never_the_prompts():
    prompt_length = 3
    input_ids = torch.tensor([[5, 5, 5, 2, 2, 7], [5, 1, 1, 0, 0, 0]])  # prompt | generated
    scores = OutputFrequencyPenalty(prompt_length, 0.5)(input_ids, torch.zeros(2, 10))
    expected = torch.zeros(2, 10)
    expected[0, 2], expected[0, 7], expected[1, 0] = -1.0, -0.5, -1.5
    assert torch.equal(scores, expected)  # token 5, written only by the prompt, is not penalised
    with serving(PenaltyEchoingCompletions) as backend:  # vLLM applies the same rule server-side
        assert json.loads(backend.generate(["a"], 0, 0, SamplingConfig(frequency_penalty=0.4))[0].text) == 0.4


def test_term_bias_names_each_terms_first_token_where_a_word_starts(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bias = term_logit_bias(tokenizer, ["blood", "hypertension", "encounter"], 2.5)
    pieces = {tokenizer.decode([token]) for token in bias}
    assert {" blood", "blood", " Blood", "Blood", " hypertension", " encounter"} <= pieces
    assert "enc" not in pieces  # a line-start piece that also sits inside words ("refer|enc|e")
    assert all(piece.startswith(" ") or piece.lower() == "blood" for piece in pieces)
    assert set(bias.values()) == {2.5}
    assert not term_logit_bias(tokenizer, ["ep"], 1.0)  # a 2-letter piece would steer any word


def test_a_note_is_steered_to_its_key_terms_and_the_condition_words_of_titles_without_any():
    prompt = prompt_format_for("default").with_keywords({"I10": ["pressure", "blood"], "J44.9": []})
    assert steering_terms(prompt, ["I10", "J44.9"]) == ["pressure", "blood", "chronic", "disease", "obstructive",
                                                        "pulmonary"]  # "unspecified" names no condition
    assert steering_terms(prompt_format_for("default"), ["I10"]) == ["essential", "hypertension", "primary"]
    # "...without complications" names an absence, "Type" no condition
    assert steering_terms(prompt_format_for("default"), ["E11.9"]) == ["diabetes", "mellitus"]
    # every_title: a code's DP terms (possibly a noise word) no longer displace its title's words
    assert steering_terms(prompt, ["I10", "J44.9"], every_title=True) == [
        "pressure", "blood", "essential", "hypertension", "primary", "chronic", "disease", "obstructive", "pulmonary"]


def test_term_bias_steers_each_row_of_the_transformers_sampler_to_its_own_terms(merged_dir, tmp_path):
    distribution = CodeSetDistribution({"I10": 1.0, "J44.9": 1.0}, 0.5, 1e-5, "dp-histogram", privacy_unit="patient")
    terms = {"I10": ["blood"], "J44.9": ["wheeze", "inhaler"]}
    prompt = prompt_format_for("default").with_keywords(terms)
    steered = SamplingConfig(max_new_tokens=6, batch_size=4, term_bias=100.0)
    synthesize(merged_dir, tmp_path / "steered", 8, distribution, sampling=steered, seed=1, prompt=prompt)
    notes = load_synthetic(tmp_path / "steered")
    assert {note.codes[0] for note in notes} == {"I10", "J44.9"}  # rows of both kinds share batches
    for note in notes:  # at +100 every word starts with one of its own note's terms
        words = note.text.lower().split()
        assert words and all(any(term.startswith(word[:3]) for term in terms[note.codes[0]]) for word in words), note.text

    plain = synthesize(merged_dir, tmp_path / "plain", 8, distribution,
                       sampling=SamplingConfig(max_new_tokens=6, batch_size=4), seed=1, prompt=prompt)
    assert plain["sampling"]["term_bias"] == 0.0
    assert [n.text for n in load_synthetic(tmp_path / "plain")] != [n.text for n in notes]
    with pytest.raises(ValueError, match="sampled with other settings \\(sampling\\)"):
        synthesize(merged_dir, tmp_path / "plain", 12, distribution, sampling=steered, seed=1, prompt=prompt)

    crashed = tmp_path / "crashed"  # a resumed steered run writes exactly the notes an uninterrupted one did
    synthesize(merged_dir, crashed, 8, distribution, sampling=steered, seed=1, prompt=prompt)
    (crashed / NOTES).write_text("".join((crashed / NOTES).read_text().splitlines(keepends=True)[:4]))
    assert synthesize(merged_dir, crashed, 8, distribution, sampling=steered, seed=1, prompt=prompt)["written_this_run"] == 4
    assert [n.text for n in load_synthetic(crashed)] == [n.text for n in notes]


def test_a_refused_request_says_what_the_server_said():
    from dpnotes.generation.vllm_server import VLLMServerError

    with serving(RefusingCompletions) as backend:
        with pytest.raises(VLLMServerError, match="refused a request \\(400\\).*longer than max_model_len"):
            backend.generate(["Codes: I10\n"], 0, 0, SamplingConfig())


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'tgi'"):
        make_backend("tgi", "x")


def test_dp_marginals_release_codes_and_sizes_with_sensitivity_sqrt_k_plus_1():
    notes = generate_default_corpus(n_patients=400, seed=0)
    distribution = dp_code_marginals(notes, epsilon=1.0, delta=1e-4, max_codes=3, seed=0, privacy_unit="patient")
    assert distribution.epsilon == pytest.approx(1.0, rel=0.01)
    unit_sigma = distribution.noise_std / math.sqrt(4)
    assert compute_epsilon(unit_sigma, 1.0, 1, 0.5e-4, "pld") == pytest.approx(distribution.epsilon, rel=1e-6)
    assert len(distribution.weights) >= 5  # common codes clear the threshold, unlike whole code sets
    assert all(count >= distribution.threshold for count in distribution.weights.values())
    sets = distribution.sample(200, seed=3)
    assert sets == distribution.sample(200, seed=3)
    assert all(1 <= len(s) <= 3 and len(set(s)) == len(s) and set(s) <= set(distribution.weights) for s in sets)
    rare = notes_with_code_sets({"I10": 300, "Q99.9": 1})
    assert "Q99.9" not in dp_code_marginals(rare, 1.0, 1e-4, seed=0, privacy_unit="patient").weights
