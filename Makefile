# One setup path: `make demo` and `make test` create .venv on first use with the training stack and the test
# tools (`make setup`); `make setup-all` adds every extra CI installs; `make test-all` is CI's run (README, Tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STAMP_ALL := $(VENV)/.installed-all
DIST ?= dist

.PHONY: demo test test-all lint bench setup setup-all wheel clean

setup: $(STAMP)

# torch first, pinned to the CPU build, so pip never resolves a CUDA build for it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Everything CI installs: the serve, export and ray extras and Playwright. The review page's browser test also
# needs Debian's chromium at /usr/bin/chromium (`apt-get install chromium`, optional: without it that test skips).
setup-all: $(STAMP_ALL)

$(STAMP_ALL): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,serve,export,ray]' 'playwright>=1.40'
	touch $(STAMP_ALL)

# The wheel for other machines (the line PC: `pip install 'anomnet-0.1.0-py3-none-any.whl[runtime]'`). A clean
# build/ so no file of an earlier build slips in; pip fetches the build backend (setuptools) like any install.
# WHEEL_FLAGS=-v shows the build backend's output (tests/test_runtime_install.py checks it has no deprecation).
WHEEL_FLAGS ?= --quiet
wheel:
	rm -rf build $(DIST)/anomnet-*.whl
	$(PYTHON) -m pip wheel $(WHEEL_FLAGS) --no-deps --wheel-dir $(DIST) .
	@ls $(DIST)/anomnet-*.whl

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

# CI's run (.ci/run adds chromium and ANOMNET_BROWSER_TEST=required): every extra installed, a missing export
# runtime fails instead of skipping, and the two slow install tests run: the wheel in a torch-free venv
# (tests/test_runtime_install.py) and the README followed in a fresh clone of the last commit
# (tests/test_readme.py).
test-all: $(STAMP_ALL)
	ANOMNET_EXPORT_TEST=required ANOMNET_RUNTIME_INSTALL_TEST=required ANOMNET_README_TEST=required $(MAKE) test

# The headline section of BENCHMARKS.md: PatchCore and AnomNet with AnomNet's ablation; its arguments live in
# benchmarks/sections.py (`--dry-run` prints them). Every other section names the command that produced it.
bench: $(STAMP)
	$(BIN)/python benchmarks/sections.py patchcore-anomnet

clean:
	rm -rf $(VENV) runs build $(DIST)
