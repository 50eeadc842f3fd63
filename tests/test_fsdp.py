"""Sharded training (FSDP2) on real gloo process groups against DDP and one process.

The model is the tiny Qwen2-VL embedder (hidden 32, vision tower frozen as in LLaVE), in float64
where the runs are compared step by step, so that FSDP and DDP agree to rounding (~1e-15).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from distributed_helpers import run_distributed
from safetensors.torch import load_file
from tiny_training import collate, make_items

from llave_kit import train as train_module
from llave_kit.encoders import LmmEmbedder, default_model
from llave_kit.gradcache import Encoder, contrastive_backward
from llave_kit.losses import make_loss
from llave_kit.train import TrainConfig, TrainConfigError, train

ITEMS = make_items(24)
VOCABULARY = [text for item in ITEMS for text in (item["query_text"], item["pos_text"],
                                                   item["neg_text"] or "")]
LOCAL_BATCHES = {2: [3, 4], 3: [3, 1, 3]}  # global batch 7: not divisible by the world size
STEPS = 3


def tiny_lmm(seed: int = 0, dtype=torch.float64) -> LmmEmbedder:
    return default_model("tiny-qwen2-vl", VOCABULARY, seed=seed, hidden_size=32, dtype=dtype,
                         freeze_vision=True)


def global_batch(step: int) -> list[dict]:
    """The 7 items of a step; the 4th is text-only, so a rank holding only it has no image and
    leaves the projector unused."""
    items = [dict(item) for item in ITEMS[7 * step: 7 * step + 7]]
    items[3]["query_image"], items[3]["query_text"] = None, items[3]["query_text"][12:]
    return items


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every weight, gathered when sharded (a collective): empty on ranks other than 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}


def steps_on_rank(rank, world_size, output_dir, shardings=("ddp", "fsdp")):
    """STEPS optimizer steps on this rank's slice of each global batch, for every sharding and
    GradCache setting, through train()'s own step; the records and the final weights."""
    torch.set_num_threads(1)
    sizes = LOCAL_BATCHES.get(world_size, [7])
    start = sum(sizes[:rank])
    outcomes = {}
    for sharding in shardings:
        for gradcache in (None, 2):
            cfg = TrainConfig(output_dir=f"{output_dir}/{sharding}-{gradcache}",
                              batch_size=sizes[rank], lr=1e-3, temperature=0.1, alpha=3.0,
                              max_steps=STEPS, warmup_ratio=0.0, schedule="constant",
                              max_grad_norm=0.5, sharding=sharding,
                              gradcache_chunk_size=gradcache)
            model = tiny_lmm(seed=rank)  # rank 0's weights must reach every rank
            run = train_module._build_run(cfg, model, ITEMS, None)
            batches = (collate(global_batch(step)[start:start + sizes[rank]])
                       for step in range(STEPS))
            records = [train_module._train_step(run, batches, step + 1, None)
                       for step in range(STEPS)]
            outcomes[sharding, gradcache] = records, full_weights(model)
    return outcomes


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_steps_equal_ddp_and_one_process_on_the_global_batch(tmp_path, world_size):
    """Uneven local batches (and explicit negatives), the gather, clipping (the norm is always
    above 0.5), GradCache with ranks that need different numbers of chunks, a rank without
    images: FSDP ends with the weights of DDP and of one process holding the global batch."""
    ranks = run_distributed(world_size, steps_on_rank, str(tmp_path / "ranks"))
    single = steps_on_rank(0, 1, str(tmp_path / "single"), ["ddp"])
    for key, (records, weights) in ranks[0].items():
        single_records, single_weights = single["ddp", key[1]]
        for got, want in zip(records, single_records):
            # records hold float32 sums over ranks
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), key
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6), key
            assert got["grad_norm"] > 0.5  # clipped
            assert got["candidates_per_query"] == want["candidates_per_query"]
        assert weights.keys() == single_weights.keys()
        ddp_weights = ranks[0]["ddp", key[1]][1]
        for name, value in single_weights.items():
            # Three processes' float64 gradients differ from one's by up to ~1e-6 relative
            # (DDP and FSDP alike; two processes agree to 1e-15), which Adam's first steps pass
            # on to the weights; FSDP and DDP agree to rounding.
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6,
                                       msg=f"{key} {name}")
            torch.testing.assert_close(weights[name], ddp_weights[name], rtol=1e-10,
                                       atol=1e-12, msg=f"{key} {name}")
    # 7 positives + the explicit negatives of items 0, 2, 4, 6 of step 1
    assert single["ddp", None][0][0]["candidates_per_query"] == 7 + 4


