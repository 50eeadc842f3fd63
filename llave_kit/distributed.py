"""Gather embeddings across processes so every rank contrasts against the global batch.

`all_gather_with_grad` concatenates every rank's rows (local sizes may differ) and, in backward,
sums the incoming gradients over ranks before handing each rank the slice for its own rows: every
rank's loss depends on every rank's embeddings, so each rank must receive the gradient from all of
them. Implementations that return only the local slice without that sum train with gradients that
are too small by the world size (or wrong, when ranks differ).

Everything here is the identity when `torch.distributed` is not initialised, so the same loss code
runs in one process and under `torchrun`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def gather_row_counts(local_rows: int, device: torch.device) -> list[int]:
    """Number of rows each rank holds, in rank order."""
    if not is_distributed():
        return [local_rows]
    count = torch.tensor([local_rows], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    return [int(c.item()) for c in counts]


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value` (a collective)."""
    if not is_distributed():
        return value
    largest = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return int(largest.item())


def local_row_offset(local_rows: int, device: torch.device) -> int:
    """Index of this rank's first row in the gathered (global) batch: the label offset."""
    return sum(gather_row_counts(local_rows, device)[: rank()])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        counts = gather_row_counts(tensor.shape[0], tensor.device)
        # Collectives need equal shapes: pad every rank to the largest count, trim afterwards.
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        buckets = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(buckets, padded.contiguous())
        ctx.offset = sum(counts[: rank()])
        ctx.rows = tensor.shape[0]
        return torch.cat([bucket[:count] for bucket, count in zip(buckets, counts)])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        # Every rank's loss used every row: a row's gradient is the sum over ranks.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset : ctx.offset + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (rows, ...) from all ranks in rank order; gradients flow back to owners.

    Returns `tensor` itself when not running distributed.
    """
    if not is_distributed() or world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)
