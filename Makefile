# Two commands a newcomer needs: `make serve` and `make test`. Each creates the environment it needs.
# Prerequisites: make and python3 (3.10+) with its venv module (Debian/Ubuntu: apt install make python3-venv).
PYTHON ?= python3
VENV ?= .venv
# torch is installed only when the venv has none. PyPI's Linux torch wheel is the CUDA build (large); on a
# machine without a GPU take the CPU wheel: make serve TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
# Loopback only by default: HOST=0.0.0.0 exposes the server (set UNET_SERVER_API_KEY then; the container
# image binds 0.0.0.0 itself).
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv venv-serve serve test test-gpu lint

# Runtime + text extra: what serving needs. Its own stamp, so that `make serve` never pulls the test tools.
$(VENV)/.installed-serve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[text]"
	touch $@

# Runtime + text + dev (test tools, reference libraries): what `make test` needs.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[text,dev]"
	touch $@

venv-serve: $(VENV)/.installed-serve

venv: $(VENV)/.installed

serve: venv-serve
	$(PY) -m server --host $(HOST) --port $(PORT)

test: venv
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q -m "not gpu"

test-gpu: venv
	$(PY) -m pytest -q -m gpu

lint: venv
	$(PY) -m ruff check .
