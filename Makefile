# Two commands: `make run` (set up + the built-in default job) and `make test` (lint, then every test);
# `make test-fast` skips the slow tests and the real torchrun jobs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision/torchcodec are pinned here (not in pyproject) to the builds that install offline on the
# project's CI machines; the package itself accepts any torch >= 2.2.
TORCH := torch==2.14.1 torchvision==0.29.1 torchcodec==0.17.0

.PHONY: setup run test test-fast lint bench clean

$(BIN)/qkd: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip uninstall --quiet --yes qkd 2>/dev/null || true  # this project's name before it became qkd-distill
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/qkd

run: setup
	$(BIN)/qkd run

# ruff first: the whole configured rule set (private names across modules included) in about a second
test: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow and not torchrun"

bench: setup
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/throughput.py

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build dist
