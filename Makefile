# Two commands a newcomer needs: `make serve` and `make test`. Each creates the environment it needs.
PYTHON ?= python3
VENV ?= .venv
# torch==2.13.0 is the CPU build on the dev/CI machines; on a CUDA host set TORCH_SPEC to a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: venv serve test test-gpu lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[text,dev]"
	touch $@

venv: $(VENV)/.installed

serve: venv
	$(PY) -m server --host $(HOST) --port $(PORT)

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not gpu"

test-gpu: venv
	$(PY) -m pytest -q -m gpu

lint: venv
	$(PY) -m ruff check .
