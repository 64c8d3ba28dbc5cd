# One setup path: `make demo` and `make test` create .venv and install everything on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench setup clean

setup: $(STAMP)

# torch first, pinned to the CPU build, so pip never resolves a CUDA build for it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/anomnet demo --overwrite

# Lint, format and type checks (settings in pyproject.toml); `make test` runs them before the tests.
LINT_PATHS := src tests benchmarks

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

# pytest exits non-zero (5) when it collects no test, so an emptied or mis-pointed suite fails too.
test: lint
	$(BIN)/python -m pytest -q

# The headline section of BENCHMARKS.md: PatchCore and AnomNet with AnomNet's ablation; its arguments live in
# benchmarks/sections.py (`--dry-run` prints them). Every other section names the command that produced it.
bench: $(STAMP)
	$(BIN)/python benchmarks/sections.py patchcore-anomnet

clean:
	rm -rf $(VENV) runs