# --------------------------------------------------------------------------------------------------
# train() end to end: resume, the consolidated final model, LoRA


class InterruptAtCall(torch.nn.Module):
    """The configured loss, except that its n-th call stops the run as a killed process would."""

    def __init__(self, cfg: TrainConfig, call: int):
        super().__init__()
        self.loss, self.call, self.calls = train_module.build_loss(cfg, gather=True), call, 0

    def forward(self, query, target):
        self.calls += 1
        if self.calls == self.call:
            raise KeyboardInterrupt("simulated interruption")
        return self.loss(query, target)


def runs_on_rank(rank, world_size, output_dir):
    torch.set_num_threads(1)
    common = dict(batch_size=3, max_steps=4, save_every=2, lr=1e-3, temperature=0.1, alpha=3.0,
                  sharding="fsdp", gradcache_chunk_size=2)
    straight_cfg = TrainConfig(output_dir=f"{output_dir}/straight", **common)
    model = tiny_lmm(dtype=torch.float32)
    straight = train(straight_cfg, model, ITEMS, collate_fn=collate)

    cfg = TrainConfig(output_dir=f"{output_dir}/resumed", **common)
    try:  # in step 3, after the step-2 checkpoint
        train(cfg, tiny_lmm(dtype=torch.float32), ITEMS, collate_fn=collate,
              loss_fn=InterruptAtCall(cfg, 3))
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    stopped_at = sorted(p.name for p in (straight.output_dir.parent / "resumed" / "checkpoints")
                        .iterdir())
    # gradient checkpointing may change on resume: the same computation, in less memory
    resumed = train(TrainConfig.from_dict({**cfg.to_dict(), "resume": True,
                                           "gradient_checkpointing": True}),
                    tiny_lmm(seed=5, dtype=torch.float32), ITEMS, collate_fn=collate)

    # the trained, still sharded model embeds on every rank together
    with torch.no_grad():
        in_memory = model.encode_queries([ITEMS[0]["query_text"]], [ITEMS[0]["query_image"]])

    lora = {}
    for sharding in ("ddp", "fsdp"):
        lora_cfg = TrainConfig(output_dir=f"{output_dir}/lora-{sharding}",
                               **{**common, "sharding": sharding, "save_every": None},
                               lora={"r": 4, "dropout": 0.1},
                               gradient_checkpointing=sharding == "fsdp")
        lora[sharding] = train(lora_cfg, tiny_lmm(dtype=torch.float32), ITEMS,
                               collate_fn=collate).history
    return straight.history, resumed.history, stopped_at, in_memory, lora


