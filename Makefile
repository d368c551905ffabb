# Two entry points do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.condense-installed

.PHONY: setup data demo test test-slow lint bench-perf clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

data:
	bash scripts/get_data.sh

setup: $(STAMP) data

# Distil Fashion-MNIST (ipc 10, best method at the cpu budget), evaluate it, print accuracy + path.
demo: setup
	$(BIN)/condense method=dm dataset=fashion_mnist ipc=10 budget=demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check condense tests benchmarks scripts

clean:
	rm -rf $(VENV) outputs multirun
