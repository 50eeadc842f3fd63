"""Training checkpoints: everything an exact resume needs, in one folder per step.

    output_dir/checkpoints/step_00000100/
        model.safetensors          model weights (safetensors.torch.save_model)
        trainer_state.safetensors  tensors: optimizer moments ("optimizer.<param>.<name>"), torch
                                   CPU/CUDA RNG states per rank ("rng.<rank>.torch|cuda")
        trainer_state.json         step, data position (epoch, batch_in_epoch), world size,
                                   sharded, elapsed, config, optimizer param groups, grad-scaler
                                   state, python and numpy RNG states per rank (the lr is a
                                   function of config and step, so no scheduler state is needed)
    output_dir/final/              the trained model (`model.save_pretrained`, else
                                   model.safetensors)

A sharded run (`sharding="fsdp"`, `llave_kit.sharding`) keeps its model and optimizer state as
shards instead: `sharded/` holds every rank's shards of both, written by
`torch.distributed.checkpoint`, and trainer_state.safetensors the RNG states only.

Every folder is written under a staging name and renamed into place
(`llave_kit.files.staged_directory`), and renamed out of place before it is deleted (`discard`), so
`checkpoints/` only ever holds complete ones, whenever the process is killed; `save_checkpoint`
keeps the newest `keep_last`. What a kill leaves under a hidden name, `remove_partial_saves`
deletes. The main process writes (every rank its own shards, into the main process's staging
folder, which is renamed once all have written); every rank reads its own RNG state back.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model

from llave_kit.distributed import barrier
from llave_kit.files import staged_directory, write_text
from llave_kit.gradcache import get_rng_state, set_rng_state
from llave_kit.sharding import load_sharded_state, save_sharded_state

if TYPE_CHECKING:
    from llave_kit.train import Runtime

CHECKPOINT_FORMAT = "llave-kit-checkpoint/1"
SHARDED_STATE = "sharded"  # the folder of a sharded run's model and optimizer shards


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = Path(output_dir) / "checkpoints"
    steps = [p for p in root.glob("step_*")
             if re.fullmatch(r"step_\d+", p.name) and (p / "trainer_state.json").exists()]
    return max(steps, key=lambda p: int(p.name[5:]), default=None)


def remove_partial_saves(output_dir: str | Path) -> None:
    """Delete the hidden folders that a process killed during a save or a deletion left behind."""
    output_dir = Path(output_dir)
    for stale in [*(output_dir / "checkpoints").glob(".step_*"), *output_dir.glob(".final.*"),
                  *output_dir.glob(".checkpoints.*")]:
        shutil.rmtree(stale)


def discard(folder: Path) -> None:
    """Delete a folder by first renaming it to a hidden name (`.<name>.old-<hex>`, which
    `remove_partial_saves` removes): a kill during the deletion leaves no half-deleted folder under
    a name that readers trust."""
    hidden = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(folder, hidden)
    shutil.rmtree(hidden)


def checkpoint_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json: step, world size, config, ... (see the module doc)."""
    return json.loads((path / "trainer_state.json").read_text())


def save_checkpoint(path: Path, model, optimizer, scaler, info: dict, rng_states: list[dict],
                    keep_last: int, runtime: Runtime) -> Path:
    """Write a checkpoint folder (staged, then renamed) and prune all but the newest keep_last.

    Every rank calls it; in a sharded run (`info["sharded"]`) every rank writes its shards.
    """
    with _staged_on_main(path, runtime, every_rank_writes=info["sharded"]) as stage:
        if info["sharded"]:
            save_sharded_state(stage / SHARDED_STATE, model, optimizer)
        if runtime.is_main:
            _write_trainer_state(stage, model, optimizer, scaler, info, rng_states)
    if runtime.is_main:
        for old in sorted(path.parent.glob("step_*"), key=lambda p: p.name)[:-keep_last]:
            discard(old)
    barrier()
    return path


