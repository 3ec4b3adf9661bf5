# Two commands a newcomer needs: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: venv test demo clean

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

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest

demo: $(BIN)/chipspan
	$(BIN)/chipspan demo

clean:
	rm -rf $(VENV) build *.egg-info
