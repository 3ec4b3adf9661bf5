# Two commands a newcomer needs: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: venv test lint format demo clean gpu-check test-torch-range

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

# chipspan checked on a CUDA GPU (docs/gpu_check.md); without CUDA it runs dry on the CPU.
gpu-check: $(BIN)/chipspan
	$(BIN)/python bench/gpu_check.py $(GPU_CHECK_FLAGS)

# The oldest and newest torch of pyproject.toml's range, each in its own venv, on the tests that
# lean on torch's internals: the emulated chips' C++ build, torch.distributed, the Sophgo rehearsal.
# (PyPI's builds of these releases are CUDA builds of a few GB; they run on the CPU.)
TORCH_OLDEST := 2.8.0
TORCH_NEWEST := 2.14.1
TORCH_RANGE_TESTS := tests/test_emu.py tests/test_sophgo.py tests/test_bm1684x.py tests/test_pipeline.py \
	tests/test_precision.py tests/test_in_backward.py tests/test_distributed.py

.venv-torch%/.ready: pyproject.toml
	$(PYTHON) -m venv .venv-torch$*
	.venv-torch$*/bin/pip install -q --upgrade pip
	.venv-torch$*/bin/pip install -q torch==$*
	.venv-torch$*/bin/pip install -q -e '.[test]'
	touch $@

test-torch-range: .venv-torch$(TORCH_OLDEST)/.ready .venv-torch$(TORCH_NEWEST)/.ready
	for version in $(TORCH_OLDEST) $(TORCH_NEWEST); do \
		.venv-torch$$version/bin/python -m pytest $(TORCH_RANGE_TESTS) || exit 1; \
	done

clean:
	rm -rf $(VENV) .venv-torch* build *.egg-info
