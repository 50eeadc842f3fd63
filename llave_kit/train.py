"""Contrastive training of an embedder: one flat loop, single process or torchrun/DDP.

    from llave_kit.train import TrainConfig, train
    config = TrainConfig.from_dict({"loss": "hardness_weighted", "alpha": 9.0, "max_steps": 200,
                                    "output_dir": "runs/demo"})
    result = train(config, model, dataset)          # model.encode(texts, images) -> (N, D)
    result.history[-1]["loss"], result.final_model_path

    torchrun --nproc_per_node 4 -m llave_kit.train --config cfg.yaml [key=value ...]
    python -m llave_kit.train --config cfg.yaml      # the same, one process

Each step: `grad_accum_steps` contrastive batches of `batch_size` pairs per process. A batch embeds
its queries (`encode_queries` if the model has it, else `encode`) and its targets (positives, then
any explicit negatives), and the loss contrasts every query with every target. Under torchrun the
loss gathers all ranks' embeddings (`gather_across_devices=True`), so each query sees the global
batch as negatives; DDP averages the gradients, which by the loss contract equals the gradient of
the single-process loss on the global batch. `gradcache_chunk_size` embeds a batch in chunks with
bounded memory and the same gradient (GradCache, `contrastive_backward`).

Output dir:
    config.json            the TrainConfig of the run
    metrics.jsonl          one record per `log_every` steps: step, epoch, loss, lr, grad_norm,
                           examples_per_s, elapsed_s (loss and lr are those of that step)
    eval.jsonl             `eval_fn(model)` results: before training, every `eval_every`, at the end
    checkpoints/step_00000100/
        model.safetensors          model weights (safetensors.torch.save_model)
        trainer_state.safetensors  tensors: optimizer moments ("optimizer.<param>.<name>"), torch
                                   CPU/CUDA RNG states per rank ("rng.<rank>.torch|cuda")
        trainer_state.json         step, data position (epoch, batch_in_epoch), world size, elapsed,
                                   config, optimizer param groups, scheduler and grad-scaler state,
                                   python and numpy RNG states per rank
    final/                 the trained model (`model.save_pretrained`, else model.safetensors)

Checkpoints are written to a temporary folder and renamed, so `checkpoints/` only ever holds
complete ones; the newest `keep_last` are kept. `resume=True` continues from the newest: the data
order depends only on (seed, epoch) and the step, so the resumed run replays the uninterrupted one
(bit for bit on CPU). A fresh run refuses an output_dir holding a run unless `overwrite=True`.
Under torchrun only rank 0 writes, and every rank reads the checkpoint on resume: output_dir must
be storage all ranks see.

References: LLaVE (Lan et al. 2025) for the recipe (cosine schedule, warm-up ratio 0.03, global
batch 256); Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup" (GradCache); nanoGPT for the shape of the loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from llave_kit.data import write_text
from llave_kit.distributed import is_distributed, rank, world_size
from llave_kit.losses import make_loss
from llave_kit.progress import progress_bar

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("cosine", "constant")
CHECKPOINT_FORMAT = "llave-kit-checkpoint/1"
_RESERVED_LOSS_KWARGS = {
    "temperature": "set it as TrainConfig.temperature",
    "alpha": "set it as TrainConfig.alpha",
    "gather_across_devices": "train() turns it on by itself when running distributed",
}


# --------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass
class TrainConfig:
    """Everything a run needs besides the model and the data (which `main()` reads from here).

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
    # read by main() only: an embedder for `llave_kit.encoders.load_embedder`; a train
    # jsonl/parquet, or a data set folder (manifest.json: all its tasks' train files); for a file,
    # the folder its image paths are relative to (default: its data set folder, else its folder)
    model: str | None = None
    data: str | None = None
    image_root: str | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "TrainConfig":
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


def _all_ranks_true(flag: torch.Tensor) -> bool:
    """Collective AND, so every rank takes the same branch (and no rank waits in a collective)."""
    flag = flag.to(torch.int32).reshape(1)
    if is_distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


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
# Forward and backward of one contrastive batch (plain or GradCache)

