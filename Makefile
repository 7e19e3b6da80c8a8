# anyloom: every target sets up what it needs (`make setup` is idempotent and takes seconds once done).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; a GPU user installs CUDA torch into .venv first (or uses VENV_FLAGS=--system-site-packages):
# setup never replaces a torch that is already importable in the venv.
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
STAMP := $(VENV)/.setup-$(shell sha256sum pyproject.toml 2>/dev/null | cut -c1-16)

RECIPE ?= world
ARGS ?=
NPROC ?= 1
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
RUN ?= runs/world
TESTS ?= tests
OUT ?= runs/compare
PORT ?= 7860

.PHONY: help setup train generate eval bench compare test lint clean import demo

help:
	@echo "make setup      create .venv (idempotent; seconds once done)"
	@echo "make train [RECIPE=world] [ARGS='k=v ...'] [NPROC=2]"
	@echo "                train a recipe's whole chain -> runs/<run.name>/ (eval.json, samples/, summary.md);"
	@echo "                RECIPE=world_tiny: the same chain shrunk to a one-minute smoke test;"
	@echo "                RECIPE=manifest|manifest_tiny ARGS='data.train=my.jsonl data.val=... data.test=...':"
	@echo "                your own manifests or tar shards (docs/DATA.md);"
	@echo "                running it again skips what is up to date and resumes what was interrupted"
	@echo "make generate [RUN=runs/world] PROMPT='two red circles' [TO=image|audio|text] [GEN_ARGS=...]"
	@echo "                (or IMAGE=x.png / AUDIO=x.wav); GEN_ARGS: --out DIR  --num N (samples per prompt)"
	@echo "                --seed S  --candidates N (sampled, best kept)  --temperature T  --cfg-scale C  ..."
	@echo "                (python scripts/generate.py --help lists them all)"
	@echo "make import FROM=chameleon|emu3|llama|anole SRC=<checkpoint folder> [RUN=runs/<name>] [ARGS=...]"
	@echo "                a released checkpoint -> a run that generate, eval and init.from take (docs/IMPORT.md)"
	@echo "make demo [RUN=runs/world] [PORT=7860]   a web page for the run (gradio; its API: README)"
	@echo "make eval [RUN=runs/world] [ARGS='eval.limit=50 eval.splits=[test] --force']"
	@echo "                held-out scores -> <run>/eval.json; other settings than the run's -> <run>/evals/<them>/"
	@echo "make bench [ARGS='--quick --threads 1']      speed/memory ratios -> runs/bench/bench.json"
	@echo "make compare RUNS='runs/a runs/b' [OUT=runs/compare]   recipes, evals and curves side by side"
	@echo "make test [TESTS=tests/test_x.py] | lint | clean"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "setup: keeping the torch already installed ($$($(PY) -c 'import torch; print(torch.__version__)'))"; \
	 else $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	@$(PY) -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.setup-*
	@touch $@
	@echo "setup: done ($(VENV))"

# set +B: a shard pattern in ARGS (data.train=shards/train-{000..009}.tar) reaches the recipe unexpanded
train: setup
	@set +B; if [ "$(NPROC)" = "1" ] && [ "$(NNODES)" = "1" ]; then \
	    $(PY) scripts/train.py --recipe "$(RECIPE)" $(ARGS); \
	 else $(VENV)/bin/torchrun --nproc_per_node=$(NPROC) --nnodes=$(NNODES) --node_rank=$(NODE_RANK) \
	    --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT) scripts/train.py --recipe "$(RECIPE)" $(ARGS); fi

generate: setup
	$(PY) scripts/generate.py --run "$(RUN)" $(if $(PROMPT),--prompt "$(PROMPT)") $(if $(IMAGE),--image "$(IMAGE)") \
	    $(if $(AUDIO),--audio "$(AUDIO)") $(if $(TO),--to $(TO)) $(GEN_ARGS)

# RUN defaults to runs/<FROM> here (not runs/world)
import: setup
	$(PY) scripts/import.py --from "$(FROM)" --src "$(SRC)" \
	    --run "$(if $(filter command line environment,$(origin RUN)),$(RUN),runs/$(FROM))" $(ARGS)

demo: setup
	$(PY) scripts/demo.py --run "$(RUN)" --port $(PORT)

eval: setup
	@set +B; $(PY) scripts/evaluate.py --run "$(RUN)" $(ARGS)

bench: setup
	$(PY) scripts/bench.py $(ARGS)

compare: setup
	$(PY) scripts/compare.py --out "$(OUT)" $(RUNS)

test: setup
	$(PY) -m pytest $(TESTS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs/bench .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
