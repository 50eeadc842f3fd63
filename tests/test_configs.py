"""Every config in configs/ is a valid training config; the LLaVE recipes say what the paper says
and fit an 80 GB GPU by the kit's own memory estimate.
Run: .venv/bin/python -m pytest -q tests/test_configs.py
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llave_kit.cli import load_config
from llave_kit.memory_plan import GIB, RECIPE_MODELS, estimate_training_memory, size_of_config
from llave_kit.train import TrainConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
RECIPES = {"llave_0.5b.yaml": ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "LLaVA-OV-0.5B"),
           "llave_2b.yaml": ("Qwen/Qwen2-VL-2B-Instruct", "Qwen2-VL-2B")}
GPUS = 8  # the recipes' node, as their comments say


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_is_a_valid_train_config(path):
    params = yaml.safe_load(path.read_text())
    if "train" in params:  # a `make pretrain` recipe: its training fields sit under `train`
        TrainConfig.from_dict(params["train"])
    else:
        load_config(path)


def test_every_recipe_is_tested():
    assert {p.name for p in CONFIGS if p.name.startswith("llave_")} == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_llave_recipes_follow_the_paper_and_fit_80_gb(name):
    config = load_config(Path(__file__).parent.parent / "configs" / name)
    model_id, shape = RECIPES[name]
    assert config.model == model_id
    assert (config.loss, config.temperature, config.alpha) == ("hardness_weighted", 0.02, 9.0)
    assert (config.lr, config.warmup_ratio, config.schedule, config.epochs) == (1e-5, 0.03, "cosine", 1)
    assert config.precision == "bf16"
    assert config.batch_size * GPUS * config.grad_accum_steps == 256
    assert config.grad_accum_steps == 1  # all 256 in one contrastive batch
    estimate = estimate_training_memory(
        size_of_config(RECIPE_MODELS[shape]()), gpus=GPUS, sharding=config.sharding,
        lora=config.lora is not None, checkpointing=config.gradient_checkpointing, seq_len=1024)
    assert estimate.largest_chunk(80 * GIB) >= config.gradcache_chunk_size


def test_the_2b_recipe_shards_and_checkpoints():
    config = load_config(Path(__file__).parent.parent / "configs" / "llave_2b.yaml")
    assert (config.sharding, config.gradient_checkpointing) == ("fsdp", True)
