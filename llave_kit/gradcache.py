"""Forward and backward of one contrastive batch: whole, or in chunks with GradCache.

    groups, n_query = contrastive_groups(batch)     # [queries, targets], number of queries
    loss = contrastive_backward(Encoder(model), loss_fn, batch)                  # one graph
    loss = contrastive_backward(Encoder(model), loss_fn, batch, chunk_size=16)   # GradCache

Both leave the same parameter gradients (tests/test_train.py checks them against each other, and
the dropout masks too); GradCache holds one chunk's activations at a time instead of the batch's.

GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"; sentence-transformers' CachedMultipleNegativesRankingLoss) in four steps:
    1. Embed every chunk without a graph, recording the RNG state each chunk starts from.
    2. Compute the loss on the embeddings, made a leaf that requires grad, and backpropagate it to
       them: d loss / d embedding for every row (the only step that sees the whole batch).
    3. Re-run each chunk with a graph from its recorded RNG state, so that dropout draws the same
       masks, and backpropagate the cached gradient through the encoder:
       torch.autograd.backward(chunk_embeddings, cached_gradient).
    4. Put the RNG back where step 1 left it, so the replay leaves no trace in the training RNG.
By the chain rule the parameters' gradients equal those of one backward over the whole batch.

Under FSDP (`llave_kit.sharding`) every forward all-gathers weights, a collective, so a process
with fewer chunks than its peers (fewer rows, or fewer explicit negatives) repeats its last chunk
until the counts match, backpropagates a zero gradient through the repeats, and keeps them out of
the training RNG: the run draws the dropout masks an unsharded one draws.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from llave_kit.distributed import is_distributed, max_over_ranks

Group = tuple[str, Sequence[str], Sequence[Any]]  # (role "query" | "target", texts, images)


class Encoder(nn.Module):
    """forward(groups) -> the groups' embeddings concatenated, (sum of group sizes, D).

    Queries go through the model's `encode_queries` and targets through `encode_targets` (the
    `encoders.Embedder` protocol), so training sees the instructions evaluation uses. Everything
    that shares a graph goes through a single forward call, because DDP expects one per backward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, groups: Sequence[Group]) -> torch.Tensor:
        out = []
        for role, texts, images in groups:
            encode = self.model.encode_queries if role == "query" else self.model.encode_targets
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


def gradcache_backward(net, loss_fn, groups, n_query, chunk_size, loss_scale, autocast, sync):
    """The whole batch's gradient in chunk-sized memory, by the steps in the module docstring."""
    chunks = [[(role, texts[i:i + chunk_size], images[i:i + chunk_size])]
              for role, texts, images in groups for i in range(0, len(texts), chunk_size)]
    device = next(net.parameters()).device
    real = len(chunks)
    if _sharded_root(net) is not None:  # as many forwards as the peers (module docstring)
        chunks += [chunks[-1]] * (max_over_ranks(real, device) - real)
    states, pieces = [], []
    with torch.no_grad():  # step 1
        for i, chunk in enumerate(chunks):
            states.append(get_rng_state(device))
            # a repeat draws no dropout masks from the training RNG: peers draw none either
            with torch.random.fork_rng(rng_devices(device)) if i >= real else nullcontext():
                with autocast():
                    pieces.append(_full_precision(net(chunk)))
    emb = torch.cat(pieces[:real]).requires_grad_()  # (B + M, D), a leaf: the loss's graph stops here
    loss = _loss_or_none(loss_fn, emb, n_query)  # step 2
    if loss is None:
        return torch.tensor(float("nan"), device=emb.device)
    loss_scale(loss).backward()
    grads = [*emb.grad.split([len(piece) for piece in pieces[:real]]),
             *(torch.zeros_like(piece) for piece in pieces[real:])]
    for i, (chunk, grad) in enumerate(zip(chunks, grads)):  # step 3; fork_rng does step 4
        # Only the last chunk's backward may all-reduce: DDP would otherwise sync every chunk.
        with _sync(net, sync and i == len(chunks) - 1), torch.random.fork_rng(rng_devices(device)):
            set_rng_state(device, states[i])
            with autocast():
                out = _full_precision(net(chunk))
            torch.autograd.backward(out, grad)
    return loss.detach()


def _loss_or_none(loss_fn, emb: torch.Tensor, n_query: int) -> torch.Tensor | None:
    """The loss, or None when any rank's embeddings hold nan/inf (the loss would reject them).

    The check is collective so that every rank skips the loss, and its collectives, together.
    """
    finite = torch.isfinite(emb).all().to(torch.int32).reshape(1)
    if is_distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # AND over ranks
    if not finite.item():
        return None
    return loss_fn(emb[:n_query], emb[n_query:])  # query (B, D) vs target (M, D)


def _full_precision(emb: torch.Tensor) -> torch.Tensor:
    # Autocast may hand back bf16/fp16 embeddings; the loss and its cached gradients stay >= fp32.
    return emb.to(torch.promote_types(emb.dtype, torch.float32))


def _sync(net: nn.Module, sync: bool):
    """DDP all-reduces gradients in every backward unless told not to (accumulation, chunks):
    unsynchronised gradients add up on each process until a synced backward.

    FSDP reduce-scatters in every backward regardless. Unsynchronised, each process would hold the
    whole model's unsharded fp32 gradients until the synced backward, the memory FSDP exists to
    save; one reduce-scatter per chunk instead adds communication and keeps gradients sharded.
    """
    if sync or not isinstance(net, DistributedDataParallel):
        return nullcontext()
    return net.no_sync()


def _sharded_root(net: nn.Module) -> FSDPModule | None:
    """The outermost FSDP-sharded module of `net` (the model under an `Encoder`), or None."""
    return next((m for m in net.modules() if isinstance(m, FSDPModule)), None)


# --------------------------------------------------------------------------------------------------
# RNG replay (also what checkpoints save and evaluation forks)


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG fork_rng must save: this process's own, none on CPU."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def get_rng_state(device: torch.device) -> tuple:
    """(torch CPU state, CUDA state of `device` or None): what dropout on `device` draws from."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
