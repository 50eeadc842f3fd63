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

.PHONY: setup test lint reproduce pretrain benchmark gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/python -m ruff check .

reproduce: setup
	$(BIN)/python -m llave_kit run-pipeline $(PIPELINE)

# Remake the shipped starting checkpoints from their recipes (about 1 + 8 minutes on 2 cores).
pretrain: setup
	$(BIN)/python -m llave_kit pretrain configs/pretrain_tiny_dual.yaml checkpoints/tiny-dual-scenes
	$(BIN)/python -m llave_kit pretrain configs/pretrain_tiny_qwen2_vl.yaml checkpoints/tiny-qwen2-vl-scenes

benchmark: setup
	$(BIN)/python benchmarks/bench_tiled_loss.py
	$(BIN)/python benchmarks/bench_data_share.py
	$(BIN)/python benchmarks/bench_evaluation.py

# One GPU, under 5 minutes: loss and matmul TFLOP/s, largest loss batch, train steps/s of a
# LLaVA-OV-0.5B-shaped model under DDP and FSDP; writes runs/gpu_check/gpu_check.{json,md}.
# Without CUDA it prints one line and succeeds.
gpu-check: setup
	$(BIN)/python scripts/gpu_check.py

clean:
	rm -rf runs .pytest_cache

# JupyterLab at the repository root, so the notebooks, figures/ and the summaries can all be
# browsed. LAB_ARGS passes options on, e.g. LAB_ARGS="--no-browser --port 8890".
LAB_ARGS ?=
# jupyter refuses to run as root unless told; containers often run as root.
ROOT_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root)
# browser-check: the Chromium to drive (Playwright only drives it; no `playwright install`), and
# options for scripts/browser_check.py, e.g. BROWSER_CHECK_ARGS="--notebooks 00 01 --timeout 600".
CHROMIUM ?= /usr/bin/chromium
BROWSER_CHECK_ARGS ?=

.PHONY: lab browser-check

$(VENV)/.installed-lab: $(VENV)/.installed
	$(BIN)/python -m pip install -e ".[lab]"
	touch $@

$(VENV)/.installed-browser: $(VENV)/.installed
	$(BIN)/python -m pip install -e ".[lab,browser]"
	touch $@

lab: $(VENV)/.installed-lab
	$(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)" $(ROOT_ARGS) $(LAB_ARGS)

# Runs every notebook in JupyterLab in headless Chromium and checks what shows (not part of `make
# test`: it needs a browser and runs the studies, about as long as `make reproduce`).
browser-check: $(VENV)/.installed-browser
	@test -x "$(CHROMIUM)" || { echo "browser-check: no Chromium at $(CHROMIUM): install it with 'apt-get install -y chromium' (Debian/Ubuntu) or set CHROMIUM=/path/to/chromium" >&2; exit 1; }
	CHROMIUM="$(CHROMIUM)" $(BIN)/python scripts/browser_check.py $(BROWSER_CHECK_ARGS)
