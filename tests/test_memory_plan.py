"""Tests for llave_kit.memory_plan: the estimate against what the tiny models really hold on CPU.

- static part: bytes of parameters + gradients + AdamW moments after a real step, counted tensor by
  tensor (exact), for full fine-tuning and for LoRA, and the growth of the process's resident memory
  for a larger model (within 15 %);
- activations: the bytes autograd saves for backward (saved-tensor hooks) per decoder layer, on a
  shape other than the one the coefficients were read from;
- parameter counts of the full-size recipe models against their published totals.
Run: .venv/bin/python -m pytest -q tests/test_memory_plan.py
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2Model

from llave_kit.encoders import default_model
from llave_kit.lora import add_lora
from llave_kit.memory_plan import (
    RECIPE_MODELS,
    ModelSize,
    Precision,
    estimate_training_memory,
    main,
    model_size,
    plan_table,
    size_of_config,
)
from llave_kit.train import TrainConfig, build_optimizer

FP32 = Precision(weight=4, grad=4, optimizer=8, frozen=4, autocast=False)  # a plain fp32 run


def one_adamw_step(embedder) -> torch.optim.Optimizer:
    from PIL import Image

    optimizer = build_optimizer(embedder, TrainConfig(lr=1e-3))
    embedder.train()
    embedder.encode(["<|image_1|> a red cube", "a blue sphere"],
                    [Image.new("RGB", (84, 84), "red"), None]).sum().backward()
    optimizer.step()
    return optimizer


def held_bytes(embedder, optimizer) -> int:
    """Parameters, gradients and AdamW's m and v, as allocated (the step counters are scalars)."""
    tensors = [p for p in embedder.parameters()] + [p.grad for p in embedder.parameters()
                                                     if p.grad is not None]
    tensors += [state[k] for state in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("lora", [False, True])
def test_static_part_equals_the_tiny_models_parameters_gradients_and_adamw_moments(lora):
    embedder = default_model("tiny-qwen2-vl", ["a red cube", "a blue sphere"], hidden_size=32,
                             freeze_vision=True)  # frozen and trainable parameters both
    size = model_size(embedder)
    if lora:
        add_lora(embedder, {})  # the default spec, which model_size counted the adapters of
    optimizer = one_adamw_step(embedder)
    estimate = estimate_training_memory(size, gpus=1, sharding="ddp", lora=lora,
                                        checkpointing=False, seq_len=1, precision=FP32)
    assert estimate.static == held_bytes(embedder, optimizer)


def test_fsdp_divides_the_static_part_and_ddp_adds_its_gradient_buckets():
    size = size_of_config(RECIPE_MODELS["LLaVA-OV-0.5B"]())
    kwargs = dict(lora=False, checkpointing=True, seq_len=1, precision=FP32)
    two = estimate_training_memory(size, gpus=2, sharding="fsdp", **kwargs).static
    eight = estimate_training_memory(size, gpus=8, sharding="fsdp", **kwargs).static
    unit = 2 * size.layer * 2  # the gathered bf16 layers
    assert eight - unit == pytest.approx((two - unit) / 4)
    ddp_one = estimate_training_memory(size, gpus=1, sharding="ddp", **kwargs).static
    ddp_eight = estimate_training_memory(size, gpus=8, sharding="ddp", **kwargs).static
    assert ddp_eight - ddp_one == size.trainable * 4
    # the kit trains one process unsharded whatever `sharding` says: the table's 1-GPU columns of
    # each FSDP row repeat those of the DDP row with the same model, training and checkpointing
    rows = [line.split(" | ") for line in plan_table().splitlines()[2:]]
    ddp = {(row[0], *row[3:5]): row[5:8] for row in rows if row[2] == "DDP"}
    fsdp = {(row[0], *row[3:5]): row[5:8] for row in rows if row[2] == "FSDP"}
    assert fsdp == ddp and len(fsdp) == 12


RSS_CHILD = textwrap.dedent("""
    import gc, json, sys
    import torch
    from test_memory_plan import held_bytes, one_adamw_step
    from llave_kit.encoders import default_model
    torch.set_num_threads(1)
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    one_adamw_step(default_model("tiny-qwen2-vl", ["a red cube"], hidden_size=32))  # warm-up
    gc.collect()
    before = rss()
    embedder = default_model("tiny-qwen2-vl", ["a red cube"], hidden_size=512, freeze_vision=True)
    optimizer = one_adamw_step(embedder)
    gc.collect()
    print(json.dumps({"grown": rss() - before, "held": held_bytes(embedder, optimizer)}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_resident_memory_grows_by_the_estimated_static_part():
    """A fresh process: RSS growth over building a ~9M-parameter model and one AdamW step."""
    done = subprocess.run([sys.executable, "-c", RSS_CHILD], capture_output=True, text=True,
                          timeout=300, check=True, cwd=Path(__file__).parent)
    measured = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert measured["held"] > 100 * 2**20  # large enough that the allocator's noise is small
    assert measured["grown"] == pytest.approx(measured["held"], rel=0.15)


# --------------------------------------------------------------------------------------------------
# Activations


SHAPE = dict(hidden_size=96, intermediate_size=320, num_attention_heads=6, num_key_value_heads=2)
BATCH, SEQ_LEN = 3, 40


def qwen2_decoder(layers: int) -> Qwen2Model:
    """Another shape than the one the activation coefficients were read from (hidden 128)."""
    torch.manual_seed(0)
    return Qwen2Model(Qwen2Config(vocab_size=50, num_hidden_layers=layers,
                                  attn_implementation="sdpa", **SHAPE)).train()


def saved_for_backward(layers: int, *, autocast: bool, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward over a Qwen2 decoder's forward: weights excluded,
    autocast's bf16 copies of them included. bf16 weights unless autocast (fp32 weights)."""
    model = qwen2_decoder(layers).to(torch.float32 if autocast else torch.bfloat16)
    if checkpointing:
        model.activation_checkpointing_enable()
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=torch.randint(0, 50, (BATCH, SEQ_LEN)), use_cache=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in weights)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_what_autograd_saves_per_layer(autocast, checkpointing):
    measured = (saved_for_backward(4, autocast=autocast, checkpointing=checkpointing)
                - saved_for_backward(2, autocast=autocast, checkpointing=checkpointing)) / 2
    layer = sum(p.numel() for p in qwen2_decoder(1).layers[0].parameters())
    size = ModelSize(trainable=0, frozen=0, lora=0, layer=layer, layers=1, hidden=96,
                     intermediate=320, heads=6, kv_dim=32)
    full, recomputing = (estimate_training_memory(
        size, gpus=1, sharding="ddp", lora=False, checkpointing=ckpt, seq_len=SEQ_LEN,
        precision=Precision(autocast=autocast)) for ckpt in (False, True))
    if checkpointing:  # a layer keeps its input only; the one layer recomputed in backward is
        # no saved tensor of the forward
        expected = (recomputing.per_sequence - full.per_sequence) * BATCH
    else:  # with autocast, plus each layer's bf16 weight copies (the estimate's static part)
        expected = full.per_sequence * BATCH + full.static
    assert measured == pytest.approx(expected, rel=0.02)


# --------------------------------------------------------------------------------------------------
# The recipe models and the table


@pytest.mark.parametrize("name, published", [
    ("LLaVA-OV-0.5B", 0.894e9), ("Qwen2-VL-2B", 2.209e9), ("LLaVA-OV-7B", 8.03e9),
])
def test_recipe_models_have_their_published_parameter_counts(name, published):
    size = size_of_config(RECIPE_MODELS[name]())
    assert size.trainable + size.frozen == pytest.approx(published, rel=0.005)


def test_the_table_says_7b_full_fine_tuning_needs_fsdp_on_80_gb(capsys):
    main(["--gpu-gib", "80", "--seq-len", "1024"])
    rows = {tuple(cell.strip() for cell in line.split("|")[1:6]): line
            for line in capsys.readouterr().out.splitlines()[2:]}
    assert len(rows) == 3 * 2 * 2 * 2
    full_7b_ddp = rows[("LLaVA-OV-7B", "8.03 B (7.09 B / 20.2 M)", "DDP", "full", "on")]
    assert full_7b_ddp.count("no fit") == 2
    full_7b_fsdp = rows[("LLaVA-OV-7B", "8.03 B (7.09 B / 20.2 M)", "FSDP", "full", "on")]
    assert full_7b_fsdp.count("no fit") == 1  # on 1 GPU only


def test_the_readme_shows_the_table_the_module_prints():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert plan_table() in readme
