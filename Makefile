# `make test` and `make demo` set everything up on a fresh machine (Python 3.10+ with venv).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pinned here (not in setup.cfg) so that users keep the build they already have
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbmake --nbmake-timeout=300 nbs

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x tests

demo: $(STAMP)
	$(BIN)/python -m fastai_freeze demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check fastai_freeze tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