def _write_trainer_state(stage: Path, model, optimizer, scaler, info: dict,
                         rng_states: list[dict]) -> None:
    """The main process's files: the RNG states and the run's position, and unless the run is
    sharded the model and the optimizer."""
    tensors, param_groups = {}, None
    if not info["sharded"]:
        save_model(model, str(stage / "model.safetensors"))
        opt = optimizer.state_dict()
        tensors = {f"optimizer.{pid}.{name}": value.contiguous()
                   for pid, state in opt["state"].items() for name, value in state.items()}
        param_groups = opt["param_groups"]
    for r, rng_state in enumerate(rng_states):
        tensors[f"rng.{r}.torch"] = rng_state["torch"]
        if rng_state["cuda"] is not None:
            tensors[f"rng.{r}.cuda"] = rng_state["cuda"]
    state = {
        "format": CHECKPOINT_FORMAT, **info, "optimizer_param_groups": param_groups,
        "scaler": scaler.state_dict() if scaler else None,
        "rng": [{"python": s["python"], "numpy": s["numpy"]} for s in rng_states],
    }
    save_file(tensors, str(stage / "trainer_state.safetensors"))
    write_text(stage / "trainer_state.json", json.dumps(state, indent=1))


@contextmanager
def _staged_on_main(path: Path, runtime: Runtime, every_rank_writes: bool) -> Iterator[Path | None]:
    """The main process's `staged_directory(path)`, yielded to every rank when they all write into
    it (then renamed once all have written); None on the other ranks when only the main writes."""
    if runtime.is_main:
        with staged_directory(path, overwrite=True) as stage:
            if every_rank_writes:
                dist.broadcast_object_list([stage], src=0)
            yield stage
            if every_rank_writes:
                barrier()
    else:
        shared = [None]
        if every_rank_writes:
            dist.broadcast_object_list(shared, src=0)
        yield shared[0]
        if every_rank_writes:
            barrier()


def load_checkpoint(path: Path, info: dict, model, optimizer, scaler, runtime: Runtime) -> None:
    """Restore model, optimizer, scaler and this rank's RNG from `path`, whose state `info`
    (`checkpoint_state`) the caller has checked: format, world size, config."""
    tensors = load_file(str(path / "trainer_state.safetensors"))
    if info.get("sharded", False):
        load_sharded_state(path / SHARDED_STATE, model, optimizer)
    else:
        load_model(model, str(path / "model.safetensors"), device=str(runtime.device))
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            kind, owner, name = key.split(".", 2)
            if kind == "optimizer":
                state.setdefault(int(owner), {})[name] = value
        optimizer.load_state_dict({"state": state,
                                   "param_groups": info["optimizer_param_groups"]})
    if scaler is not None and info["scaler"] is not None:  # else a run resumed into fp16: a new one
        scaler.load_state_dict(info["scaler"])
    r = runtime.rank
    restore_rng({**info["rng"][r], "torch": tensors[f"rng.{r}.torch"],
                 "cuda": tensors.get(f"rng.{r}.cuda")}, runtime.device)


def save_final_model(model: nn.Module, output_dir: Path) -> Path:
    """output_dir/final: `model.save_pretrained` when the model has it, else model.safetensors."""
    final = output_dir / "final"
    with staged_directory(final, overwrite=True) as stage:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(stage)
        else:
            save_model(model, str(stage / "model.safetensors"))
    return final


# --------------------------------------------------------------------------------------------------
# RNG state


def capture_rng(device: torch.device) -> dict:
    """This process's RNG states: python and numpy as JSON-able lists, torch as uint8 tensors."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    torch_state, cuda_state = get_rng_state(device)
    return {"python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch_state, "cuda": cuda_state}


def restore_rng(state: dict, device: torch.device) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    set_rng_state(device, (state["torch"], state["cuda"] if device.type == "cuda" else None))


def gather_rng(runtime: Runtime) -> list[dict]:
    """Every rank's RNG states, in rank order (a collective under torchrun)."""
    state = capture_rng(runtime.device)
    if runtime.world_size == 1:
        return [state]
    states: list = [None] * runtime.world_size
    dist.all_gather_object(states, state)
    return states
