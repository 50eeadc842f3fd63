"""Tests for llave_kit.lora and LoRA training: what trains, what merging preserves, what is saved,
DDP on a real gloo group against one process with the global batch.

Tiny Qwen2-VL and LLaVA-OneVision models (hidden 32, 2 layers) from `encoders.default_model`.
Run: .venv/bin/python -m pytest -q tests/test_lora.py
"""
from __future__ import annotations

import pytest
import torch
from distributed_helpers import run_distributed
from safetensors.torch import load_file, load_model
from tiny_training import TinyEmbedder, collate, make_items

from llave_kit.encoders import MODEL_NAMES, LmmEmbedder, default_model
from llave_kit.lora import add_lora, check_lora_spec, has_lora, merge_lora
from llave_kit.train import TrainConfig, TrainConfigError, train

VOCABULARY = [item["query_text"] + " " + item["pos_text"] + " " + (item["neg_text"] or "")
              for item in make_items(30)]
HIDDEN = 32
SPEC = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in every process, for the DDP comparison
    yield
    torch.set_num_threads(before)


def tiny(name: str = "tiny-qwen2-vl") -> LmmEmbedder:
    return default_model(name, VOCABULARY, hidden_size=HIDDEN)


def embed(embedder, items) -> torch.Tensor:
    embedder.eval()
    with torch.no_grad():
        return embedder.encode([it["query_text"] for it in items], [it["query_image"] for it in items])


def lora_config(output_dir, **overrides) -> TrainConfig:
    params = dict(output_dir=str(output_dir), batch_size=8, max_steps=3, lr=1e-2,
                  warmup_ratio=0.0, temperature=0.1, alpha=3.0, lora=SPEC)
    return TrainConfig.from_dict({**params, **overrides})


# --------------------------------------------------------------------------------------------------
# The spec


