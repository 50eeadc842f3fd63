"""Contrastive training of an embedder: one flat loop, single process or torchrun/DDP.

    from llave_kit.train import TrainConfig, train
    config = TrainConfig.from_dict({"loss": "hardness_weighted", "alpha": 9.0, "max_steps": 200,
                                    "output_dir": "runs/demo"})
    result = train(config, model, dataset)          # model: an encoders.Embedder
    result.history[-1]["loss"], result.final_model_path

    llave-kit train --config cfg.yaml [key=value ...]                      # one process
    torchrun --nproc_per_node 4 -m llave_kit.train --config cfg.yaml [key=value ...]

Each step: `grad_accum_steps` contrastive batches of `batch_size` pairs per process. A batch embeds
its queries (`encode_queries`) and its targets (`encode_targets`: positives, then any explicit
negatives), and the loss contrasts every query with every target. Under torchrun the
loss gathers all ranks' embeddings (`gather_across_devices=True`), so each query sees the global
batch as negatives; DDP averages the gradients, which by the loss contract equals the gradient of
the single-process loss on the global batch. `gradcache_chunk_size` embeds a batch in chunks with
bounded memory and the same gradient (`llave_kit.gradcache`).

Output dir:
    config.json            the TrainConfig of the run
    metrics.jsonl          one record per `log_every` steps: step, epoch, loss, lr, grad_norm,
                           examples_per_s, elapsed_s (loss and lr are those of that step)
    eval.jsonl             `eval_fn(model)` results: before training, every `eval_every`, at the end
    checkpoints/step_00000100/   model, optimizer, scheduler, scaler and RNG state
                                 (layout in `llave_kit.checkpoints`); the newest `keep_last` kept
    final/                 the trained model (`model.save_pretrained`, else model.safetensors)

`resume=True` continues from the newest checkpoint: the data order depends only on (seed, epoch)
and the step, so the resumed run replays the uninterrupted one (bit for bit on CPU). A fresh run
refuses an output_dir holding a run unless `overwrite=True`. Under torchrun only rank 0 writes, and
every rank reads the checkpoint on resume: output_dir must be storage all ranks see.

References: LLaVE (Lan et al. 2025) for the recipe (cosine schedule, warm-up ratio 0.03, global
batch 256); nanoGPT for the shape of the loop.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from llave_kit.checkpoints import (
    checkpoint_dir,
    gather_rng,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_saves,
    save_checkpoint,
    save_final_model,
)
from llave_kit.data import collate_train_pairs
from llave_kit.distributed import is_distributed, rank, world_size
from llave_kit.files import write_text
from llave_kit.gradcache import Encoder, contrastive_backward, rng_devices
from llave_kit.losses import make_loss
from llave_kit.progress import progress_bar

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("cosine", "constant")
_RESERVED_LOSS_KWARGS = {
    "temperature": "set it as TrainConfig.temperature",
    "alpha": "set it as TrainConfig.alpha",
    "gather_across_devices": "train() turns it on by itself when running distributed",
}


# --------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass
class TrainConfig:
    """Everything a run needs besides the model and the data (which `llave-kit train` reads from
    here).

    Defaults suit the CPU scale of this kit (tiny models, lr 1e-3, tau 0.05, batch 64); LLaVE's own
    runs use lr 1e-5, tau 0.02, alpha 9, global batch 256, 1 epoch, bf16.
    """

    # loss: a name for `llave_kit.losses.make_loss`; alpha None = the loss's default (9 for
    # "hardness_weighted") and must stay None for losses without alpha; loss_kwargs = the rest
    # (symmetric, false_negative_margin, margin, beta, tau_plus).
    loss: str = "hardness_weighted"
    temperature: float = 0.05
    alpha: float | None = None
    loss_kwargs: dict = field(default_factory=dict)
    # optimisation: AdamW; weight decay on matrices only; linear warm-up then cosine to 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    max_grad_norm: float | None = 1.0
    # length: max_steps (optimizer steps) wins over epochs when set
    epochs: int = 1
    max_steps: int | None = None
    # batch: batch_size pairs per process and contrastive batch; accumulated batches do not see
    # each other's negatives (use gradcache_chunk_size for a big contrastive batch in little memory)
    batch_size: int = 64
    grad_accum_steps: int = 1
    gradcache_chunk_size: int | None = None
    precision: str = "fp32"
    seed: int = 0
    device: str | None = None  # None: cuda:<LOCAL_RANK> when available, else cpu
    num_workers: int = 0
    # DDP: inputs without images leave an LMM's trainable projector unused, and under GradCache
    # the synchronised backward is the last chunk's only; False saves a graph traversal per step
    # when every trainable weight is used by every forward.
    find_unused_parameters: bool = True
    # bookkeeping
    output_dir: str = "runs/train"
    log_every: int = 1
    save_every: int | None = None  # None: a checkpoint only at the end
    keep_last: int = 1
    eval_every: int | None = None  # None: eval_fn runs before training and at the end only
    resume: bool = False  # continue from the newest checkpoint in output_dir (if any)
    # a fresh run (resume=False) into an output_dir that holds a run: False raises, True first
    # deletes that run's checkpoints, logs and final model (a pipeline re-running a changed run)
    overwrite: bool = False
    # read by `llave-kit train` only: an embedder for `llave_kit.encoders.load_embedder`; a train
    # jsonl/parquet, or a data set folder (manifest.json: all its tasks' train files); for a file,
    # the folder its image paths are relative to (default: its data set folder, else its folder)
    model: str | None = None
    data: str | None = None
    image_root: str | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (notebook parameters, a YAML file); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {', '.join(unknown)}; "
                             f"known keys: {', '.join(sorted(known))}")
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def loss_parameters(self) -> dict[str, Any]:
        alpha = {} if self.alpha is None else {"alpha": self.alpha}
        return {"temperature": self.temperature, **alpha, **self.loss_kwargs}

    def __post_init__(self) -> None:
        self._coerce_floats()
        self._check_integers()
        self._check_ranges()
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.loss_kwargs, dict):
            raise ValueError(f"loss_kwargs must be a dict, got {type(self.loss_kwargs).__name__}")
        for key, why in _RESERVED_LOSS_KWARGS.items():
            if key in self.loss_kwargs:
                raise ValueError(f"loss_kwargs may not hold {key!r}: {why}")
        make_loss(self.loss, **self.loss_parameters())  # fail now on a bad name or parameter

    def _coerce_floats(self) -> None:
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept numeric strings for float fields.
        for name in ("temperature", "alpha", "lr", "weight_decay", "warmup_ratio", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"{name} must be a number, got {value!r}") from None

    def _check_integers(self) -> None:
        # A YAML file or KEY=VALUE may hand over a string; say so here rather than fail on a
        # comparison below or deep inside the loop.
        optional = ("max_steps", "save_every", "eval_every", "gradcache_chunk_size")
        for name in ("epochs", "batch_size", "grad_accum_steps", "seed", "num_workers",
                     "log_every", "keep_last", *optional):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")

    def _check_ranges(self) -> None:
        rules = [
            ("lr", self.lr > 0, "> 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum_steps", self.grad_accum_steps >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"), ("keep_last", self.keep_last >= 1, ">= 1"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
        ]
        for name in ("max_steps", "save_every", "eval_every", "gradcache_chunk_size"):
            value = getattr(self, name)
            rules.append((name, value is None or value >= 1, ">= 1 or None"))
        if self.max_grad_norm is not None:
            rules.append(("max_grad_norm", self.max_grad_norm > 0, "> 0 or None"))
        for name, ok, expected in rules:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")


@dataclass
class TrainResult:
    history: list[dict]  # metrics.jsonl records, resumed runs included
    eval_history: list[dict]  # eval.jsonl records: {"step": s, **eval_fn(model)}
    checkpoint_path: Path  # the last checkpoint (the final step's)
    final_model_path: Path  # output_dir / "final"
    output_dir: Path


class NonFiniteLossError(RuntimeError):
    """The loss (or the embeddings it is computed from) became nan/inf; the run stops there."""

    def __init__(self, step: int, value: float, checkpoint: Path | None):
        self.step, self.value, self.checkpoint = step, value, checkpoint
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint yet"
        super().__init__(
            f"non-finite loss ({value}) at step {step}; the step was not applied and {kept}. "
            "Lower lr, check the data, or use precision='fp32', then resume=True."
        )


# --------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(config: TrainConfig) -> Runtime:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU).

    A group that is already initialised (a test harness, a launcher) is used as it is.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per torchrun process
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl and all_gather_object use the current device
    if not is_distributed() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank(), world_size(), device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _global_mean(value: torch.Tensor) -> float:
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)  # SUM: gloo has no AVG
        value /= world_size()
    return value.item()


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# Loss, optimizer, schedule


def build_loss(config: TrainConfig, gather: bool) -> nn.Module:
    return make_loss(config.loss, **config.loss_parameters(), gather_across_devices=gather)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    # Decay matrices only: pulling biases and norm gains to 0 does not regularise (nanoGPT, GPT-2).
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    Linear warm-up from 0, then cosine to 0 (or constant): the schedule of transformers'
    `get_cosine_schedule_with_warmup`, which LLaVE's trainer uses.
        f(s) = s / W                                         s < W
        f(s) = (1 + cos(pi * (s - W) / max(1, T - W))) / 2   s >= W
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, config: TrainConfig, total_steps: int):
    warmup = math.ceil(config.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config.schedule)
    )


# --------------------------------------------------------------------------------------------------
# Data order


def batches_per_epoch(dataset_size: int, batch_size: int, num_processes: int) -> int:
    # DistributedSampler(drop_last=True) gives each process floor(N / P) items; the last partial
    # batch is dropped too, so every contrastive batch has the same number of negatives.
    per_epoch = (dataset_size // num_processes) // batch_size
    if per_epoch == 0:
        raise ValueError(f"the dataset has {dataset_size} items: fewer than one batch of "
                         f"{batch_size} for each of {num_processes} process(es)")
    return per_epoch


def total_steps(config: TrainConfig, per_epoch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    steps = config.epochs * per_epoch // config.grad_accum_steps
    if steps == 0:
        raise ValueError(f"{config.epochs} epoch(s) of {per_epoch} batches make no optimizer step "
                         f"with grad_accum_steps={config.grad_accum_steps}")
    return steps


def micro_batches(dataset, config: TrainConfig, collate_fn: Callable, runtime: Runtime,
                  start: int = 0) -> Iterator[dict]:
    """Endless stream of this process's collated batches, from batch number `start` on.

    The order depends only on (seed, epoch): DistributedSampler draws each epoch's permutation from
    a torch.Generator seeded with seed + epoch, and gives rank r every world_size-th item. A resumed
    run rebuilds that order and skips the batches already used without loading them.
    """
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank,
                                 shuffle=True, seed=config.seed, drop_last=True)
    size = config.batch_size
    per_epoch = batches_per_epoch(len(dataset), size, runtime.world_size)
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[i * size:(i + 1) * size] for i in range(skip, per_epoch)]
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the global
        # RNG whenever an iterator starts, and a resumed run starts one mid-epoch.
        workers_seed = torch.Generator().manual_seed(config.seed + epoch)
        yield from DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn,
                              num_workers=config.num_workers, generator=workers_seed)
        epoch, skip = epoch + 1, 0


# --------------------------------------------------------------------------------------------------
# Metrics log


class JsonlLog:
    """Records kept in memory and appended to a jsonl file (by the main process only).

    On resume the file is cut back to the checkpoint's step, so it reads as one uninterrupted run.
    """

    def __init__(self, path: Path, write: bool, keep_until_step: int):
        self.path, self.write = path, write
        self.records = [r for r in self._read() if r["step"] <= keep_until_step]
        if write:
            write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        # A crash can leave the last line half-written; every earlier line must parse.
        if lines and not lines[-1].endswith("}"):
            lines = lines[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self.write:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------------
# The training loop


@dataclass
class _Run:
    """What the loop's helpers share; built once by `train`."""

    config: TrainConfig
    runtime: Runtime
    model: nn.Module
    net: nn.Module
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    output_dir: Path
    total_steps: int
    per_epoch: int

    def autocast(self):
        dtype = PRECISIONS[self.config.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=dtype)

    def loss_scale(self, loss: torch.Tensor) -> torch.Tensor:
        # Accumulated batches each contribute 1/A, so the step's gradient is their mean.
        loss = loss / self.config.grad_accum_steps
        return self.scaler.scale(loss) if self.scaler is not None else loss