def read_final(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_sharded_train_resumes_exactly_and_saves_a_plain_model(tmp_path):
    """One 2-process launch: a sharded run stopped after its step-2 checkpoint and resumed (with
    gradient checkpointing switched on) ends as the uninterrupted one; final/ is a consolidated
    save_pretrained folder that loads and embeds like the trained model; LoRA under FSDP (with
    gradient checkpointing) merges into the same model as under DDP (without)."""
    out = tmp_path / "runs"
    straight, resumed, stopped_at, in_memory, lora = run_distributed(2, runs_on_rank, str(out))[0]
    keys = ("step", "loss", "lr", "grad_norm", "candidates_per_query", "global_batch")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    assert stopped_at == ["step_00000002"]
    a, b = read_final(out / "straight"), read_final(out / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    checkpoint = out / "straight" / "checkpoints" / "step_00000004"
    assert (checkpoint / "sharded" / ".metadata").exists()
    assert not (checkpoint / "model.safetensors").exists()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["sharded"] is True
    assert [p.name for p in out.rglob(".*") if p.name != ".metadata"] == []  # no staging left

    reloaded = LmmEmbedder.from_pretrained(out / "straight" / "final")
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    with torch.no_grad():
        emb = reloaded.encode_queries([ITEMS[0]["query_text"]], [ITEMS[0]["query_image"]])
    torch.testing.assert_close(emb, in_memory, rtol=1e-5, atol=1e-6)
    untrained = tiny_lmm(dtype=torch.float32).state_dict()
    changed = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, untrained[k])]
    assert changed and not any("visual.blocks" in k for k in changed)  # the frozen tower stays

    ddp, fsdp = read_final(out / "lora-ddp"), read_final(out / "lora-fsdp")
    assert not any("lora" in name for name in fsdp)  # merged: plain weights
    assert ddp.keys() == fsdp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [r["loss"] for r in lora["fsdp"]] == pytest.approx([r["loss"] for r in lora["ddp"]],
                                                              rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Gradient checkpointing, configuration


def test_gradient_checkpointing_stores_less_and_keeps_the_gradients():
    loss_fn = make_loss("hardness_weighted", alpha=3.0, temperature=0.1)
    batch = collate(global_batch(0))
    grads, stored = [], []
    for checkpointing in (False, True):
        model = tiny_lmm().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        sizes = []  # what autograd keeps for backward outside checkpointed layers

        def keep(tensor, sizes=sizes):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            contrastive_backward(Encoder(model), loss_fn, batch)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        stored.append(sum(sizes))
    assert stored[1] < 0.7 * stored[0], stored
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("fields, message", [
    ({"sharding": "zero3"}, "sharding must be one of ('ddp', 'fsdp'), got 'zero3'"),
    ({"gradient_checkpointing": True}, "gradient_checkpointing=True needs a model with "
                                       "gradient_checkpointing_enable"),
    ({"sharding": "fsdp"}, "sharding='fsdp' shards an LmmEmbedder"),
])
def test_sharding_and_checkpointing_mistakes_are_named(tmp_path, fields, message):
    from tiny_training import TinyEmbedder

    with pytest.raises(TrainConfigError, match=re.escape(message)):
        cfg = TrainConfig.from_dict({"output_dir": str(tmp_path / "run"), "batch_size": 4,
                                     **fields})
        train(cfg, TinyEmbedder(), ITEMS, collate_fn=collate)
    assert not (tmp_path / "run").exists()


def test_fsdp_on_a_torch_without_unused_parameter_reduction_is_refused(tmp_path, monkeypatch):
    from torch.distributed.fsdp import FSDPModule

    monkeypatch.delattr(FSDPModule, "set_reduce_scatter_unused_params")  # as before torch 2.13
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, sharding="fsdp")
    with pytest.raises(TrainConfigError, match=r"sharding='fsdp' needs torch >= 2\.13"):
        train(cfg, tiny_lmm(), ITEMS, collate_fn=collate)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# torchrun end to end


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed next to this interpreter")
def test_torchrun_fsdp_trains_the_tiny_lmm_to_the_ddp_weights(tmp_path):
    from llave_kit.scenes import make_scenes_dataset

    scenes = make_scenes_dataset(tmp_path / "scenes", n_train=16, n_eval=4, num_candidates=4,
                                 tasks=["cls_object"], seed=0)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model: tiny-qwen2-vl\ndata: {scenes.root}\nbatch_size: 3\nmax_steps: 2\n"
                      "lr: 1e-3\ntemperature: 0.05\ngradcache_chunk_size: 2\n")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for sharding in ("ddp", "fsdp"):
        done = subprocess.run(
            [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "llave_kit.train",
             "--config", str(config), f"sharding={sharding}",
             f"output_dir={tmp_path / sharding}"],
            env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "fsdp" / "checkpoints" / "step_00000002" /
                        "trainer_state.json").read_text())
    assert state["sharded"] is True and state["config"]["sharding"] == "fsdp"
    ddp, fsdp = read_final(tmp_path / "ddp"), read_final(tmp_path / "fsdp")
    assert ddp.keys() == fsdp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-5, atol=1e-6, msg=name)
    assert LmmEmbedder.from_pretrained(tmp_path / "fsdp" / "final").embedding_dim == 128