def test_spec_defaults_are_filled_and_kept_in_the_config(tmp_path):
    assert check_lora_spec({}) == {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    config = TrainConfig.from_dict({"lora": {"r": 16, "target_modules": ["q_proj"]}})
    assert config.lora == {"r": 16, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj"]}


@pytest.mark.parametrize("spec, problem", [
    ({"rank": 8}, "unknown LoRA key 'rank'"),
    ({"r": 0}, "LoRA r must be an integer >= 1, got 0"),
    ({"r": 8.0}, "LoRA r must be an integer"),
    ({"alpha": -1}, "LoRA alpha must be a number > 0"),
    ({"alpha": "16"}, "LoRA alpha must be a number"),
    ({"dropout": 1.0}, r"LoRA dropout must be a number in \[0, 1\)"),
    ({"target_modules": "q_proj"}, "LoRA target_modules must be a non-empty list"),
    ({"target_modules": []}, "LoRA target_modules must be a non-empty list"),
    ({"target_modules": ["model.q_proj"]}, "LoRA target_modules must be a non-empty list"),
])
def test_a_bad_spec_is_refused_naming_the_key(spec, problem):
    with pytest.raises(ValueError, match=problem):
        check_lora_spec(spec)
    with pytest.raises(TrainConfigError, match=problem):
        TrainConfig.from_dict({"lora": spec})


def test_lora_needs_an_lmm_embedder_and_existing_target_modules(tmp_path):
    with pytest.raises(ValueError, match="a LoRA spec must be a mapping"):
        check_lora_spec(["q_proj"])
    with pytest.raises(TypeError, match="LoRA needs an LmmEmbedder .* got TinyEmbedder"):
        add_lora(TinyEmbedder(), SPEC)
    with pytest.raises(TrainConfigError, match="LoRA needs an LmmEmbedder"):
        train(lora_config(tmp_path / "run"), TinyEmbedder(), make_items(16), collate_fn=collate)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    embedder = tiny()
    with pytest.raises(ValueError, match=r"\['qkv'\] match no linear module of the language model"):
        add_lora(embedder, {"target_modules": ["q_proj", "qkv"]})  # qkv: the vision tower's
    assert not has_lora(embedder)
    add_lora(embedder, SPEC)
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        add_lora(embedder, SPEC)
    merge_lora(embedder)
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        merge_lora(embedder)


def test_a_refused_lora_run_leaves_the_model_as_it_was(tmp_path):
    embedder = tiny()
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in embedder.named_parameters()}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # the output_dir holds another run
    with pytest.raises(TrainConfigError, match="overwrite"):
        train(lora_config(tmp_path / "run"), embedder, make_items(16), collate_fn=collate)
    assert not has_lora(embedder)
    after = dict(embedder.named_parameters())
    assert after.keys() == before.keys()
    for name, (value, trainable) in before.items():
        assert torch.equal(after[name], value) and after[name].requires_grad == trainable, name
    train(lora_config(tmp_path / "run", overwrite=True), embedder, make_items(16), collate_fn=collate)


# --------------------------------------------------------------------------------------------------
# Adapters and merging


def randomise_adapters(embedder) -> None:
    """B starts at zero (the adapted model equals the base one); give it values as training does."""
    with torch.no_grad():
        for name, parameter in embedder.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_adapters_sit_on_the_language_model_only_and_merge_to_the_same_embeddings(name):
    embedder, items = tiny(name), make_items(6)
    base_names = {n: p.requires_grad for n, p in embedder.named_parameters()}
    before = embed(embedder, items)
    add_lora(embedder, SPEC)
    trainable = [n for n, p in embedder.named_parameters() if p.requires_grad]
    # LLaVA-OneVision's SigLIP has q_proj / v_proj too: its vision tower must get none
    assert trainable and all(".language_model." in n and ".lora_" in n for n in trainable)
    adapted_modules = 2 * len(SPEC["target_modules"])  # 2 layers; an A and a B matrix each
    assert len(trainable) == 2 * adapted_modules
    torch.testing.assert_close(embed(embedder, items), before, rtol=0, atol=0)  # B = 0
    randomise_adapters(embedder)
    adapted = embed(embedder, items)
    assert (adapted - before).abs().max() > 1e-2  # the adapters do change the embeddings
    merge_lora(embedder)
    assert not has_lora(embedder)
    torch.testing.assert_close(embed(embedder, items), adapted, rtol=0, atol=1e-5)
    # the base model's own parameter names and trainability, as before add_lora
    assert {n: p.requires_grad for n, p in embedder.named_parameters()} == base_names


def test_a_lora_run_trains_only_the_adapters_and_saves_a_plain_merged_model(tmp_path):
    items = make_items(32)
    model = tiny()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = train(lora_config(tmp_path / "run"), model, items, collate_fn=collate)

    # The last checkpoint holds the weights as trained, before merging.
    trained = load_file(str(result.checkpoint_path / "model.safetensors"))
    adapters = {k: v for k, v in trained.items() if ".lora_" in k}
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if ".lora_" not in k}
    assert base.keys() == start.keys()
    for name, value in base.items():
        assert torch.equal(value, start[name]), f"{name} changed"  # bit-identical
    assert all(v.abs().max() > 0 for k, v in adapters.items() if "lora_B" in k)  # they trained

    # The adapter model, rebuilt from that checkpoint, embeds as the merged and the saved one.
    adapter_model = tiny()
    add_lora(adapter_model, SPEC)
    load_model(adapter_model, str(result.checkpoint_path / "model.safetensors"))
    expected = embed(adapter_model, items[:6])
    assert (expected - embed(tiny(), items[:6])).abs().max() > 1e-3  # training moved them
    assert not has_lora(model)  # train() merged in place
    torch.testing.assert_close(embed(model, items[:6]), expected, rtol=0, atol=1e-5)
    saved = load_file(str(result.final_model_path / "model.safetensors"))
    assert not [k for k in saved if "lora" in k or "base_layer" in k]  # plain transformers names
    reloaded = LmmEmbedder.from_pretrained(result.final_model_path)
    torch.testing.assert_close(embed(reloaded, items[:6]), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# DDP on a real gloo group against one process with the global batch


def lora_run_on_rank(rank, world_size, output_dir, batch_size):
    torch.set_num_threads(1)
    model = default_model("tiny-qwen2-vl", VOCABULARY, hidden_size=HIDDEN, seed=rank)  # DDP
    # broadcasts rank 0's weights; add_lora draws the same adapters everywhere (config.seed)
    result = train(lora_config(output_dir, batch_size=batch_size, lr=1e-3), model, make_items(48),
                   collate_fn=collate)
    return [r["loss"] for r in result.history], model.state_dict()


def test_two_process_ddp_lora_equals_one_process_with_the_global_batch(tmp_path):
    """2 ranks x 6 pairs = the 12 pairs of a single-process step (gathered loss, averaged
    gradients): the adapters, hence the merged weights, come out the same."""
    ranks = run_distributed(2, lora_run_on_rank, str(tmp_path / "ddp"), 6)
    single_losses, single_state = lora_run_on_rank(0, 1, str(tmp_path / "single"), 12)
    (losses, state), (_, other_state) = ranks
    assert losses == pytest.approx(single_losses, rel=1e-5)
    assert all(torch.equal(state[k], other_state[k]) for k in state)
    ddp_adapters, single_adapters = (
        {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if ".lora_" in k}
        for folder in (tmp_path / "ddp" / "checkpoints" / "step_00000003",
                       tmp_path / "single" / "checkpoints" / "step_00000003"))
    assert ddp_adapters.keys() == single_adapters.keys() and ddp_adapters
    for name, value in single_adapters.items():
        torch.testing.assert_close(ddp_adapters[name], value, rtol=1e-4, atol=1e-6, msg=name)
    for name, value in single_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-6, msg=name)
