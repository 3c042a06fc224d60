"""Generation: merge == base + adapter, DP code-set histogram, schema, determinism and resume,
and the backends' interface (transformers here; vLLM server client against a loopback stub)."""
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from dpnotes.corpus import Note, generate_default_corpus
from dpnotes.generate.backends import SamplingConfig, make_backend
from dpnotes.generate.conditioning import CodeSetDistribution, dp_code_set_histogram, prior_distribution
from dpnotes.generate.merge import merge_run
from dpnotes.generate.synthesize import NOTES, load_synthetic, synthesize
from dpnotes.prompting import codes_from_prompt, note_prompt
from dpnotes.train.dp.accounting import compute_epsilon

REPORT = {"epsilon": 3.2, "delta": 1e-4, "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 40, "max_grad_norm": 1.0,
          "privacy_unit": "patient", "privacy_units": 300, "accountant": "rdp", "corpus": "default", "config_hash": "abc"}


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A training output_dir as the recipe leaves it: adapter/ and privacy_report.json."""
    run = tmp_path_factory.mktemp("run")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(run / "adapter")
    (run / "privacy_report.json").write_text(json.dumps({**REPORT, "model": str(tiny_model_dir)}))
    return run


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
    assert (merged_dir / "model.safetensors").exists()


def test_prompt_round_trip():
    codes = ["I10", "E11.9", "J44.9"]
    assert codes_from_prompt(note_prompt(codes)) == codes
    with pytest.raises(ValueError):
        codes_from_prompt("Note: nothing")


def notes_with_code_sets(sets_and_counts):
    notes = []
    for key, count in sets_and_counts.items():
        for i in range(count):
            pid = f"{key}-{i}"
            notes.append(Note(pid, pid, "text", key.split("; ")))
    return notes


def test_dp_histogram_spends_its_epsilon_and_respects_the_threshold():
    notes = notes_with_code_sets({"I10": 400, "E11.9; I10": 250, **{f"Z{i:02d}": 1 for i in range(200)}})
    distribution = dp_code_set_histogram(notes, epsilon=1.0, delta=1e-4, seed=0)
    assert distribution.epsilon == pytest.approx(1.0, rel=0.01)
    assert distribution.epsilon <= 1.0 + 1e-9
    assert compute_epsilon(distribution.noise_std, 1.0, 1, 0.5e-4, "pld") == pytest.approx(distribution.epsilon, rel=1e-6)
    assert set(distribution.weights) == {"I10", "E11.9; I10"}  # the 200 singletons never clear the threshold
    assert all(count >= distribution.threshold for count in distribution.weights.values())
    assert distribution.threshold > 1 + 3 * distribution.noise_std
    raised = dp_code_set_histogram(notes, epsilon=1.0, delta=1e-4, min_count=300, seed=0)
    assert set(raised.weights) == {"I10"}


def test_dp_histogram_counts_a_patient_once():
    notes = [Note(f"n{i}", "same-patient", "t", ["I10"]) for i in range(500)]
    distribution = dp_code_set_histogram(notes + notes_with_code_sets({"E11.9": 300}), 1.0, 1e-4, seed=0)
    assert "I10" not in distribution.weights


def test_bad_conditioning_inputs(tmp_path):
    with pytest.raises(ValueError, match="finite and > 0"):
        dp_code_set_histogram(notes_with_code_sets({"I10": 5}), 0.0, 1e-3)
    with pytest.raises(ValueError, match="1/N"):
        dp_code_set_histogram(notes_with_code_sets({"I10": 5}), 1.0, 0.5)
    with pytest.raises(ValueError, match="survived the DP threshold"):
        CodeSetDistribution({}, 1.0, 1e-4, "dp-histogram").sample(3, 0)
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"I10;E11.9": 2, "J44.9": 1}))
    assert set(prior_distribution(prior).weights) == {"E11.9; I10", "J44.9"}


def test_synthesize_writes_schema_notes_deterministically_and_resumes_without_duplicates(merged_dir, tmp_path):
    distribution = CodeSetDistribution({"I10": 3.0, "E11.9; J44.9": 1.0}, 0.5, 1e-5, "dp-histogram")
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


class FakeCompletions(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = {"choices": [{"text": f" note for {body['prompt'].splitlines()[0]} seed {body['seed']}"}],
                  "usage": {"completion_tokens": 7}}
        payload = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_vllm_server_client_speaks_the_openai_completions_protocol():
    server = HTTPServer(("127.0.0.1", 0), FakeCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        backend = make_backend("vllm-server", "merged", url=f"http://127.0.0.1:{server.server_port}")
        out = backend.generate([note_prompt(["I10"]), note_prompt(["J44.9"])], 4, 2, SamplingConfig())
    finally:
        server.shutdown()
    assert [o.text for o in out] == ["note for Codes: I10 seed 2000010", "note for Codes: J44.9 seed 2000011"]
    assert all(o.new_tokens == 7 for o in out)


def test_vllm_backend_needs_the_optional_extra(merged_dir):
    pytest.importorskip("vllm", reason="vLLM is an optional extra (CUDA); its engine is exercised on GPU machines")
    backend = make_backend("vllm", str(merged_dir), gpu_memory_utilization=0.3)
    assert len(backend.generate([note_prompt(["I10"])], 0, 0, SamplingConfig(max_new_tokens=8))) == 1


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'tgi'"):
        make_backend("tgi", "x")


def test_dp_marginals_release_codes_and_sizes_with_sensitivity_sqrt_k_plus_1():
    from dpnotes.generate.conditioning import dp_code_marginals

    notes = generate_default_corpus(n_patients=400, seed=0)
    distribution = dp_code_marginals(notes, epsilon=1.0, delta=1e-4, max_codes=3, seed=0)
    assert distribution.epsilon == pytest.approx(1.0, rel=0.01)
    unit_sigma = distribution.noise_std / math.sqrt(4)
    assert compute_epsilon(unit_sigma, 1.0, 1, 0.5e-4, "pld") == pytest.approx(distribution.epsilon, rel=1e-6)
    assert len(distribution.weights) >= 5  # common codes clear the threshold, unlike whole code sets
    assert all(count >= distribution.threshold for count in distribution.weights.values())
    sets = distribution.sample(200, seed=3)
    assert sets == distribution.sample(200, seed=3)
    assert all(1 <= len(s) <= 3 and len(set(s)) == len(s) and set(s) <= set(distribution.weights) for s in sets)
    rare = notes_with_code_sets({"I10": 300, "Q99.9": 1})
    assert "Q99.9" not in dp_code_marginals(rare, 1.0, 1e-4, seed=0).weights