def _check_precision(config: TrainConfig, device: torch.device) -> None:
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs CUDA (a GradScaler); use 'bf16' or 'fp32' on CPU")


def _build_run(config, model, dataset, loss_fn) -> _Run:
    runtime = setup_runtime(config)
    _check_precision(config, runtime.device)
    model.to(runtime.device)
    optimizer = build_optimizer(model, config)
    per_epoch = batches_per_epoch(len(dataset), config.batch_size, runtime.world_size)
    steps = total_steps(config, per_epoch)
    net = Encoder(model)
    if runtime.world_size > 1:  # DDP also broadcasts rank 0's weights, so all ranks start equal
        net = DistributedDataParallel(
            net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters)
    return _Run(
        config, runtime, model, net,
        loss_fn if loss_fn is not None else build_loss(config, gather=runtime.world_size > 1),
        optimizer, build_scheduler(optimizer, config, steps),
        torch.amp.GradScaler("cuda") if config.precision == "fp16" else None,
        Path(config.output_dir), steps, per_epoch)


def _prepare_output_dir(config: TrainConfig, runtime: Runtime, out: Path) -> None:
    has_run = (out / "metrics.jsonl").exists() or latest_checkpoint(out) is not None
    if has_run and not config.resume and not config.overwrite:
        raise ValueError(f"{out} already holds a run; pass resume=True to continue it, "
                         "overwrite=True to replace it, or choose another output_dir")
    _barrier()  # every rank has looked before the main process deletes anything
    if runtime.is_main:
        if not config.resume:
            for name in ("metrics.jsonl", "eval.jsonl"):
                (out / name).unlink(missing_ok=True)
            for name in ("checkpoints", "final"):
                shutil.rmtree(out / name, ignore_errors=True)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        remove_partial_saves(out)
        write_text(out / "config.json", json.dumps(config.to_dict(), indent=1))
    _barrier()


