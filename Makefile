# The two set-up commands of the README: `make demo` (main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What the product needs (`make demo`), then what the tests need on top (torch, browsers' driver, ...).
RUNTIME := $(VENV)/.runtime-installed
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean bench chaos

$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[dev]'
	# Only the tokenizer ranks of openai-whisper are used (tests): without its dependencies (triton: 1 GB).
	$(BIN)/pip install --quiet --no-deps openai-whisper
	touch $(STAMP)

venv: $(STAMP)

demo: $(RUNTIME)
	$(BIN)/python -m tuberunner demo --output demo-output

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/coordinator_load.py

# The fault matrix (docs/chaos.md): `make chaos` runs 10 minutes; options through ARGS, e.g.
# make chaos ARGS='--duration 60 --runners 2 --videos 4 --seed 7 --json chaos.json'
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py $(ARGS)

clean:
	rm -rf $(VENV) demo-output
