# Quick start: `make demo` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
# Pinned here (a CPU wheel is on this project's machines); pyproject keeps an open range for users.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]' "$(TORCH)"
	touch $(STAMP)

setup: $(STAMP)

data/stdlib/meta.json: | $(STAMP)
	$(BIN)/leantrain data prepare --builtin stdlib --profile code --out data/stdlib

demo: $(STAMP) data/stdlib/meta.json
	$(BIN)/leantrain train --recipe tiny

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP) data/stdlib/meta.json
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[bench]' "$(TORCH)"
	$(BIN)/python bench/all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
