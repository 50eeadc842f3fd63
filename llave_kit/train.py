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
the single-process loss on the global batch. `sharding="fsdp"` splits weights, gradients and
optimizer state over the processes instead of copying them (`llave_kit.sharding`), with the same
result. `gradcache_chunk_size` embeds a batch in chunks with bounded memory and the same gradient
(`llave_kit.gradcache`); `gradient_checkpointing` recomputes an LMM's layers in backward.

Output dir:
    config.json            the TrainConfig of the run
    metrics.jsonl          one record per `log_every` steps: step, epoch, loss, lr, grad_norm,
                           global_batch, candidates_per_query (what each query was contrasted
                           with), examples_per_s, elapsed_s (loss and lr are those of that step)
    eval.jsonl             `eval_fn(model)` results: before training, every `eval_every`, at the end
    checkpoints/step_00000100/   model, optimizer, scaler and RNG state (sharded under FSDP;
                                 layout in `llave_kit.checkpoints`); the newest `keep_last` kept
    final/                 the trained model (`model.save_pretrained`, else model.safetensors;
                           under FSDP gathered into one folder, LoRA adapters merged)

`resume=True` continues from the newest checkpoint: the data order depends only on (seed, epoch)
and the step, so the resumed run replays the uninterrupted one (bit for bit on CPU). A resumed run
may change the fields in `RESUMABLE_FIELDS` (its length, lr, clipping, precision, bookkeeping, how
it executes), which apply from the step it resumes at; any other changed field is refused, so that
config.json always records what the run uses. A fresh run refuses an output_dir holding a run
unless `overwrite=True`. Under torchrun only rank 0 writes, and every rank reads the checkpoint on
resume: output_dir must be storage all ranks see.

Mistakes in the config or in how it meets the output_dir, the data or the device raise
`TrainConfigError` before anything is written. A nan/inf loss, gradient norm or weight stops the
run with a `NonFiniteError` before the step is applied or saved: every checkpoint holds finite
tensors only.

References: LLaVE (Lan et al. 2025) for the recipe (cosine schedule, warm-up ratio 0.03, global
batch 256); nanoGPT for the shape of the loop.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

from llave_kit.checkpoints import (
    CHECKPOINT_FORMAT,
    checkpoint_dir,
    checkpoint_state,
    discard,
    gather_rng,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_saves,
    save_checkpoint,
    save_final_model,
)
from llave_kit.data import check_on_error, collate_train_pairs
from llave_kit.distributed import barrier, is_distributed, rank, world_size
from llave_kit.files import write_text
from llave_kit.gradcache import contrastive_backward, rng_devices
from llave_kit.losses import make_loss
from llave_kit.progress import progress_bar
from llave_kit.sharding import (
    SHARDINGS,
    check_shardable,
    consolidated_embedder,
    local_part,
    whole,
    wrap_model,
)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("cosine", "constant")
_RESERVED_LOSS_KWARGS = {
    "temperature": "set it as TrainConfig.temperature",
    "alpha": "set it as TrainConfig.alpha",
    "gather_across_devices": "train() turns it on by itself when running distributed",
}
# What a resumed run may change; each applies from the step it resumes at. Every other field fixes
# what the checkpoint was trained for (objective, optimizer, schedule shape, data order, model,
# data), and a change to it is refused.
RESUMABLE_FIELDS = frozenset({
    "max_steps", "epochs",  # the length: the lr schedule is recomputed for the new total
    "lr", "max_grad_norm", "precision",  # what a non-finite stop advises changing
    "log_every", "eval_every", "save_every", "keep_last",  # bookkeeping
    "output_dir", "resume", "overwrite",  # where the run lives (it may have been moved) and how
    # the same computation on other hardware, memory or loading processes
    "device", "num_workers", "gradcache_chunk_size", "find_unused_parameters",
    "gradient_checkpointing",
})


