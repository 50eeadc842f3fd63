# Two entry points for a fresh machine: `make reproduce` and `make test`.
# Both create .venv if it is absent and install the kit into it.
#   TORCH_SPEC   what to install when the venv has no torch (default: the CPU build pinned below;
#                e.g. TORCH_SPEC="torch==2.5.1" or a CUDA wheel spec on a GPU machine)
#   VENV_ARGS    e.g. VENV_ARGS=--system-site-packages to reuse a torch already installed system-wide
#   PYTHON       interpreter used to create the venv
PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
TORCH_SPEC ?= torch==2.13.0
PIPELINE ?= pipelines/cpu_demo.yaml
BIN := $(VENV)/bin

.PHONY: setup test reproduce pretrain benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

reproduce: setup
	$(BIN)/python -m llave_kit run-pipeline $(PIPELINE)

# Remake the shipped starting checkpoints from their recipes (about 1 + 8 minutes on 2 cores).
pretrain: setup
	$(BIN)/python -m llave_kit pretrain configs/pretrain_tiny_dual.yaml checkpoints/tiny-dual-scenes
	$(BIN)/python -m llave_kit pretrain configs/pretrain_tiny_qwen2_vl.yaml checkpoints/tiny-qwen2-vl-scenes

benchmark: setup
	$(BIN)/python benchmarks/bench_tiled_loss.py
	$(BIN)/python benchmarks/bench_data_share.py

clean:
	rm -rf runs .pytest_cache