def _restore(run: _Run) -> tuple[int, float, Path | None]:
    """(step to continue from, elapsed seconds so far, checkpoint) after seeding or resuming."""
    seed_everything(run.config.seed + run.runtime.rank)  # ranks draw different dropout masks
    checkpoint = latest_checkpoint(run.output_dir) if run.config.resume else None
    if checkpoint is None:
        return 0, 0.0, None
    info = load_checkpoint(checkpoint, run.model, run.optimizer, run.scheduler, run.scaler,
                           run.runtime)
    saved = info["config"]
    for key in ("seed", "batch_size", "grad_accum_steps"):  # they fix the data order
        if saved[key] != getattr(run.config, key):
            raise ValueError(f"cannot resume {checkpoint}: it was trained with "
                             f"{key}={saved[key]!r}, this config has {getattr(run.config, key)!r}")
    return info["step"], info["elapsed_s"], checkpoint


def _train_step(run: _Run, batches: Iterator[dict], step: int, checkpoint: Path | None) -> dict:
    """One optimizer step over grad_accum_steps batches; the metrics record (step is 1-based)."""
    start, steps = time.perf_counter(), run.config.grad_accum_steps
    run.model.train()
    lr = run.scheduler.get_last_lr()[0]  # the lr this step uses
    loss = torch.zeros((), device=run.runtime.device)
    for i in range(steps):
        loss += contrastive_backward(
            run.net, run.loss_fn, next(batches), chunk_size=run.config.gradcache_chunk_size,
            loss_scale=run.loss_scale, autocast=run.autocast, sync=i == steps - 1)
    loss_value = _global_mean(loss / steps)
    if not math.isfinite(loss_value):  # before the update: the model keeps its last good weights
        raise NonFiniteLossError(step, loss_value, checkpoint)
    grad_norm = _optimizer_step(run)
    examples = run.config.batch_size * steps * run.runtime.world_size
    return {"step": step, "epoch": step * steps / run.per_epoch, "loss": loss_value, "lr": lr,
            "grad_norm": grad_norm, "examples_per_s": examples / (time.perf_counter() - start)}


