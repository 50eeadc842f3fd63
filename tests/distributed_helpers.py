"""Run a function on a real CPU `gloo` process group, for tests of cross-device code.

    results = run_distributed(2, my_fn, x, y)   # my_fn(rank, world_size, x, y) in each process

`my_fn` must be importable by the child processes (a module-level function of a test module or of
the package) and its arguments and return value picklable. Processes are started with `spawn`, so
nothing of the parent's torch state leaks into them; the group rendezvous through a FileStore in a
temporary directory, which needs no free port and cannot collide with a parallel test run.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A rank that fails makes its peers wait in a collective; spawn kills them once it sees the failure,
# and this timeout bounds the wait if a rank hangs instead of failing.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def _worker(rank: int, world_size: int, workdir: str, fn: Callable, args: tuple) -> None:
    # One intra-op thread per rank: a 2-core CI machine would otherwise be oversubscribed.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(workdir, 'store')}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    final = os.path.join(workdir, f"result_{rank}.pkl")
    with open(final + ".tmp", "wb") as handle:
        pickle.dump(result, handle)
    os.replace(final + ".tmp", final)


def run_distributed(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; results in rank order.

    An exception in any rank is raised here as `torch.multiprocessing.ProcessRaisedException`,
    whose message holds that rank's traceback; the other ranks are terminated.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="llave_gloo_") as workdir:
        mp.spawn(_worker, args=(world_size, workdir, fn, args), nprocs=world_size, join=True)
        results = []
        for rank in range(world_size):
            with open(os.path.join(workdir, f"result_{rank}.pkl"), "rb") as handle:
                results.append(pickle.load(handle))
    return results
