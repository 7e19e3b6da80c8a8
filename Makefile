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

.PHONY: help setup train generate eval bench compare test lint clean

help:
	@echo "make setup                                   create .venv (idempotent)"
	@echo "make train [RECIPE=world] [ARGS='k=v ...'] [NPROC=2]   train a recipe (default: the whole world chain)"
	@echo "make generate PROMPT='two red circles' TO=image [RUN=runs/world]  (or IMAGE=x.png / AUDIO=x.wav, TO=text|audio)"
	@echo "make eval RUN=runs/<name>                    held-out scores -> <run>/eval.json, curves -> <run>/plots/"
	@echo "make bench [ARGS='--quick --threads 1']      speed/memory ratios -> runs/bench/bench.json"
	@echo "make compare RUNS='runs/a runs/b'            recipes, evals and curves side by side"
	@echo "make test | lint | clean"

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

train: setup
	@if [ "$(NPROC)" = "1" ] && [ "$(NNODES)" = "1" ]; then \
	    $(PY) scripts/train.py --recipe "$(RECIPE)" $(ARGS); \
	 else $(VENV)/bin/torchrun --nproc_per_node=$(NPROC) --nnodes=$(NNODES) --node_rank=$(NODE_RANK) \
	    --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT) scripts/train.py --recipe "$(RECIPE)" $(ARGS); fi

generate: setup
	$(PY) scripts/generate.py --run "$(RUN)" $(if $(PROMPT),--prompt "$(PROMPT)") $(if $(IMAGE),--image "$(IMAGE)") \
	    $(if $(AUDIO),--audio "$(AUDIO)") $(if $(TO),--to $(TO)) $(GEN_ARGS)

eval: setup
	$(PY) scripts/evaluate.py --run "$(RUN)" $(ARGS)

bench: setup
	$(PY) scripts/bench.py $(ARGS)

compare: setup
	$(PY) scripts/compare.py $(RUNS)

test: setup
	$(PY) -m pytest $(TESTS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs/bench .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
