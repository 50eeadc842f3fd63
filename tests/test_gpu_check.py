"""scripts/gpu_check.py: its tiny CPU mode runs every measurement and writes both reports; the
batch search finds the boundary; without CUDA the GPU mode says so in one line and succeeds.
Run: .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("limit", [1000, 1024, 1500, 4095, 4096, 10_000, 63])
def test_batch_search_finds_the_largest_size_that_fits_to_the_resolution(limit):
    search = load_script().largest_fitting
    found = search(lambda size: size <= limit, start=64, cap=8192, resolution=16)
    if limit < 64:
        assert found == {"largest": 0, "capped": False}
    elif limit >= 8192:
        assert found == {"largest": 8192, "capped": True}
    else:
        assert found["capped"] is False and limit - 16 < found["largest"] <= limit


def test_tiny_cpu_mode_measures_everything_and_writes_json_and_markdown(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["tiny"] and result["matmul"]["bf16_tflops"] > 0
    assert result["tiled_loss"]["tflops"] > 0
    assert set(result["largest_batch"]) == {"dense", "tiled"}
    assert all(found["largest"] > 0 for found in result["largest_batch"].values())
    assert [run["sharding"] for run in result["train"]] == ["ddp", "fsdp"]
    assert all(run["steps_per_s"] > 0 and run["query_tokens"] > 36 for run in result["train"])
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("## GPU check") and report.count("| train, ") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_the_check_is_skipped_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "no CUDA GPU: gpu-check skipped"
    assert not any(tmp_path.iterdir())