def _optimizer_step(run: _Run) -> float:
    """Unscale, clip, step, advance the schedule; return the gradient norm before clipping."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    max_norm = run.config.max_grad_norm or math.inf  # inf: only measure the norm
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # skips the step when fp16 gradients overflowed
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm.item()  # the same on every rank: DDP has averaged the gradients


def _evaluate(run: _Run, eval_fn: Callable, step: int) -> dict:
    """eval_fn(model) on the main process, in eval mode, without touching the training RNG."""
    metrics = {}
    if run.runtime.is_main:
        run.model.eval()
        with torch.no_grad(), torch.random.fork_rng(rng_devices(run.runtime.device)):
            metrics = dict(eval_fn(run.model))
        run.model.train()
    _barrier()
    return {"step": step, **metrics}


def _save(run: _Run, step: int, elapsed: float) -> Path:
    rng_states = gather_rng(run.runtime)
    path = checkpoint_dir(run.output_dir, step)
    if run.runtime.is_main:
        micro = step * run.config.grad_accum_steps
        epoch, batch_in_epoch = divmod(micro, run.per_epoch)
        info = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "world_size": run.runtime.world_size, "elapsed_s": elapsed,
                "config": run.config.to_dict()}
        save_checkpoint(path, run.model, run.optimizer, run.scheduler, run.scaler, info,
                        rng_states, run.config.keep_last)
    _barrier()
    return path


def train(config: TrainConfig, model: nn.Module, dataset, collate_fn: Callable | None = None,
          eval_fn: Callable | None = None, *, loss_fn: Callable | None = None) -> TrainResult:
    """Train `model` (with `encode(texts, images) -> (N, D)` unit vectors) on train-pair items.

    dataset: a map-style dataset of train-pair dicts (`llave_kit.data.TrainPairDataset`);
    collate_fn: default `llave_kit.data.collate_train_pairs`; eval_fn(model) -> {metric: value},
    logged to eval.jsonl; loss_fn(query, target) -> scalar replaces the configured loss (it must
    gather across devices itself under torchrun). Raises NonFiniteLossError on a nan/inf loss.
    """
    collate_fn = collate_fn or collate_train_pairs
    run = _build_run(config, model, dataset, loss_fn)
    _prepare_output_dir(config, run.runtime, run.output_dir)
    start_step, elapsed, checkpoint = _restore(run)
    kept = start_step if checkpoint is not None else -1  # records the checkpoint already covers
    metrics = JsonlLog(run.output_dir / "metrics.jsonl", run.runtime.is_main, kept)
    evals = JsonlLog(run.output_dir / "eval.jsonl", run.runtime.is_main, kept)
    batches = micro_batches(dataset, config, collate_fn, run.runtime,
                            start=start_step * config.grad_accum_steps)
    if eval_fn is not None and start_step == 0:
        evals.append(_evaluate(run, eval_fn, 0))  # the starting point, for "before vs after"
    clock = time.perf_counter() - elapsed  # elapsed_s continues across resumes
    progress = progress_bar(range(start_step + 1, run.total_steps + 1), initial=start_step,
                            total=run.total_steps, desc="train", disable=not run.runtime.is_main)
    for step in progress:
        record = _train_step(run, batches, step, checkpoint)
        record["elapsed_s"] = time.perf_counter() - clock
        last = step == run.total_steps
        if step % config.log_every == 0 or last:
            metrics.append(record)
            # refresh=False: shown at the bar's next redraw, so a log gets no extra line per step
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        if eval_fn is not None and (last or (config.eval_every and step % config.eval_every == 0)):
            evals.append(_evaluate(run, eval_fn, step))
        if last or (config.save_every and step % config.save_every == 0):
            checkpoint = _save(run, step, time.perf_counter() - clock)
    final = run.output_dir / "final"
    if run.runtime.is_main:
        save_final_model(model, run.output_dir)
    _barrier()
    return TrainResult(metrics.records, evals.records, checkpoint, final, run.output_dir)


if __name__ == "__main__":
    # torchrun launches a module, so `-m llave_kit.train` stays an entry point: the `train` command.
    from llave_kit.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
