"""Real vLLM, from the project's vLLM environment (`make vllm`), on a tiny LLaMA: notes through the
project's server client, base + LoRA adapter, a server killed mid-run and the resume, the errors of
a server that cannot start, and the offline engine (`LLM`, `LoRARequest`) run in that environment. `make test` sets DPNOTES_REQUIRE_VLLM, so there a
missing environment fails instead of skipping."""
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from dpnotes.generation import backends
from dpnotes.generation.backends import SamplingConfig, make_backend
from dpnotes.generation.conditioning import CodeSetDistribution
from dpnotes.generation.merge import merge_run
from dpnotes.generation.synthesize import synthesize
from dpnotes.runs import NOTES, load_synthetic
from dpnotes.generation.vllm_server import ServerOptions, VLLMServer, VLLMServerError, find_vllm
from dpnotes.testing.tiny_models import tiny_llama_folder
from dpnotes.testing.tiny_runs import tiny_training_run

# Eager mode: a tiny model starts in seconds without torch.compile; 128 tokens is the tiny model's context.
# A 256-token step budget holds only a few prompts, as 4,096 does for 64 SmolLM2 prompts: with chunked
# prefill on, vLLM 0.32 on CPU crashed on the seeded requests (kept off on CPU, ServerOptions).
SERVER = {"enforce_eager": True, "max_model_len": 128, "dtype": "float32",
          "extra_args": ["--max-num-batched-tokens", "256"]}
SAMPLING = SamplingConfig(max_new_tokens=12)
CODES = CodeSetDistribution({"I10": 3.0, "E11.9; J44.9": 1.0}, 0.5, 1e-5, "dp-histogram", privacy_unit="patient")


