"""Dense vs tiled hardness-weighted InfoNCE: wall time and peak extra memory of forward + backward.

    .venv/bin/python benchmarks/bench_tiled_loss.py                      # CPU, B = 1024 .. 16384
    .venv/bin/python benchmarks/bench_tiled_loss.py --sizes 1024 4096 --repeats 5
    .venv/bin/python benchmarks/bench_tiled_loss.py --device cuda        # also the largest batch

One step is `hardness_weighted_info_nce(q, t, alpha=9, temperature=0.02, chunk_size=...)` followed
by `backward()`, with q, t (B, D) unit-norm float32 leaves (symmetric loss, B x B similarities);
"dense" is chunk_size=None, "tiled" is chunk_size=--chunk-size. Ratios are tiled / dense from the
same run. Time is the best of --repeats steps (other load on a shared machine only ever adds time),
after one untimed step; the CPU column is the process's CPU time over all threads, which load on a
shared machine disturbs less than wall time (--threads 1 disturbs it least).

How peak extra memory is measured
- CPU: every (path, B) case runs in a fresh subprocess, so no case inherits another's heap. The
  subprocess builds its inputs, runs a small warm-up step (thread pools, kernels), then resets the
  kernel's peak-RSS counter (writing "5" to /proc/self/clear_refs, Linux) and records the current
  RSS. After one forward + backward, peak extra = VmHWM - that RSS. RSS counts every page the
  process touched, whoever allocated it; torch's CPU allocator keeps no cache that could hide
  memory, and tracemalloc cannot see torch's allocations, hence this method. The figure includes
  the gradients of q and t (2 x B x D x 4 bytes for both paths), and what glibc malloc keeps in its
  heap after a free (real memory held by the process; it makes the tiled figure vary by about 2x
  between runs). Where clear_refs is unavailable the process's lifetime peak (ru_maxrss) is used
  instead, an upper bound.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory
  allocated before the step; in-process. The largest batch each path fits is found by doubling B
  from 1024 until an out-of-memory error (or --max-batch), then bisecting to --resolution.

Dense cases whose estimated peak (DENSE_BYTES_PER_PAIR x B x M) exceeds --memory-cap-gib (default:
half the memory free at start, host RAM or GPU) are skipped and reported as such.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from llave_kit.losses import hardness_weighted_info_nce
from llave_kit.tiled import DEFAULT_CHUNK_SIZE

# Measured on CPU (benchmarks/RESULTS.md): the dense symmetric step peaks at about 28 bytes per
# similarity entry (seven float32 (B, M)-sized tensors alive at once).
DENSE_BYTES_PER_PAIR = 28
MIB = 2**20


def make_inputs(batch: int, dim: int, extra: int, device: str):
    generator = torch.Generator().manual_seed(batch)
    query = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)  # (B, D)
    target = F.normalize(torch.randn(batch + extra, dim, generator=generator), dim=-1)  # (M, D)
    return query.to(device).requires_grad_(), target.to(device).requires_grad_()


def step(query, target, chunk_size):
    """One forward + backward; gradients are dropped so every step allocates them afresh."""
    hardness_weighted_info_nce(query, target, alpha=9.0, temperature=0.02,
                               chunk_size=chunk_size).backward()
    query.grad = target.grad = None


def timed_steps(query, target, chunk_size, repeats, synchronize=lambda: None) -> dict:
    """Best and median wall time, and best process CPU time (all threads), over `repeats` steps."""
    wall, cpu = [], []
    for _ in range(repeats):
        synchronize()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step(query, target, chunk_size)
        synchronize()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return {"time_s": min(wall), "median_s": statistics.median(wall), "cpu_s": min(cpu)}


# --------------------------------------------------------------------------------------------------
# CPU: one subprocess per case, peak RSS growth


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def cpu_worker(chunk_size: int | None, batch: int, dim: int, extra: int, repeats: int) -> dict:
    """Measure one case in this (fresh) process; returns the JSON-able result."""
    warm_query, warm_target = make_inputs(64, dim, extra, "cpu")
    step(warm_query, warm_target, chunk_size)
    query, target = make_inputs(batch, dim, extra, "cpu")
    exact = _reset_peak_rss()
    before_kib = _proc_status_kib("VmRSS")
    step(query, target, chunk_size)
    peak_kib = _proc_status_kib("VmHWM") if exact else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak_kib - before_kib) / 1024, "exact_peak": exact,
            **timed_steps(query, target, chunk_size, repeats)}


def run_cpu_case(chunk_size, batch, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", str(chunk_size), str(batch),
               "--dim", str(args.dim), "--extra-negatives", str(args.extra_negatives),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"case chunk_size={chunk_size} B={batch} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# CUDA: in-process, max_memory_allocated, largest batch search


def cuda_case(chunk_size, batch, args) -> dict:
    query, target = make_inputs(batch, args.dim, args.extra_negatives, "cuda")
    step(query, target, chunk_size)  # warm-up: kernels, cuBLAS workspaces
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(query, target, chunk_size)
    peak_mib = (torch.cuda.max_memory_allocated() - before) / MIB
    return {"peak_mib": peak_mib,
            **timed_steps(query, target, chunk_size, args.repeats, torch.cuda.synchronize)}


def fits_on_cuda(chunk_size, batch, args) -> bool:
    try:
        query, target = make_inputs(batch, args.dim, args.extra_negatives, "cuda")
        step(query, target, chunk_size)
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        query = target = None
        torch.cuda.empty_cache()


def largest_cuda_batch(chunk_size, args) -> tuple[int, bool]:
    """(largest B that fits, whether the search stopped at --max-batch instead of running out)."""
    good, bad = 0, None
    batch = 1024
    while batch <= args.max_batch:
        if not fits_on_cuda(chunk_size, batch, args):
            bad = batch
            break
        good, batch = batch, batch * 2
    if bad is None:
        return good, True
    while bad - good > args.resolution:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits_on_cuda(chunk_size, middle, args) else (good, middle)
    return good, False


def cuda_largest_batches(args) -> None:
    print("\nLargest batch per path (doubling from 1024, then bisection):")
    print("| path | largest B | time per step at that B (s) | peak extra (MiB) |")
    print("|---|---|---|---|")
    for name, chunk_size in (("dense", None), ("tiled", args.chunk_size)):
        batch, capped = largest_cuda_batch(chunk_size, args)
        if batch == 0:
            print(f"| {name} | < 1024 | - | - |")
            continue
        result = cuda_case(chunk_size, batch, args)
        shown = f">= {batch} (search cap)" if capped else str(batch)
        print(f"| {name} | {shown} | {result['time_s']:.3f} | {result['peak_mib']:.0f} |")


# --------------------------------------------------------------------------------------------------
# Table


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(args) -> str:
    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{_cpu_model()}, {os.cpu_count()} CPUs"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, "
            f"load average {load}; D={args.dim}, extra negatives={args.extra_negatives}, "
            f"chunk={args.chunk_size}, best of {args.repeats}")


def _free_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def measure(chunk_size, batch, args) -> dict | None:
    if chunk_size is None:
        estimate = DENSE_BYTES_PER_PAIR * batch * (batch + args.extra_negatives) / 2**30
        if estimate > args.memory_cap_gib:
            print(f"  dense B={batch} skipped: estimated {estimate:.1f} GiB > "
                  f"--memory-cap-gib {args.memory_cap_gib:.1f}", flush=True)
            return None
    run = cuda_case if args.device == "cuda" else run_cpu_case
    return run(chunk_size, batch, args)


def _ratio(tiled: float, dense: float, key: str) -> str:
    return f"1/{dense / tiled:.0f}" if key == "peak_mib" else f"{tiled / dense:.2f}"


def print_table(args) -> None:
    print(describe_machine(args))
    metrics = [("wall time (s)", "time_s", "{:.2f}"), ("CPU time (s)", "cpu_s", "{:.2f}"),
               ("peak extra memory (MiB)", "peak_mib", "{:.0f}")]
    if args.device == "cuda":
        metrics.pop(1)  # host CPU time says nothing about the GPU
    rows = []
    for batch in args.sizes:
        rows.append((batch, measure(None, batch, args), measure(args.chunk_size, batch, args)))
        print(f"  measured B={batch}", flush=True)
    header = ["B"]
    for name, _, _ in metrics:
        header += [f"dense {name}", f"tiled {name}", "tiled/dense"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for batch, dense, tiled in rows:
        cells = [str(batch)]
        for _, key, fmt in metrics:
            if dense is None:
                cells += ["skipped", fmt.format(tiled[key]), "-"]
            else:
                cells += [fmt.format(dense[key]), fmt.format(tiled[key]),
                          _ratio(tiled[key], dense[key], key)]
        print("| " + " | ".join(cells) + " |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--extra-negatives", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="skip dense cases whose estimated peak exceeds this "
                             "(default: half the free memory)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default, one per core)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--max-batch", type=int, default=2**18, help="CUDA search upper limit")
    parser.add_argument("--resolution", type=int, default=1024, help="CUDA bisection resolution")
    parser.add_argument("--worker", nargs=2, metavar=("CHUNK_SIZE", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    if args.memory_cap_gib is None:
        args.memory_cap_gib = _free_memory_bytes(args.device) / 2 / 2**30
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        chunk, batch = args.worker
        chunk_size = None if chunk == "None" else int(chunk)
        print(json.dumps(cpu_worker(chunk_size, int(batch), args.dim, args.extra_negatives,
                                    args.repeats)))
        return
    print_table(args)
    if args.device == "cuda":
        cuda_largest_batches(args)
    print("load average at the end:", ", ".join(f"{value:.1f}" for value in os.getloadavg()))


if __name__ == "__main__":
    main()
