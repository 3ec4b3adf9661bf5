# Two commands a newcomer needs: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: venv test lint format demo clean

$(BIN)/chipspan: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a looser pin lets pip pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-deps: $(BIN)/chipspan
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/chipspan

test: lint
	$(BIN)/python -m pytest

# The tree is formatted by ruff (settings in pyproject.toml); `make format` rewrites it.
lint: $(VENV)/.test-deps
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .

format: $(VENV)/.test-deps
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: $(BIN)/chipspan
	$(BIN)/chipspan demo

clean:
	rm -rf $(VENV) build *.egg-info