@pytest.fixture(scope="module", autouse=True)
def vllm_environment():
    if find_vllm() is None:
        message = "no vLLM environment: build it with `make vllm`"
        if os.environ.get("DPNOTES_REQUIRE_VLLM"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny LLaMA with 32-wide heads: vLLM's CPU attention kernels take head sizes from 32 up."""
    folder = tmp_path_factory.mktemp("tiny-llama-vllm")
    tiny_llama_folder(folder, hidden=64, heads=2, kv_heads=1)
    return folder


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A training run folder (adapter + privacy report) and its merged model."""
    folder = tiny_training_run(tmp_path_factory.mktemp("vllm-run"), tiny_model_dir)
    return folder, merge_run(folder, folder / "merged")


@pytest.mark.slow
def test_notes_through_a_started_server_then_a_kill_mid_run_and_a_resume(run, tmp_path, monkeypatch):
    _, merged = run
    whole = synthesize(merged, tmp_path / "whole", 12, CODES, "vllm-server", SAMPLING, seed=3, backend_options=SERVER)
    assert whole["backend"] == "vllm-server" and whole["count"] == whole["written_this_run"] == 12
    reference = load_synthetic(tmp_path / "whole")
    assert [n.id for n in reference] == [f"syn-{i:06d}" for i in range(12)]
    assert all(n.metadata["backend"] == "vllm-server" and n.metadata["new_tokens"] > 0 for n in reference)

    # Chunks of 4; the server is killed (whole process group) after the first chunk is written.
    monkeypatch.setattr(backends.VLLMServerBackend, "chunk_size", 4)
    real_generate, servers = backends.VLLMServerBackend.generate, []

    def generate_then_kill(self, prompts, first_index, seed, sampling, logit_biases=None):
        if first_index == 4:
            servers.append(self.server)
            os.killpg(self.server.process.pid, signal.SIGKILL)
            self.server.process.wait()
        return real_generate(self, prompts, first_index, seed, sampling, logit_biases)

    monkeypatch.setattr(backends.VLLMServerBackend, "generate", generate_then_kill)
    crashed = tmp_path / "crashed"
    with pytest.raises(VLLMServerError, match="stopped answering"):
        synthesize(merged, crashed, 12, CODES, "vllm-server", SAMPLING, seed=3, backend_options=SERVER)
    assert len((crashed / NOTES).read_text().splitlines()) == 4
    monkeypatch.setattr(backends.VLLMServerBackend, "generate", real_generate)
    resumed = synthesize(merged, crashed, 12, CODES, "vllm-server", SAMPLING, seed=3, backend_options=SERVER)
    assert resumed["written_this_run"] == 8
    notes = load_synthetic(crashed)
    assert [n.id for n in notes] == [n.id for n in reference]  # every index once, in order
    # Each note has its own seed: the same note whatever chunk or server produced it.
    assert sum(a.text == b.text for a, b in zip(notes, reference)) >= 10


@pytest.mark.slow
def test_base_model_with_the_lora_adapter_and_a_logit_bias_per_prompt(run, tiny_model_dir):
    from transformers import AutoTokenizer

    folder, _ = run
    blood = AutoTokenizer.from_pretrained(tiny_model_dir).encode(" blood", add_special_tokens=False)[0]
    backend = make_backend("vllm-server", str(tiny_model_dir), adapter_dir=str(folder / "adapter"), max_lora_rank=8,
                           concurrency=4, **SERVER)
    try:
        outputs = backend.generate(["Write a note.\n"] * 6, 0, 0, SAMPLING)
        steered = backend.generate(["Write a note.\n"] * 2, 0, 0, SAMPLING, [{blood: 100.0}, {}])
    finally:
        backend.close()
    assert len(outputs) == 6 and all(o.new_tokens > 0 for o in outputs)
    assert steered[0].text.split() == ["blood"] * SAMPLING.max_new_tokens  # the server applied the bias
    assert steered[1].text == outputs[1].text  # to its own prompt only (note 1: same seed, no bias)
    with pytest.raises(ProcessLookupError):  # stopped with its engine and worker processes
        os.killpg(backend.server.process.pid, 0)


@pytest.mark.slow
def test_a_server_that_cannot_start_says_why_with_its_log(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # not a model
    with pytest.raises(VLLMServerError, match="exited with code") as error:
        VLLMServer(tmp_path, ServerOptions(**SERVER)).start()
    assert "log" in str(error.value) and len(str(error.value).splitlines()) > 2


@pytest.mark.slow
def test_a_server_slower_than_its_timeout_is_stopped(run):
    _, merged = run
    server = VLLMServer(merged, ServerOptions(startup_timeout=1.0, **SERVER))
    with pytest.raises(VLLMServerError, match="not healthy after 1 s"):
        server.start()
    assert server.process.poll() is not None


def test_a_busy_port_is_refused_before_starting(run):
    _, merged = run
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = VLLMServer(merged, ServerOptions(port=taken.getsockname()[1]))
        with pytest.raises(VLLMServerError, match="is in use"):
            server.start()
    assert server.process is None


OFFLINE = """
import json, sys
sys.path.insert(0, sys.argv[1])  # the repository: dpnotes is not installed in the vLLM environment
from dpnotes.generation.backends import SamplingConfig, make_backend
engine = make_backend("vllm", sys.argv[2], adapter_dir=sys.argv[3], max_lora_rank=8, enforce_eager=True,
                      max_model_len=128, dtype="float32")
outputs = engine.generate(["Write a note.\\n"] * 3, 5, 1, SamplingConfig(max_new_tokens=8))
print("RESULT " + json.dumps([[o.text, o.new_tokens] for o in outputs]))
"""


@pytest.mark.slow
def test_the_offline_engine_with_a_lora_request_in_the_vllm_environment(run, tiny_model_dir):
    folder, _ = run
    model, adapter = tiny_model_dir, folder / "adapter"
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(find_vllm()), "-c", OFFLINE, str(Path(__file__).resolve().parents[1]), str(model),
                           str(adapter)], capture_output=True, text=True, env=environment, timeout=600)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, done.stderr[-3000:]
    outputs = json.loads(results[0][len("RESULT "):])
    assert len(outputs) == 3 and all(tokens > 0 for _, tokens in outputs)
