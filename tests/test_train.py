"""Training loop: GradCache against full-batch gradients, a hand-written reference step, exact
resume, the non-finite guard, torchrun-style DDP on gloo against one process, config handling.

The embedder here is a stand-in (`tiny_training.TinyEmbedder`) so that every test runs in seconds
without the real encoders or data modules.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from distributed_helpers import run_distributed
from safetensors.torch import load_file
from tiny_training import FaultAtCall, TinyEmbedder, collate, make_items

from llave_kit import train as train_module
from llave_kit.checkpoints import latest_checkpoint
from llave_kit.gradcache import Encoder, contrastive_backward
from llave_kit.losses import make_loss
from llave_kit.train import NonFiniteLossError, TrainConfig, lr_factor, train


def config(tmp_path, **overrides) -> TrainConfig:
    params = dict(output_dir=str(tmp_path / "run"), batch_size=8, max_steps=6, lr=1e-2,
                  warmup_ratio=0.2, temperature=0.1, alpha=3.0, seed=0)
    params.update(overrides)
    return TrainConfig.from_dict(params)


def parameter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# GradCache


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 100])
@pytest.mark.parametrize("loss_name, kwargs", [
    ("hardness_weighted", dict(alpha=9.0, temperature=0.02)),
    ("info_nce", dict(temperature=0.05, symmetric=False)),
])
def test_gradcache_gradient_equals_full_batch_backward(chunk_size, loss_name, kwargs):
    model = TinyEmbedder().double()
    batch = collate(make_items(10))  # 10 queries, 15 targets (5 explicit negatives)
    loss_fn = make_loss(loss_name, **kwargs)

    # Reference: embed everything with a graph, one loss, one backward.
    query = model.encode(batch["query_texts"], batch["query_images"])
    target = model.encode(batch["pos_texts"] + batch["neg_texts"],
                          batch["pos_images"] + batch["neg_images"])
    expected_loss = loss_fn(query, target)
    expected_loss.backward()
    expected = parameter_grads(model)
    model.zero_grad()

    loss = contrastive_backward(Encoder(model), loss_fn, batch, chunk_size=chunk_size)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    got = parameter_grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


NEEDS_CUDA = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = pytest.param("cuda", marks=NEEDS_CUDA)


def rng_state(device):
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_gradcache_replays_dropout_masks(device):
    """The graph pass must draw the no-grad pass's dropout masks, or the cached gradients would
    belong to different embeddings. Reference: the same chunks embedded with a graph, from the
    same RNG state, then one backward."""
    model = TinyEmbedder(dropout=0.5).double().to(device).train()
    batch = collate(make_items(9))
    loss_fn = make_loss("hardness_weighted", alpha=9.0, temperature=0.05)
    chunk = 4

    torch.manual_seed(123)
    parts = []
    for texts, images in [(batch["query_texts"], batch["query_images"]),
                          (batch["pos_texts"] + batch["neg_texts"],
                           batch["pos_images"] + batch["neg_images"])]:
        parts.append(torch.cat([model.encode(texts[i:i + chunk], images[i:i + chunk])
                                for i in range(0, len(texts), chunk)]))
    loss_fn(parts[0], parts[1]).backward()
    expected, rng_after = parameter_grads(model), rng_state(device)
    model.zero_grad()

    torch.manual_seed(123)
    contrastive_backward(Encoder(model), loss_fn, batch, chunk_size=chunk)
    for name, grad in parameter_grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    # The replay must not advance the RNG: training continues as after one chunked pass.
    assert torch.equal(rng_state(device), rng_after)


# --------------------------------------------------------------------------------------------------
# Schedule, one step against a hand-written reference


@pytest.mark.parametrize("total, warmup", [(100, 3), (10, 0), (7, 6)])
def test_lr_schedule_matches_transformers_cosine_with_warmup(total, warmup):
    from transformers import get_cosine_schedule_with_warmup  # slow import: spawned ranks skip it

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    for step in range(total):
        expected = optimizer.param_groups[0]["lr"]
        assert lr_factor(step, total, warmup, "cosine") == pytest.approx(expected)
        optimizer.step()
        reference.step()


def test_first_step_equals_hand_written_reference(tmp_path):
    """Data order (seeded permutation), accumulation (mean of two batches' gradients), clipping,
    AdamW with decay on matrices only, warm-up-free constant lr: all written out by hand."""
    items = make_items(40)
    cfg = config(tmp_path, max_steps=1, grad_accum_steps=2, warmup_ratio=0.0, schedule="constant",
                 weight_decay=0.1, max_grad_norm=0.05)
    model = TinyEmbedder(seed=1)
    reference = TinyEmbedder(seed=1)
    train(cfg, model, items, collate_fn=collate)

    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    loss_fn = make_loss("hardness_weighted", alpha=cfg.alpha, temperature=cfg.temperature)
    for k in range(2):
        batch = collate([items[i] for i in order[8 * k: 8 * (k + 1)]])
        query = reference.encode(batch["query_texts"], batch["query_images"])
        target = reference.encode(batch["pos_texts"] + batch["neg_texts"],
                                  batch["pos_images"] + batch["neg_images"])
        (loss_fn(query, target) / 2).backward()
    params = list(reference.parameters())
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    assert norm > cfg.max_grad_norm  # the clipping is exercised
    with torch.no_grad():
        for p in params:
            g = p.grad * cfg.max_grad_norm / (norm + 1e-6)
            decay = cfg.weight_decay if p.dim() >= 2 else 0.0
            # AdamW's first step: m/(sqrt(v)+eps) with bias correction is g / (|g| + eps).
            p.mul_(1 - cfg.lr * decay).sub_(cfg.lr * g / (g.abs() + 1e-8))
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------
# A run end to end: learning, outputs, resume, guard rails


def test_training_lowers_the_loss_and_writes_the_output_dir(tmp_path, capsys):
    cfg = config(tmp_path, max_steps=30, save_every=10, keep_last=2, log_every=5)
    seen = []
    model = TinyEmbedder()

    def eval_fn(m):
        seen.append(m.training)
        return {"norm": float(sum(p.norm() for p in m.parameters()))}

    result = train(cfg, model, make_items(64), collate_fn=collate, eval_fn=eval_fn)
    out = tmp_path / "run"
    losses = [r["loss"] for r in result.history]
    assert [r["step"] for r in result.history] == [5, 10, 15, 20, 25, 30]
    assert np.mean(losses[-2:]) < 0.8 * losses[0]
    assert read_jsonl(out / "metrics.jsonl") == result.history
    assert set(result.history[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "global_batch",
                                      "candidates_per_query", "examples_per_s", "elapsed_s"}
    # what the loss contrasts: 8 positives and the explicit negatives (every 2nd item has one)
    assert result.history[0]["global_batch"] == 8
    expected = []
    for step in [5, 10, 15, 20, 25, 30]:
        epoch, batch = divmod(step - 1, 8)
        order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch)).tolist()
        expected.append(8 + sum(i % 2 == 0 for i in order[8 * batch: 8 * batch + 8]))
    assert [r["candidates_per_query"] for r in result.history] == expected
    assert "global batch 8" in capsys.readouterr().err
    assert [r["step"] for r in result.eval_history] == [0, 30] and seen == [False, False]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000020",
                                                                        "step_00000030"]
    assert result.checkpoint_path == out / "checkpoints" / "step_00000030"
    assert json.loads((out / "config.json").read_text()) == cfg.to_dict()
    state = json.loads((result.checkpoint_path / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (30, 3, 6)  # 8 batches/epoch
    final = load_file(str(result.final_model_path / "model.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(final[name], value)


class InterruptAtCall(nn.Module):
    """The configured loss, except that its n-th call stops the run as a killed process would."""

    def __init__(self, cfg: TrainConfig, call: int):
        super().__init__()
        self.loss, self.call, self.calls = train_module.build_loss(cfg, gather=False), call, 0

    def forward(self, query, target):
        self.calls += 1
        if self.calls == self.call:
            raise KeyboardInterrupt("simulated interruption")
        return self.loss(query, target)


@pytest.mark.parametrize("gradcache", [None, 5])
def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_losses(tmp_path, gradcache):
    """40 items, batch 8, 2 batches a step: 2.5 steps an epoch, so the resume lands mid-epoch and
    the run crosses several epochs; dropout makes the RNG state matter."""
    items = make_items(40)
    common = dict(max_steps=9, grad_accum_steps=2, save_every=3, gradcache_chunk_size=gradcache)
    straight = train(config(tmp_path / "a", **common), TinyEmbedder(dropout=0.2), items,
                     collate_fn=collate)

    cfg = config(tmp_path / "b", **common)
    with pytest.raises(KeyboardInterrupt):  # in step 8 (2 losses a step), after the step-6 save
        train(cfg, TinyEmbedder(dropout=0.2), items, collate_fn=collate,
              loss_fn=InterruptAtCall(cfg, 2 * 7 + 1))
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step_00000006"
    logged = read_jsonl(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, 8))
    torch.manual_seed(999)  # a fresh process: other RNG state, other initial weights
    resumed = train(TrainConfig.from_dict({**cfg.to_dict(), "resume": True}),
                    TinyEmbedder(dropout=0.2, seed=5), items, collate_fn=collate)

    keys = ("step", "loss", "lr", "grad_norm", "epoch")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys]
                                                               for r in straight.history]
    assert read_jsonl(tmp_path / "b" / "run" / "metrics.jsonl") == resumed.history
    a, b = (load_file(str(r.final_model_path / "model.safetensors")) for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_existing_run_is_resumed_replaced_or_refused(tmp_path):
    items, cfg = make_items(24), config(tmp_path, max_steps=3, save_every=1, keep_last=3)
    first = train(cfg, TinyEmbedder(), items, collate_fn=collate, eval_fn=lambda m: {"x": 1.0})
    again = train(TrainConfig.from_dict({**cfg.to_dict(), "resume": True}), TinyEmbedder(seed=3),
                  items, collate_fn=collate, eval_fn=lambda m: {"x": 2.0})
    assert again.history == first.history and again.eval_history == first.eval_history
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg, TinyEmbedder(), items, collate_fn=collate)
    with pytest.raises(ValueError, match="batch_size=8"):
        train(TrainConfig.from_dict({**cfg.to_dict(), "resume": True, "batch_size": 4}),
              TinyEmbedder(), items, collate_fn=collate)

    replaced = train(TrainConfig.from_dict({**cfg.to_dict(), "overwrite": True, "max_steps": 2}),
                     TinyEmbedder(seed=4), items, collate_fn=collate, eval_fn=lambda m: {"x": 3.0})
    out = tmp_path / "run"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert read_jsonl(out / "eval.jsonl") == [{"step": 0, "x": 3.0}, {"step": 2, "x": 3.0}]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001",
                                                                        "step_00000002"]
    assert replaced.history[0]["loss"] != first.history[0]["loss"]  # other initial weights


def test_a_save_killed_half_way_is_ignored_then_cleaned_up(tmp_path):
    """Saves are staged under hidden names and renamed: what a killed save leaves is never read as
    a checkpoint, and the next run in that output_dir deletes it."""
    items, cfg = make_items(24), config(tmp_path, max_steps=2, save_every=1)
    train(cfg, TinyEmbedder(), items, collate_fn=collate)
    out = tmp_path / "run"
    stale = [out / "checkpoints" / ".step_00000003.staging-0a1b2c3d", out / ".final.staging-0a1b",
             out / ".checkpoints.old-0a1b2c3d"]  # an overwrite killed while it deleted
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(out).name == "step_00000002"
    train(TrainConfig.from_dict({**cfg.to_dict(), "resume": True, "max_steps": 3}), TinyEmbedder(),
          items, collate_fn=collate)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]
    assert [p.name for p in out.rglob(".*")] == []  # no staging folder or temporary file is left


def nan_embeddings_at_call(model: TinyEmbedder, call: int) -> TinyEmbedder:
    encode, calls = model.encode, [0]

    def poisoned(texts, images):
        calls[0] += 1
        emb = encode(texts, images)
        return emb * float("nan") if calls[0] == call else emb

    model.encode = poisoned
    return model


@pytest.mark.parametrize("source", ["loss", "embeddings"])
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, source):
    cfg = config(tmp_path, max_steps=8, save_every=2)
    model, loss_fn = TinyEmbedder(), None
    if source == "loss":
        loss_fn = FaultAtCall(5)
    else:
        model = nan_embeddings_at_call(model, 2 * 5)  # two encode calls a step: step 5's targets
    with pytest.raises(NonFiniteLossError, match="at step 5") as error:
        train(cfg, model, make_items(32), collate_fn=collate, loss_fn=loss_fn)
    out = tmp_path / "run"
    assert error.value.step == 5 and error.value.checkpoint == out / "checkpoints" / "step_00000004"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    saved = load_file(str(out / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


@pytest.mark.parametrize("device, precision", [
    ("cpu", "bf16"),
    pytest.param("cuda", "fp16", marks=NEEDS_CUDA),
    pytest.param("cuda", "bf16", marks=NEEDS_CUDA),
])
def test_mixed_precision_trains(tmp_path, device, precision):
    """bf16 autocast on CPU; on CUDA fp16 (with a GradScaler) and bf16, through GradCache."""
    result = train(config(tmp_path, device=device, precision=precision, max_steps=12,
                          gradcache_chunk_size=6), TinyEmbedder(dropout=0.1), make_items(64),
                   collate_fn=collate)
    losses = [r["loss"] for r in result.history]
    assert all(math.isfinite(x) for x in losses) and np.mean(losses[-3:]) < losses[0]
    tensors = load_file(str(result.checkpoint_path / "trainer_state.safetensors"))
    assert ("rng.0.cuda" in tensors) == (device == "cuda")


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        train(config(tmp_path, device="cpu", precision="fp16"), TinyEmbedder(), make_items(16),
              collate_fn=collate)


# --------------------------------------------------------------------------------------------------
# torchrun-style DDP on a real gloo group against one process with the global batch


def ddp_runs_on_rank(rank, world_size, output_dir, batch_size):
    """Per GradCache setting: first step's gradients through train()'s own wiring, then 4 steps."""
    torch.set_num_threads(1)
    items, outcomes = make_items(48), {}
    for gradcache in (None, 3):
        cfg = TrainConfig(output_dir=f"{output_dir}/{gradcache}", batch_size=batch_size,
                          max_steps=4, lr=1e-2, temperature=0.1, alpha=3.0, warmup_ratio=0.0,
                          gradcache_chunk_size=gradcache)
        probe = TinyEmbedder(seed=rank)  # DDP must broadcast rank 0's weights
        run = train_module._build_run(cfg, probe, items, None)
        batch = next(train_module.micro_batches(items, cfg, collate, run.runtime))
        contrastive_backward(run.net, run.loss_fn, batch, chunk_size=gradcache)
        grads = parameter_grads(probe)
        model = TinyEmbedder(seed=rank)  # a model of its own: two DDP wrappers must not share
        result = train(cfg, model, items, collate_fn=collate)
        outcomes[gradcache] = grads, [r["loss"] for r in result.history], model.state_dict()
    return outcomes


def test_two_process_ddp_equals_one_process_with_the_global_batch(tmp_path):
    """Rank r takes every 2nd item of the same permutation, so the 2 x 6 items of a DDP step are
    the 12 items of a single-process step: gathered loss + DDP averaging = global-batch gradient,
    with and without GradCache. Targets are text-only, so GradCache's last (synchronised) chunk
    leaves the image weights unused. (Adam is blind to a gradient's scale: compare gradients.)"""
    ranks = run_distributed(2, ddp_runs_on_rank, str(tmp_path / "ddp"), 6)
    single = ddp_runs_on_rank(0, 1, str(tmp_path / "single"), 12)
    for gradcache in (None, 3):
        (grads, losses, state), (other_grads, _, other_state) = (r[gradcache] for r in ranks)
        single_grads, single_losses, _ = single[None]
        assert grads.keys() == single_grads.keys()
        for name, grad in single_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
            assert torch.equal(grads[name], other_grads[name])  # after DDP's all-reduce
        assert losses == pytest.approx(single_losses, rel=1e-5)
        assert all(torch.equal(state[k], other_state[k]) for k in state)


# --------------------------------------------------------------------------------------------------
# Configuration


def test_config_from_dict_names_unknown_keys_and_checks_values():
    with pytest.raises(ValueError, match="unknown TrainConfig keys: batchsize, lr_rate"):
        TrainConfig.from_dict({"lr_rate": 1e-3, "batchsize": 4})
    assert TrainConfig.from_dict({"lr": "1e-3"}).lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    bad = [({"precision": "fp8"}, "precision"), ({"loss": "nope"}, "unknown loss"),
           ({"loss": "info_nce", "alpha": 9.0}, "bad parameters"),
           ({"warmup_ratio": 1.0}, "warmup"),
           ({"loss_kwargs": {"temperature": 0.1}}, "TrainConfig.temperature"),
           ({"temperature": 0}, "temperature"), ({"gradcache_chunk_size": 0}, "gradcache")]
    for params, message in bad:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict(params)


def test_config_counts_must_be_integers():
    """A YAML file or KEY=VALUE can hand over a string; it is named here, not failed on later."""
    for name, value in [("batch_size", "8"), ("max_steps", 2.5), ("seed", True),
                        ("save_every", "10")]:
        with pytest.raises(ValueError, match=f"{name} must be an integer, got {value!r}"):
            TrainConfig.from_dict({name: value})
