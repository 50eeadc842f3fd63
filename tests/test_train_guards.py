"""Nothing lost, nothing silently wrong: strict config types, config mistakes refused before
anything is written, resume with a changed config, nan/inf gradients and weights (on every DDP rank
together), a process killed while old checkpoints are pruned.

The kill is real: `train_child.py` runs in a subprocess and SIGKILLs itself half-way through the
deletion of a checkpoint folder.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import run_distributed
from safetensors.torch import load_file
from tiny_training import FaultAtCall, TinyEmbedder, collate, make_items
from torch.optim.optimizer import register_optimizer_step_post_hook

import llave_kit
from llave_kit import train as train_module
from llave_kit.checkpoints import latest_checkpoint
from llave_kit.losses import make_loss
from llave_kit.train import (
    RESUMABLE_FIELDS,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonFiniteStateError,
    TrainConfig,
    TrainConfigError,
    lr_factor,
    train,
)

TESTS = Path(__file__).parent
TENSOR_FILES = ("model.safetensors", "trainer_state.safetensors")


def params(tmp_path, **overrides) -> dict:
    return dict(output_dir=str(tmp_path / "run"), batch_size=8, max_steps=4, lr=1e-2,
                warmup_ratio=0.2, temperature=0.1, alpha=3.0, seed=0) | overrides


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: a refused run must leave it as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def all_finite(checkpoint: Path) -> bool:
    tensors = {**load_file(str(checkpoint / "model.safetensors")),
               **load_file(str(checkpoint / "trainer_state.safetensors"))}
    return all(torch.isfinite(v).all() for v in tensors.values())


# --------------------------------------------------------------------------------------------------
# Strict field types


@pytest.mark.parametrize("fields, message", [
    ({"overwrite": "false"}, "overwrite must be true or false, got 'false' (type str; expected bool)"),
    ({"resume": "maybe"}, "resume must be true or false, got 'maybe' (type str; expected bool)"),
    ({"save_every": 2.5}, "save_every must be an integer, got 2.5 (type float; expected int or null)"),
    ({"epochs": 1.5}, "epochs must be an integer, got 1.5 (type float; expected int)"),
    ({"alpha": True}, "alpha must be a finite number, got True (type bool; expected float or null)"),
    ({"loss_kwargs": {"symmetric": "no"}},
     "loss_kwargs.symmetric must be true or false, got 'no' (type str; expected bool)"),
    ({"max_steps": "abc"}, "max_steps must be an integer, got 'abc' (type str; expected int or null)"),
    ({"batch_size": "16"}, "batch_size must be an integer, got '16' (type str; expected int)"),
    ({"lr": "fast"}, "lr must be a finite number, got 'fast' (type str; expected float)"),
    ({"temperature": math.inf}, "temperature must be a finite number, got inf"),
    ({"loss": "hcl", "loss_kwargs": {"beta": [9]}}, "loss_kwargs.beta must be a finite number"),
    ({"device": 0}, "device must be a string, got 0 (type int; expected str or null)"),
    ({"loss_kwargs": "symmetric"}, "loss_kwargs must be a mapping, got 'symmetric'"),
])
def test_a_value_of_the_wrong_type_is_refused_in_one_line(fields, message):
    for check in (TrainConfig.check_types, TrainConfig.from_dict, lambda f: TrainConfig(**f)):
        with pytest.raises(TrainConfigError) as error:
            check(fields)
        assert message in str(error.value) and "\n" not in str(error.value)
        assert isinstance(error.value, ValueError)  # what callers caught before


def test_check_types_names_unknown_keys():
    with pytest.raises(TrainConfigError, match="unknown TrainConfig keys: batchsize, lr_rate"):
        TrainConfig.check_types({"lr_rate": 1e-3, "batchsize": 4})


def test_check_types_takes_any_subset_of_fields_and_values_become_their_declared_type():
    TrainConfig.check_types({})
    TrainConfig.check_types({"lr": "1e-3", "max_steps": None, "alpha": 9, "overwrite": True,
                             "loss": "info_nce", "loss_kwargs": {"symmetric": False}})
    cfg = TrainConfig.from_dict({"alpha": 9, "lr": "1e-3", "max_grad_norm": 1,
                                 "seed": np.int64(3), "loss_kwargs": {"false_negative_margin": 0}})
    assert (cfg.alpha, cfg.lr, cfg.max_grad_norm, cfg.seed) == (9.0, 1e-3, 1.0, 3)
    assert isinstance(cfg.alpha, float) and isinstance(cfg.max_grad_norm, float)
    assert type(cfg.seed) is int  # config.json can hold it
    assert isinstance(cfg.loss_kwargs["false_negative_margin"], float)


# --------------------------------------------------------------------------------------------------
# User mistakes that train() finds: TrainConfigError, before anything is written


@pytest.fixture
def finished_run(tmp_path):
    """A 4-step run (checkpoints every 2 steps, both kept) and the params that made it."""
    made = params(tmp_path, save_every=2, keep_last=2)
    train(TrainConfig.from_dict(made), TinyEmbedder(), make_items(32), collate_fn=collate)
    return made, tmp_path / "run"


@pytest.mark.parametrize("change, items, message", [
    ({}, 32, "already holds a run"),
    ({"resume": True, "loss": "info_nce", "alpha": None, "temperature": 0.2}, 32,
     "changed config: loss='hardness_weighted' -> 'info_nce', temperature=0.1 -> 0.2, "
     "alpha=3.0 -> None. Restore"),
    ({"resume": True, "seed": 1, "weight_decay": 0.1}, 32, "weight_decay=0.0 -> 0.1, seed=0 -> 1"),
    ({"resume": True, "schedule": "constant", "warmup_ratio": 0.0}, 32,
     "warmup_ratio=0.2 -> 0.0, schedule='cosine' -> 'constant'"),
    ({"resume": True, "loss_kwargs": {"symmetric": False}}, 32,
     "loss_kwargs={} -> {'symmetric': False}"),
    ({"resume": True, "max_steps": 3}, 32, "it is at step 4, beyond this config's 3 steps"),
    ({"overwrite": True, "precision": "fp16", "device": "cpu"}, 32, "fp16"),
    ({"overwrite": True}, 7, "fewer than one batch of 8"),
])
def test_a_config_that_does_not_fit_the_run_is_refused_before_anything_is_written(
        finished_run, change, items, message):
    made, out = finished_run
    before = snapshot(out)
    with pytest.raises(TrainConfigError, match=re.escape(message)):
        train(TrainConfig.from_dict(made | change), TinyEmbedder(), make_items(items),
              collate_fn=collate)
    assert snapshot(out) == before


def test_resume_applies_a_changed_lr_and_length_and_config_json_records_them(finished_run):
    """Two copies of a finished 4-step run, extended to 6 steps with two different lrs: each
    follows its own lr (the old scheduler state no longer wins) and records it."""
    made, out = finished_run
    first = read_jsonl(out / "metrics.jsonl")
    copy = out.with_name("copy")
    shutil.copytree(out, copy)
    finals = {}
    for lr, folder in [(1e-3, out), (1e-1, copy)]:
        # output_dir may change too: the copy is resumed where it now lives
        resumed = TrainConfig.from_dict(made | {"resume": True, "lr": lr, "max_steps": 6,
                                                "output_dir": str(folder)})
        result = train(resumed, TinyEmbedder(), make_items(32), collate_fn=collate)
        assert result.history[:4] == first
        warmup = math.ceil(0.2 * 6)
        assert [r["lr"] for r in result.history[4:]] == [lr * lr_factor(s - 1, 6, warmup, "cosine")
                                                         for s in (5, 6)]
        assert json.loads((folder / "config.json").read_text()) == resumed.to_dict()
        state = json.loads((result.checkpoint_path / "trainer_state.json").read_text())
        assert (state["config"]["lr"], state["config"]["max_steps"]) == (lr, 6)
        finals[lr] = load_file(str(result.final_model_path / "model.safetensors"))
    assert not torch.equal(finals[1e-3]["mix.weight"], finals[1e-1]["mix.weight"])


def test_every_resumable_field_may_change_on_resume(finished_run):
    made, out = finished_run
    changes = {"max_steps": 5, "epochs": 3, "lr": 5e-3, "max_grad_norm": None, "precision": "bf16",
               "log_every": 2, "eval_every": 1, "save_every": 1, "keep_last": 3,
               "output_dir": str(out), "resume": True, "overwrite": True, "device": "cpu",
               "num_workers": 0, "gradcache_chunk_size": 3, "find_unused_parameters": False}
    # gradient_checkpointing needs an LMM: tests/test_fsdp.py resumes a run with it switched on
    assert set(changes) | {"gradient_checkpointing"} == RESUMABLE_FIELDS
    result = train(TrainConfig.from_dict(made | changes), TinyEmbedder(), make_items(32),
                   collate_fn=collate, eval_fn=lambda m: {"x": 1.0})
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in result.eval_history] == [5]
    assert result.checkpoint_path.name == "step_00000005"


# --------------------------------------------------------------------------------------------------
# Non-finite gradients and weights


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_an_infinite_gradient_stops_the_run_before_the_update(tmp_path, max_grad_norm):
    """temperature=1e-30: the loss is finite, its gradient is not. Clipping used to zero every
    update (a run that 'succeeds' with an unchanged model); without clipping, to apply nan."""
    cfg = TrainConfig.from_dict(params(tmp_path, temperature=1e-30, max_grad_norm=max_grad_norm,
                                       save_every=1))
    model = TinyEmbedder()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteGradientError, match="non-finite gradient norm .* at step 1; the "
                       "step was not applied. No checkpoint was saved") as error:
        train(cfg, model, make_items(32), collate_fn=collate)
    assert error.value.step == 1 and error.value.checkpoint is None
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    out = tmp_path / "run"
    assert latest_checkpoint(out) is None and not (out / "final").exists()


def infinite_gradient_on_rank_1(rank, world_size, output_dir):
    """Rank 1 alone sees an infinite gradient norm in step 2; what each rank raises."""
    if rank == 1:
        clip, calls = train_module._unscale_and_clip, [0]

        def clip_then_blow_up(run):
            calls[0] += 1
            return clip(run) + (math.inf if calls[0] == 2 else 0.0)

        train_module._unscale_and_clip = clip_then_blow_up
    cfg = TrainConfig(output_dir=output_dir, batch_size=6, max_steps=4, save_every=1, lr=1e-2,
                      temperature=0.1, alpha=3.0)
    try:
        train(cfg, TinyEmbedder(), make_items(48), collate_fn=collate)
    except NonFiniteGradientError as error:
        return error.step, error.value, error.checkpoint.name
    return None


def test_under_ddp_every_rank_stops_at_a_non_finite_gradient_any_rank_sees(tmp_path):
    """Otherwise rank 0 would apply the step and wait for rank 1 in the next collective."""
    assert run_distributed(2, infinite_gradient_on_rank_1, str(tmp_path / "run")) == [
        (2, math.inf, "step_00000001")] * 2


def test_an_infinite_gradient_mid_run_keeps_the_last_finite_checkpoint(tmp_path):
    cfg = TrainConfig.from_dict(params(tmp_path, max_steps=8, save_every=2))
    model = TinyEmbedder()
    with pytest.raises(NonFiniteGradientError, match="at step 5") as error:
        train(cfg, model, make_items(32), collate_fn=collate, loss_fn=FaultAtCall(5, "inf gradient"))
    out = tmp_path / "run"
    assert error.value.checkpoint == out / "checkpoints" / "step_00000004"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    saved = load_file(str(error.value.checkpoint / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # not applied


class DriftingStatistic(TinyEmbedder):
    """A running statistic (a buffer, like BatchNorm's) that overflows on the n-th forward while
    the loss and the gradients stay finite."""

    def __init__(self, overflow_at: int):
        super().__init__()
        self.overflow_at, self.calls = overflow_at, 0
        self.register_buffer("running_scale", torch.ones(()))

    def encode(self, texts, images):
        self.calls += 1
        if self.training and self.calls == self.overflow_at:
            self.running_scale.fill_(math.inf)
        return super().encode(texts, images)


def poison_optimizer_state_after(step: int):
    """Make mix.weight's second moment inf after optimizer step `step` (every optimizer)."""
    steps = [0]

    def hook(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == step:
            weight = optimizer.param_groups[0]["params"][-1]  # the decayed group's last
            optimizer.state[weight]["exp_avg_sq"].fill_(math.inf)

    return register_optimizer_step_post_hook(hook)


@pytest.mark.parametrize("poisoned, name", [("buffer", "running_scale"),
                                            ("optimizer", "the optimizer state of mix.weight")])
def test_non_finite_weights_or_optimizer_state_are_never_saved(tmp_path, poisoned, name):
    cfg = TrainConfig.from_dict(params(tmp_path, max_steps=6, save_every=2, keep_last=3))
    handle = None
    if poisoned == "buffer":
        model = DriftingStatistic(overflow_at=2 * 3)  # two encode calls a step: in step 3
    else:
        model, handle = TinyEmbedder(), poison_optimizer_state_after(3)
    try:
        with pytest.raises(NonFiniteStateError, match=f"non-finite values in {name} after step 4; "
                           "it was not saved") as error:
            train(cfg, model, make_items(32), collate_fn=collate)
    finally:
        if handle is not None:
            handle.remove()
    out = tmp_path / "run"
    assert error.value.checkpoint == out / "checkpoints" / "step_00000002"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    assert all_finite(out / "checkpoints" / "step_00000002")
    assert not (out / "final").exists()


def test_the_advice_after_a_non_finite_stop_works_resume_with_a_lower_lr(tmp_path):
    """The error says: resume from the last checkpoint with a lower lr. That run really uses it."""

    made = params(tmp_path, max_steps=6, save_every=2, lr=1e-1)
    with pytest.raises(NonFiniteLossError, match="resume from it with resume=True and a lower "
                       "lr, a max_grad_norm or precision='fp32' \\(these may change on resume\\)"):
        train(TrainConfig.from_dict(made), TinyEmbedder(), make_items(32), collate_fn=collate,
              loss_fn=FaultAtCall(5, loss=make_loss("hardness_weighted", temperature=0.1, alpha=3.0)))
    result = train(TrainConfig.from_dict(made | {"resume": True, "lr": 1e-2}), TinyEmbedder(),
                   make_items(32), collate_fn=collate)
    warmup = math.ceil(0.2 * 6)
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in result.history[4:]] == [1e-2 * lr_factor(s - 1, 6, warmup, "cosine")
                                                     for s in (5, 6)]
    assert all(math.isfinite(r["loss"]) for r in result.history)


# --------------------------------------------------------------------------------------------------
# A real SIGKILL while an old checkpoint is deleted


def train_child(output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    # The child imports the llave_kit under test, whatever an installed one says.
    path = os.pathsep.join(filter(None, [str(Path(llave_kit.__file__).parents[1]),
                                         os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(TESTS / "train_child.py"), str(output_dir), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_kill_while_pruning_leaves_only_complete_checkpoints_and_resume_is_exact(tmp_path):
    """keep_last=1: saving step 2 deletes step 1. The kill comes half-way through that deletion
    (its tensors gone, trainer_state.json left). A checkpoint folder must never be seen so."""
    straight = train_child(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    killed = train_child(out, "--kill-deleting", "step_00000001")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folders = sorted((out / "checkpoints").glob("step_*"))
    assert [f.name for f in folders] == ["step_00000002"]
    for folder in folders:
        assert all((folder / name).is_file() for name in (*TENSOR_FILES, "trainer_state.json"))

    resumed = train_child(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in out.rglob(".*")] == []  # what the kill left is cleaned up
    keys = ("step", "epoch", "loss", "lr", "grad_norm")
    logs = [read_jsonl(run / "metrics.jsonl") for run in (tmp_path / "straight", out)]
    assert [[r[k] for k in keys] for r in logs[0]] == [[r[k] for k in keys] for r in logs[1]]
    a, b = (load_file(str(run / "final" / "model.safetensors")) for run in (tmp_path / "straight", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