Group = tuple[str, Sequence[str], Sequence[Any]]  # (role "query" | "target", texts, images)
_ROLE_METHODS = {"query": "encode_queries", "target": "encode_targets"}


class Encoder(nn.Module):
    """forward(groups) -> the groups' embeddings concatenated, (sum of group sizes, D).

    Queries go through `encode_queries` and targets through `encode_targets` when the model has them
    (so training sees the instructions evaluation uses), else both through `encode`. Everything
    that shares a graph goes through a single forward call, because DDP expects one per backward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, groups: Sequence[Group]) -> torch.Tensor:
        out = []
        for role, texts, images in groups:
            encode = getattr(self.model, _ROLE_METHODS[role], self.model.encode)
            out.append(encode(list(texts), list(images)))
        return torch.cat(out)


def contrastive_groups(batch: dict) -> tuple[list[Group], int]:
    """A collated batch -> [queries, targets (positives, then negatives)], number of queries."""
    queries, positives = len(batch["query_texts"]), len(batch["pos_texts"])
    if queries == 0 or positives != queries or len(batch["query_images"]) != queries:
        raise ValueError(f"a batch needs one positive per query, got {queries} query texts, "
                         f"{len(batch['query_images'])} query images, {positives} positives")
    neg_texts, neg_images = batch.get("neg_texts", []), batch.get("neg_images", [])
    targets = ("target", [*batch["pos_texts"], *neg_texts], [*batch["pos_images"], *neg_images])
    return [("query", batch["query_texts"], batch["query_images"]), targets], queries


def _loss_or_none(loss_fn, emb: torch.Tensor, n_query: int) -> torch.Tensor | None:
    """The loss, or None when any rank's embeddings hold nan/inf (the loss would reject them).

    The check is collective so that every rank skips the loss, and its collectives, together.
    """
    if not _all_ranks_true(torch.isfinite(emb).all()):
        return None
    return loss_fn(emb[:n_query], emb[n_query:])  # query (B, D) vs target (M, D)


def _full_precision(emb: torch.Tensor) -> torch.Tensor:
    # Autocast may hand back bf16/fp16 embeddings; the loss and its cached gradients stay >= fp32.
    return emb.to(torch.promote_types(emb.dtype, torch.float32))


def _sync(net: nn.Module, sync: bool):
    """DDP all-reduces gradients in every backward unless told not to (accumulation, chunks)."""
    return nullcontext() if sync or not isinstance(net, DistributedDataParallel) else net.no_sync()


def contrastive_backward(net: nn.Module, loss_fn: Callable, batch: dict, *,
                         chunk_size: int | None = None, loss_scale: Callable = lambda x: x,
                         autocast: Callable = nullcontext, sync: bool = True) -> torch.Tensor:
    """Embed a batch, compute the loss, backpropagate `loss_scale(loss)`; return the loss, detached.

    `net(groups)` embeds (an `Encoder`, maybe DDP-wrapped). A nan/inf embedding returns a nan loss
    without backward. With `chunk_size` the batch goes through `gradcache_backward`.
    """
    groups, n_query = contrastive_groups(batch)
    if chunk_size is not None:
        return gradcache_backward(net, loss_fn, groups, n_query, chunk_size, loss_scale,
                                  autocast, sync)
    with _sync(net, sync):
        with autocast():
            emb = _full_precision(net(groups))  # (B + M, D)
        loss = _loss_or_none(loss_fn, emb, n_query)
        if loss is None:
            return torch.tensor(float("nan"), device=emb.device)
        loss_scale(loss).backward()
    return loss.detach()


def _rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG fork_rng must save: this process's own, none on CPU."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _get_rng(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def gradcache_backward(net, loss_fn, groups, n_query, chunk_size, loss_scale, autocast, sync):
    """GradCache (Gao et al. 2021): the gradient of the whole batch's loss in chunk-sized memory.

    1. Embed every chunk without a graph, recording the RNG state each chunk starts from.
    2. Compute the loss on the (detached, requires_grad) embeddings and backpropagate it to them:
       that gives d loss / d embedding for every row (the only step that sees the whole batch).
    3. Re-run each chunk with a graph from its recorded RNG state (same dropout masks) and
       backpropagate the cached gradient through the encoder: torch.autograd.backward(emb, grad).
    By the chain rule the parameters' gradients equal a full-batch backward.
    """
    chunks = [[(role, texts[i:i + chunk_size], images[i:i + chunk_size])]
              for role, texts, images in groups for i in range(0, len(texts), chunk_size)]
    device = next(net.parameters()).device
    states, pieces = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_get_rng(device))
            with autocast():
                pieces.append(_full_precision(net(chunk)))
    emb = torch.cat(pieces).requires_grad_()  # (B + M, D), a leaf: the loss's graph stops here
    loss = _loss_or_none(loss_fn, emb, n_query)
    if loss is None:
        return torch.tensor(float("nan"), device=emb.device)
    loss_scale(loss).backward()
    grads = emb.grad.split([len(piece) for piece in pieces])
    for i, (chunk, grad) in enumerate(zip(chunks, grads)):
        # fork_rng puts the RNG back afterwards: the replay leaves it where step 1 left it.
        with _sync(net, sync and i == len(chunks) - 1), torch.random.fork_rng(_rng_devices(device)):
            _set_rng(device, states[i])
            with autocast():
                out = _full_precision(net(chunk))
            torch.autograd.backward(out, grad)
    return loss.detach()


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; the previous one is removed only after that."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def capture_rng(device: torch.device) -> dict:
    """This process's RNG states: python and numpy as JSON-able lists, torch as uint8 tensors."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    torch_state, cuda_state = _get_rng(device)
    return {"python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch_state, "cuda": cuda_state}


def restore_rng(state: dict, device: torch.device) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    _set_rng(device, (state["torch"], state["cuda"] if device.type == "cuda" else None))


def _gather_rng(runtime: Runtime) -> list[dict]:
    """Every rank's RNG states, in rank order (a collective under torchrun)."""
    state = capture_rng(runtime.device)
    if runtime.world_size == 1:
        return [state]
    states: list = [None] * runtime.world_size
    dist.all_gather_object(states, state)
    return states


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = Path(output_dir) / "checkpoints"
    steps = [p for p in root.glob("step_*")
             if re.fullmatch(r"step_\d+", p.name) and (p / "trainer_state.json").exists()]
    return max(steps, key=lambda p: int(p.name[5:]), default=None)


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, info: dict,
                    rng_states: list[dict], keep_last: int) -> Path:
    """Write a checkpoint folder atomically (temp folder, then rename) and prune older ones."""
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"optimizer.{pid}.{name}": value.contiguous()
               for pid, state in opt["state"].items() for name, value in state.items()}
    for r, rng_state in enumerate(rng_states):
        tensors[f"rng.{r}.torch"] = rng_state["torch"]
        if rng_state["cuda"] is not None:
            tensors[f"rng.{r}.cuda"] = rng_state["cuda"]
    save_file(tensors, str(tmp / "trainer_state.safetensors"))
    _write_json(tmp / "trainer_state.json", {
        "format": CHECKPOINT_FORMAT, **info, "optimizer_param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
        "rng": [{"python": s["python"], "numpy": s["numpy"]} for s in rng_states],
    })
    _replace_dir(tmp, path)
    for old in sorted(path.parent.glob("step_*"), key=lambda p: p.name)[:-keep_last]:
        shutil.rmtree(old)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, runtime: Runtime) -> dict:
    """Restore model, optimizer, scheduler, scaler and this rank's RNG; return the JSON state."""
    info = json.loads((path / "trainer_state.json").read_text())
    if info.get("format") != CHECKPOINT_FORMAT or info["world_size"] != runtime.world_size:
        raise ValueError(
            f"{path}: format {info.get('format')!r}, world size {info.get('world_size')}; this run "
            f"expects {CHECKPOINT_FORMAT!r} with world size {runtime.world_size}")
    load_model(model, str(path / "model.safetensors"), device=str(runtime.device))
    tensors = load_file(str(path / "trainer_state.safetensors"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        kind, owner, name = key.split(".", 2)
        if kind == "optimizer":
            state.setdefault(int(owner), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["optimizer_param_groups"]})
    scheduler.load_state_dict(info["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(info["scaler"])
    r = runtime.rank
    restore_rng({**info["rng"][r], "torch": tensors[f"rng.{r}.torch"],
                 "cuda": tensors.get(f"rng.{r}.cuda")}, runtime.device)
    return info


def save_final_model(model: nn.Module, output_dir: Path) -> Path:
    """output_dir/final: `model.save_pretrained` when the model has it, else model.safetensors."""
    final, tmp = output_dir / "final", output_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp)
    else:
        save_model(model, str(tmp / "model.safetensors"))
    _replace_dir(tmp, final)
    return final


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
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            os.replace(tmp, path)

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
        for stale in (out / "checkpoints").glob(".tmp-*"):  # left by a crash during a save
            shutil.rmtree(stale)
        _write_json(out / "config.json", config.to_dict())
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


def _evaluate(run: _Run, eval_fn: Callable, step: int) -> dict:
    """eval_fn(model) on the main process, in eval mode, without touching the training RNG."""
    metrics = {}
    if run.runtime.is_main:
        run.model.eval()
        with torch.no_grad(), torch.random.fork_rng(_rng_devices(run.runtime.device)):
            metrics = dict(eval_fn(run.model))
        run.model.train()
    _barrier()
    return {"step": step, **metrics}


def _save(run: _Run, step: int, elapsed: float) -> Path:
    rng_states = _gather_rng(run.runtime)
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


def train(config: TrainConfig, model: nn.Module, dataset, collate_fn: Callable | None = None,
          eval_fn: Callable | None = None, *, loss_fn: Callable | None = None) -> TrainResult:
    """Train `model` (with `encode(texts, images) -> (N, D)` unit vectors) on train-pair items.

    dataset: a map-style dataset of train-pair dicts (`llave_kit.data.TrainPairDataset`);
    collate_fn: default `llave_kit.data.collate_train_pairs`; eval_fn(model) -> {metric: value},
    logged to eval.jsonl; loss_fn(query, target) -> scalar replaces the configured loss (it must
    gather across devices itself under torchrun). Raises NonFiniteLossError on a nan/inf loss.
    """
    if collate_fn is None:
        from llave_kit.data import collate_train_pairs as collate_fn
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
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if eval_fn is not None and (last or (config.eval_every and step % config.eval_every == 0)):
            evals.append(_evaluate(run, eval_fn, step))
        if last or (config.save_every and step % config.save_every == 0):
            checkpoint = _save(run, step, time.perf_counter() - clock)
    final = run.output_dir / "final"
    if run.runtime.is_main:
        save_final_model(model, run.output_dir)
    _barrier()
    return TrainResult(metrics.records, evals.records, checkpoint, final, run.output_dir)


# --------------------------------------------------------------------------------------------------
# Command line / torchrun entry point


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """A YAML mapping of TrainConfig fields, then `key=value` overrides (values parsed as YAML)."""
    import yaml

    with open(path) as handle:
        params = yaml.safe_load(handle) or {}
    if not isinstance(params, dict):
        raise ValueError(
            f"{path}: expected a mapping of TrainConfig fields, got {type(params).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        params[key.strip()] = yaml.safe_load(value)
    return TrainConfig.from_dict(params)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    parser = argparse.ArgumentParser(description="Train an embedder (torchrun-aware).")
    parser.add_argument("--config", required=True, help="YAML file of TrainConfig fields")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. max_steps=100 alpha=0")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if config.model is None or config.data is None:
        raise ValueError(f"{args.config}: set `model` (an embedder name or folder) and `data` "
                         "(a train jsonl) to train from the command line")
    from llave_kit.data import TrainPairDataset, load_manifest
    from llave_kit.encoders import load_embedder

    if Path(config.data).is_dir():
        dataset = load_manifest(config.data).train_dataset()  # images under the manifest's root
    else:
        dataset = TrainPairDataset(config.data, config.image_root)
    try:
        return train(config, load_embedder(config.model), dataset)
    finally:
        if is_distributed():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
