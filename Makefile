# Quick start: `make demo` and `make test`. Both build .venv from scratch when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

venv: $(STAMP)

# torch first: the local CPU build 2.13.0 satisfies `torch>=2.4`, so nothing pulls CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,bench]"
	# scGPT's own code, used by parity tests and benchmarks only; its pins are ancient, hence --no-deps.
	$(PIP) install -q --no-deps "scgpt==0.2.4"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/scforge demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu"

bench: $(STAMP)
	$(PY) benchmarks/tokenize.py --quick
	$(PY) benchmarks/embed.py --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