class TrainConfigError(ValueError):
    """A mistake in a TrainConfig, or in how it meets the output_dir, the data or the device.

    Raised before anything is written; `llave-kit train` prints it as one line and exits with 2.
    """


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
    # "ddp": every process holds the whole model; "fsdp": parameters, gradients and optimizer state
    # split over the processes (FSDP2, an LmmEmbedder only; `llave_kit.sharding`). Same result.
    sharding: str = "ddp"
    # recompute each LMM layer's activations in backward instead of storing them: less memory,
    # ~1/3 more compute, the same gradients (transformers' own switch; an LmmEmbedder only)
    gradient_checkpointing: bool = False
    # LoRA adapters on an LmmEmbedder's language model, all else frozen; merged into the weights
    # of output_dir/final. None trains the model itself. Keys: `llave_kit.lora.check_lora_spec`.
    lora: dict | None = None
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
    # bad records in `data`: "raise" stops at the first (naming file and line), "skip" drops them
    # and `llave-kit train` prints how many, with the first one's problem
    on_error: str = "raise"

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (notebook parameters, a YAML file); unknown keys are errors."""
        cls.check_types(params)
        return cls(**params)

    @classmethod
    def check_types(cls, fields: Mapping[str, Any]) -> None:
        """Raise TrainConfigError, one line naming field, value and expected type, for the first
        unknown key or value of the wrong type in `fields` (any subset of the fields).

        bool fields take only true/false (YAML's "false" in quotes is a string, and truthy);
        integer fields only integers; number fields ints, floats or numeric strings (YAML 1.1 reads
        1e-3 as a string), finite; None only where the field is optional. loss_kwargs values are
        checked against the parameter types of `loss` (from `fields`, else the default).
        """
        hints = _field_types()
        unknown = sorted(set(fields) - set(hints))
        if unknown:
            raise TrainConfigError(f"unknown TrainConfig keys: {', '.join(unknown)}; "
                                   f"known keys: {', '.join(sorted(hints))}")
        for name, value in fields.items():
            _check_type(name, value, hints[name])
        loss_types = _loss_parameter_types(fields.get("loss", cls.loss))
        for name, value in fields.get("loss_kwargs", {}).items():
            if name in loss_types:  # an unknown name is make_loss's to report
                _check_type(f"loss_kwargs.{name}", value, loss_types[name])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def loss_parameters(self) -> dict[str, Any]:
        alpha = {} if self.alpha is None else {"alpha": self.alpha}
        return {"temperature": self.temperature, **alpha, **self.loss_kwargs}

    def __post_init__(self) -> None:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        self.check_types(fields)  # also for TrainConfig(...) called directly
        hints, loss_types = _field_types(), _loss_parameter_types(self.loss)
        for name, value in fields.items():
            setattr(self, name, _as_declared(value, hints[name]))
        self.loss_kwargs = {name: _as_declared(value, loss_types.get(name))
                            for name, value in self.loss_kwargs.items()}
        self._check_ranges()
        if self.precision not in PRECISIONS:
            raise TrainConfigError(
                f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.sharding not in SHARDINGS:
            raise TrainConfigError(f"sharding must be one of {SHARDINGS}, got {self.sharding!r}")
        try:
            check_on_error(self.on_error)
        except ValueError as error:
            raise TrainConfigError(str(error)) from None
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for key, why in _RESERVED_LOSS_KWARGS.items():
            if key in self.loss_kwargs:
                raise TrainConfigError(f"loss_kwargs may not hold {key!r}: {why}")
        try:  # fail now on a bad parameter or combination (alpha for a loss without one)
            make_loss(self.loss, **self.loss_parameters())
        except ValueError as error:
            raise TrainConfigError(str(error)) from None
        if self.lora is not None:
            from llave_kit.lora import check_lora_spec  # imports peft: only for LoRA runs

            try:
                self.lora = check_lora_spec(self.lora)
            except ValueError as error:
                raise TrainConfigError(str(error)) from None

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
                raise TrainConfigError(f"{name} must be {expected}, got {getattr(self, name)!r}")


# Per base type: what a value must be, in words, and the test it must pass.
_KINDS: dict[type, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, Integral) and not isinstance(v, bool)),
    float: ("a finite number", lambda v: math.isfinite(_as_number(v))),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("a mapping", lambda v: isinstance(v, dict)),
}


def _as_number(value: Any) -> float:
    """value as a float, nan when it is no number (a bool counts as none)."""
    if isinstance(value, Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return math.nan


def _split_optional(hint: Any) -> tuple[type, bool]:
    """`float | None` -> (float, True); `int` -> (int, False)."""
    args = typing.get_args(hint)
    if not args:
        return hint, False
    (base,) = [a for a in args if a is not type(None)]
    return base, type(None) in args


def _check_type(name: str, value: Any, hint: Any) -> None:
    base, optional = _split_optional(hint)
    if value is None and optional:
        return
    words, ok = _KINDS[base]
    if not ok(value):
        expected = base.__name__ + (" or null" if optional else "")
        raise TrainConfigError(f"{name} must be {words}, got {value!r} "
                               f"(type {type(value).__name__}; expected {expected})")


def _as_declared(value: Any, hint: Any) -> Any:
    """A checked value as its declared type: a numeric string or int becomes a float, a numpy
    integer an int (config.json, a JSON file, can hold only those)."""
    base = _split_optional(hint)[0] if hint is not None else None
    if value is not None and base in (int, float):
        return base(value)
    return value


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _loss_parameter_types(loss: Any) -> dict[str, Any]:
    """The annotated types of a loss's parameters; empty for a loss name that is no string."""
    if not isinstance(loss, str):
        return {}  # the loss field's own check names the mistake
    try:
        return typing.get_type_hints(make_loss(loss).loss_fn)
    except ValueError as error:  # an unknown loss name
        raise TrainConfigError(str(error)) from None


@dataclass
class TrainResult:
    history: list[dict]  # metrics.jsonl records, resumed runs included
    eval_history: list[dict]  # eval.jsonl records: {"step": s, **eval_fn(model)}
    checkpoint_path: Path  # the last checkpoint (the final step's)
    final_model_path: Path  # output_dir / "final"
    output_dir: Path


class NonFiniteError(RuntimeError):
    """Training produced nan/inf at `step`; the run stops before applying or saving it.

    `checkpoint`: the newest checkpoint (every saved tensor finite), or None. Each subclass says
    `what` went non-finite.
    """

    what: str

    def __init__(self, step: int, value: Any, checkpoint: Path | None):
        self.step, self.value, self.checkpoint = step, value, checkpoint
        # A checkpoint with finite weights may still hold a run that had diverged before (an lr
        # so high that the weights exploded): only its metrics tell, so the advice names both ways.
        if checkpoint is not None:
            advice = (f"The last checkpoint (all finite) is {checkpoint}: if the run was healthy "
                      "until then (metrics.jsonl), resume from it with resume=True and a lower lr, "
                      "a max_grad_norm or precision='fp32' (these may change on resume); "
                      "otherwise start afresh with overwrite=True and a lower lr")
        else:
            advice = ("No checkpoint was saved before it: start afresh with overwrite=True and a "
                      "lower lr or precision='fp32'")
        super().__init__(f"{self.what.format(step=step, value=value)}. {advice}, after checking "
                         "the data and the loss's temperature.")


class NonFiniteLossError(NonFiniteError):
    """The loss (or the embeddings it is computed from) became nan/inf."""

    what = "non-finite loss ({value}) at step {step}; the step was not applied"


class NonFiniteGradientError(NonFiniteError):
    """The gradient norm became nan/inf (clipping would zero the update, or apply nan)."""

    what = "non-finite gradient norm ({value}) at step {step}; the step was not applied"


class NonFiniteStateError(NonFiniteError):
    """A weight or optimizer tensor became nan/inf; `value` names the first one."""

    what = "non-finite values in {value} after step {step}; it was not saved"


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


def _sum_over_ranks(values: list[torch.Tensor], device: torch.device) -> list[float]:
    """Each scalar summed over ranks, in one all-reduce (gloo has no AVG; nccl needs `device`)."""
    stacked = torch.stack([v.detach().float().to(device) for v in values])
    if is_distributed():
        dist.all_reduce(stacked)
    return stacked.tolist()


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


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    return math.ceil(config.warmup_ratio * total_steps)


# --------------------------------------------------------------------------------------------------
# Data order


def batches_per_epoch(dataset_size: int, batch_size: int, num_processes: int) -> int:
    # DistributedSampler(drop_last=True) gives each process floor(N / P) items; the last partial
    # batch is dropped too, so every contrastive batch has the same number of negatives.
    per_epoch = (dataset_size // num_processes) // batch_size
    if per_epoch == 0:
        raise TrainConfigError(f"the dataset has {dataset_size} items: fewer than one batch of "
                               f"{batch_size} for each of {num_processes} process(es)")
    return per_epoch


def total_steps(config: TrainConfig, per_epoch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    steps = config.epochs * per_epoch // config.grad_accum_steps
    if steps == 0:
        raise TrainConfigError(f"{config.epochs} epoch(s) of {per_epoch} batches make no "
                               f"optimizer step with grad_accum_steps={config.grad_accum_steps}")
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
    scaler: Any
    output_dir: Path
    total_steps: int
    per_epoch: int
    resume_from: tuple[Path, dict] | None  # the checkpoint to continue and its state

    @property
    def sharded(self) -> bool:
        """Whether weights and optimizer state are split over processes: every rank then takes
        part in each forward, evaluation and save (they are collectives)."""
        return self.config.sharding == "fsdp" and self.runtime.world_size > 1

    def autocast(self):
        dtype = PRECISIONS[self.config.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=dtype)

    def loss_scale(self, loss: torch.Tensor) -> torch.Tensor:
        # Accumulated batches each contribute 1/A, so the step's gradient is their mean.
        loss = loss / self.config.grad_accum_steps
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def lr(self, step: int) -> float:
        """The lr of optimizer step `step` (1-based). A function of the config and the step alone,
        with no scheduler state, so a resumed run follows its own lr and length."""
        warmup = warmup_steps(self.config, self.total_steps)
        return self.config.lr * lr_factor(step - 1, self.total_steps, warmup, self.config.schedule)


def _check_precision(config: TrainConfig, device: torch.device) -> None:
    if config.precision == "fp16" and device.type != "cuda":
        raise TrainConfigError(
            "precision='fp16' needs CUDA (a GradScaler); use 'bf16' or 'fp32' on CPU")
    if config.precision == "fp16" and config.sharding == "fsdp":
        raise TrainConfigError("precision='fp16' is not supported with sharding='fsdp' (its "
                               "GradScaler does not handle sharded gradients); use 'bf16'")


def _check_model(config: TrainConfig, model: nn.Module) -> None:
    """Refuse a model that cannot train as configured (checkpointing, sharding), before any change."""
    if config.gradient_checkpointing and not hasattr(model, "gradient_checkpointing_enable"):
        raise TrainConfigError(
            "gradient_checkpointing=True needs a model with gradient_checkpointing_enable() "
            f"(an LmmEmbedder); {type(model).__name__} has none")
    try:
        check_shardable(model, config.sharding)
    except (TypeError, ValueError) as error:
        raise TrainConfigError(str(error)) from None


def _prepare_model(config: TrainConfig, model: nn.Module, runtime: Runtime) -> nn.Module:
    """LoRA adapters and gradient checkpointing, if asked; then the module each step calls
    (`net(groups)`), under DDP or over the model sharded in place (`llave_kit.sharding`)."""
    if config.lora is not None:  # before the optimizer and DDP collect the trainable parameters
        from llave_kit.lora import add_lora  # imports peft: only for LoRA runs

        try:
            add_lora(model, config.lora, seed=config.seed)
        except (TypeError, ValueError) as error:  # not an LmmEmbedder, or no such target module
            raise TrainConfigError(str(error)) from None
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return wrap_model(model, config.sharding, runtime, precision=config.precision,
                      find_unused_parameters=config.find_unused_parameters)


def _build_run(config, model, dataset, loss_fn) -> _Run:
    """Everything a run needs. Every check (device, output_dir, resume, model) comes before the
    model is changed, so a refused run hands the caller its model as it was."""
    runtime = setup_runtime(config)
    _check_precision(config, runtime.device)
    per_epoch = batches_per_epoch(len(dataset), config.batch_size, runtime.world_size)
    steps = total_steps(config, per_epoch)
    resume_from = _resume_point(config, runtime, steps)
    _check_model(config, model)
    model.to(runtime.device)
    net = _prepare_model(config, model, runtime)
    optimizer = build_optimizer(model, config)  # after sharding, which replaces the parameters
    return _Run(
        config, runtime, model, net,
        loss_fn if loss_fn is not None else build_loss(config, gather=runtime.world_size > 1),
        optimizer, torch.amp.GradScaler("cuda") if config.precision == "fp16" else None,
        Path(config.output_dir), steps, per_epoch, resume_from)


def _resume_point(config: TrainConfig, runtime: Runtime, steps: int) -> tuple[Path, dict] | None:
    """Check the output_dir against the config, writing nothing: the checkpoint to resume from
    and its state, or None."""
    out = Path(config.output_dir)
    newest = latest_checkpoint(out)
    if ((out / "metrics.jsonl").exists() or newest is not None) and not (config.resume
                                                                          or config.overwrite):
        raise TrainConfigError(f"{out} already holds a run; pass resume=True to continue it, "
                               "overwrite=True to replace it, or choose another output_dir")
    if not (config.resume and newest is not None):
        return None
    state = checkpoint_state(newest)
    _check_resumable(config, runtime, steps, newest, state)
    return newest, state


def _open_output_dir(run: _Run) -> None:
    """Clear the output_dir (a fresh run) or keep it (a resumed one), and write config.json."""
    config, out = run.config, run.output_dir
    barrier()  # every rank has looked before the main process deletes anything
    if run.runtime.is_main:
        if not config.resume:
            for name in ("checkpoints", "final"):  # first: a kill half-way leaves no checkpoint
                if (out / name).exists():
                    discard(out / name)
            for name in ("metrics.jsonl", "eval.jsonl"):
                (out / name).unlink(missing_ok=True)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        remove_partial_saves(out)
        write_text(out / "config.json", json.dumps(config.to_dict(), indent=1))
    barrier()


def _check_resumable(config: TrainConfig, runtime: Runtime, steps: int, checkpoint: Path,
                     state: dict) -> None:
    """Refuse a checkpoint this run cannot continue: another format, process count or length, or
    a changed field outside RESUMABLE_FIELDS (each named with its old and new value)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TrainConfigError(f"cannot resume {checkpoint}: its format is "
                               f"{state.get('format')!r}, this kit reads {CHECKPOINT_FORMAT!r}")
    if state["world_size"] != runtime.world_size:
        raise TrainConfigError(f"cannot resume {checkpoint}: it was trained by "
                               f"{state['world_size']} process(es), this run has "
                               f"{runtime.world_size}")
    current = config.to_dict()
    changed = [f"{key}={old!r} -> {current[key]!r}" for key, old in state["config"].items()
               if key in current and key not in RESUMABLE_FIELDS and old != current[key]]
    if changed:
        raise TrainConfigError(
            f"cannot resume {checkpoint} with a changed config: {', '.join(changed)}. Restore "
            "those values, or start afresh (overwrite=True or another output_dir); a resumed "
            f"run may change only {', '.join(sorted(RESUMABLE_FIELDS))}")
    if state["step"] > steps:
        raise TrainConfigError(f"cannot resume {checkpoint}: it is at step {state['step']}, "
                               f"beyond this config's {steps} steps")


def _restore(run: _Run) -> tuple[int, float]:
    """(step to continue from, elapsed seconds so far) after seeding or resuming."""
    seed_everything(run.config.seed + run.runtime.rank)  # ranks draw different dropout masks
    if run.resume_from is None:
        return 0, 0.0
    checkpoint, state = run.resume_from
    load_checkpoint(checkpoint, state, run.model, run.optimizer, run.scaler, run.runtime)
    return state["step"], state["elapsed_s"]


def _train_step(run: _Run, batches: Iterator[dict], step: int, checkpoint: Path | None) -> dict:
    """One optimizer step over grad_accum_steps batches; the metrics record (step is 1-based).

    The loss and the gradient norm are checked on every rank together, before the update: a
    nan/inf raises and the model keeps its last finite weights.
    """
    start, steps = time.perf_counter(), run.config.grad_accum_steps
    run.model.train()
    lr = run.lr(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss = torch.zeros((), device=run.runtime.device)
    targets = 0
    for i in range(steps):
        batch = next(batches)
        targets += len(batch["pos_texts"]) + len(batch.get("neg_texts", []))
        loss += contrastive_backward(
            run.net, run.loss_fn, batch, chunk_size=run.config.gradcache_chunk_size,
            loss_scale=run.loss_scale, autocast=run.autocast, sync=i == steps - 1)
    grad_norm = whole(_unscale_and_clip(run))  # under FSDP a norm over sharded gradients
    loss_sum, norm_sum, candidates = _sum_over_ranks(
        [loss / steps, grad_norm, torch.tensor(targets / steps)], run.runtime.device)
    loss_value = loss_sum / run.runtime.world_size
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(step, loss_value, checkpoint)
    # Under fp16 an overflowing gradient is the GradScaler's to skip (it lowers the scale).
    if run.scaler is None and not math.isfinite(norm_sum):
        raise NonFiniteGradientError(step, norm_sum / run.runtime.world_size, checkpoint)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # skips the step when fp16 gradients overflowed
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    global_batch = run.config.batch_size * run.runtime.world_size
    # grad_norm is the same on every rank: DDP has averaged the gradients. What the loss contrasts
    # is candidates_per_query, not "the batch size": every rank's positives and explicit negatives
    # of one contrastive batch (gathered; mean over accumulated ones, which add no candidates).
    # LLaVE's script contrasts 4 pairs x 8 GPUs = 32 candidates a query; its "batch 256" counts
    # accumulation.
    return {"step": step, "epoch": step * steps / run.per_epoch, "loss": loss_value, "lr": lr,
            "grad_norm": grad_norm.item(), "global_batch": global_batch,
            "candidates_per_query": candidates,
            "examples_per_s": global_batch * steps / (time.perf_counter() - start)}


def _unscale_and_clip(run: _Run) -> torch.Tensor:
    """Unscale (fp16), clip; return the gradient norm before clipping."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    max_norm = run.config.max_grad_norm or math.inf  # inf: only measure the norm
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _first_non_finite(run: _Run) -> str | None:
    """The first weight or optimizer tensor holding nan/inf on any rank, by name; None if none."""
    names = {id(p): name for name, p in run.model.named_parameters()}
    tensors = [(name, value) for name, value in run.model.state_dict().items()]
    tensors += [(f"the optimizer state of {names.get(id(p), 'a parameter')}", value)
                for p, state in run.optimizer.state.items() for value in state.values()
                if torch.is_tensor(value)]
    device = run.runtime.device
    # Under FSDP each rank checks its own shards; the sum over ranks below covers the rest.
    finite = torch.stack([torch.isfinite(local_part(value)).all().to(device)
                          for _, value in tensors]).tolist()
    bad = [name for (name, _), ok in zip(tensors, finite) if not ok]
    (bad_anywhere,) = _sum_over_ranks([torch.tensor(float(bool(bad)))], device)
    if not bad_anywhere:
        return None
    return bad[0] if bad else "another process's weights"


def _evaluate(run: _Run, eval_fn: Callable, step: int) -> dict:
    """eval_fn(model) on the main process, in eval mode, without touching the training RNG.

    A sharded model runs on every rank (each forward gathers weights from all of them), so under
    FSDP every rank calls eval_fn, and the main process's results are kept.
    """
    metrics = {}
    if run.runtime.is_main or run.sharded:
        run.model.eval()
        with torch.no_grad(), torch.random.fork_rng(rng_devices(run.runtime.device)):
            metrics = dict(eval_fn(run.model))
        run.model.train()
    barrier()
    return {"step": step, **metrics}


def _save(run: _Run, step: int, elapsed: float, checkpoint: Path | None) -> Path:
    """Write step's checkpoint, if every tensor in it is finite; return its path."""
    bad = _first_non_finite(run)
    if bad is not None:
        raise NonFiniteStateError(step, bad, checkpoint)
    rng_states = gather_rng(run.runtime)
    path = checkpoint_dir(run.output_dir, step)
    micro = step * run.config.grad_accum_steps
    epoch, batch_in_epoch = divmod(micro, run.per_epoch)
    info = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "world_size": run.runtime.world_size, "sharded": run.sharded, "elapsed_s": elapsed,
            "config": run.config.to_dict()}
    save_checkpoint(path, run.model, run.optimizer, run.scaler, info, rng_states,
                    run.config.keep_last, run.runtime)
    return path


def _start_line(run: _Run) -> str:
    """What one step contrasts, said up front: "batch size" alone misleads (see _train_step)."""
    config, world = run.config, run.runtime.world_size
    return (f"training {run.total_steps} steps: {world} process(es) x batch {config.batch_size} = "
            f"global batch {config.batch_size * world}; each query is contrasted with the global "
            "batch's positives and explicit negatives (candidates_per_query in metrics.jsonl); "
            f"{config.grad_accum_steps} contrastive batch(es) accumulated per step, which add no "
            f"candidates; {'FSDP-sharded' if run.sharded else 'DDP' if world > 1 else 'one process'}")


def _save_final(run: _Run) -> Path:
    """output_dir/final, written by the main process. A sharded model is first gathered into a
    plain copy on rank 0 (every rank takes part), which is what gets saved; the trained model
    stays sharded."""
    model = consolidated_embedder(run.model, run.config.lora) if run.sharded else run.model
    if model is not None and run.config.lora is not None:
        from llave_kit.lora import merge_lora

        merge_lora(model)  # so that final/ holds plain weights, which any loader reads
    if run.runtime.is_main:
        save_final_model(model, run.output_dir)
    barrier()
    return run.output_dir / "final"


def train(config: TrainConfig, model: nn.Module, dataset, collate_fn: Callable | None = None,
          eval_fn: Callable | None = None, *, loss_fn: Callable | None = None) -> TrainResult:
    """Train `model` (with `encode(texts, images) -> (N, D)` unit vectors) on train-pair items.

    dataset: a map-style dataset of train-pair dicts (`llave_kit.data.TrainPairDataset`);
    collate_fn: default `llave_kit.data.collate_train_pairs`; eval_fn(model) -> {metric: value},
    logged to eval.jsonl (run by the main process; by every process when sharded);
    loss_fn(query, target) -> scalar replaces the configured loss (it must
    gather across devices itself under torchrun). Raises TrainConfigError (before writing
    anything) on a config that does not fit the output_dir, data or device, and a NonFiniteError
    on a nan/inf loss, gradient norm or weight.
    """
    collate_fn = collate_fn or collate_train_pairs
    run = _build_run(config, model, dataset, loss_fn)
    _open_output_dir(run)
    start_step, elapsed = _restore(run)
    checkpoint = run.resume_from[0] if run.resume_from is not None else None
    kept = start_step if checkpoint is not None else -1  # records the checkpoint already covers
    metrics = JsonlLog(run.output_dir / "metrics.jsonl", run.runtime.is_main, kept)
    evals = JsonlLog(run.output_dir / "eval.jsonl", run.runtime.is_main, kept)
    batches = micro_batches(dataset, config, collate_fn, run.runtime,
                            start=start_step * config.grad_accum_steps)
    if eval_fn is not None and start_step == 0:
        evals.append(_evaluate(run, eval_fn, 0))  # the starting point, for "before vs after"
    clock = time.perf_counter() - elapsed  # elapsed_s continues across resumes
    if run.runtime.is_main:
        print(_start_line(run), file=sys.stderr)
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
            checkpoint = _save(run, step, time.perf_counter() - clock, checkpoint)
    final = _save_final(run)
    return TrainResult(metrics.records, evals.records, checkpoint, final, run.output_dir)


if __name__ == "__main__":
    # torchrun launches a module, so `-m llave_kit.train` stays an entry point: the `train` command.
    from llave_kit.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
