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
	$(BIN)/anomnet demo

# Lint, format and type checks (settings in pyproject.toml); `make test` runs them before the tests.
LINT_PATHS := src tests benchmarks

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

# pytest exits non-zero (5) when it collects no test, so an emptied or mis-pointed suite fails too.
test: lint
	$(BIN)/python -m pytest -q

# The headline section of BENCHMARKS.md: PatchCore and AnomNet with AnomNet's ablation (about 15 min
# on an idle 2-core machine). Every other section names the command that produced it.
bench: $(STAMP)
	$(BIN)/anomnet bench --data ../shared/datasets/mvtec_ad/bottle --section patchcore-anomnet --memory-images 1000 --models patchcore,anomnet \
 --variant 'a:model=anomnet;stages=1;use_att=false;use_sep=true;use_ent=true;use_con=false' \
 --variant 'b:model=anomnet;stages=1;use_att=false;use_sep=true;use_ent=true;use_con=true' \
 --variant 'c:model=anomnet;use_sep=false;use_ent=false;use_con=false' \
 --variant 'd:model=anomnet;use_sep=false;use_ent=true;use_con=false' \
 --variant 'e:model=anomnet;use_sep=true;use_ent=false;use_con=false' \
 --variant 'f:model=anomnet;use_sep=true;use_ent=true;use_con=false' \
 --variant 'lambda-0:model=anomnet;lambda_con=0' \
 --variant 'lambda-0.2:model=anomnet;lambda_con=0.2' \
 --variant 'lambda-2:model=anomnet;lambda_con=2' \
 --variant 'lambda-8:model=anomnet;lambda_con=8' \
 --variant 'no-training:model=anomnet;epochs1=0;epochs2=0' \
 --variant 'stress-residual:model=anomnet;stages=1;use_sep=false;use_ent=false;use_con=false;lr=1e-2;epochs1=60' \
 --variant 'stress-plain:model=anomnet;adapter=plain;stages=1;use_sep=false;use_ent=false;use_con=false;lr=1e-2;epochs1=60'

clean:
	rm -rf $(VENV) runs
