"""Time and peak memory of evaluating an MMEB-scale eval set: they should follow the distinct items.

MMEB lists 1000 candidates per query, drawn from a much smaller pool. This writes synthetic eval
sets of that shape to a temporary folder (a parquet file as MMEB ships, caption queries and image
candidates -- the case with the most images to open; small PNGs of random colours) and evaluates
each with the untrained tiny-dual embedder (`evaluation.evaluate_eval_set`, cache off) in a fresh
child process, which reports its phases' times and its peak RSS (`resource.getrusage`):

    A  Q x C from a pool of P images       (the default: 1000 x 1000 from 5000)
    B  the same Q x C from P / 2 images    time A / B ~ 2 if time follows the distinct items
    C  Q x C / 2 from P images             time A / C ~ 1 for the same reason

It also prints what the previous evaluation path, which decoded every candidate reference and
embedded the lists as one (Q, C, D) array, would have held (computed, not run).

Goal for the kit: peak RSS <= 2 GiB on CPU at 1000 x 1000 from 5000.

Run: .venv/bin/python benchmarks/bench_evaluation.py [--quick] [--batch-size 128]
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GOAL_PEAK_BYTES = 2 * 2**30
IMAGE_SIDE = 24
MMEB_LARGEST_DIM = 3584  # LLaVE-7B (Qwen2-VL-7B hidden size); tiny-dual has 128


def write_eval_set(folder: Path, n_queries: int, n_candidates: int, pool: int, seed: int) -> Path:
    """Pool images images/<i>.png and eval.parquet: query q's positive is image q % pool."""
    from PIL import Image

    from llave_kit.data import write_records

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    for i in range(pool):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), colour).save(folder / "images" / f"{i}.png")
    records = []
    for q in range(n_queries):
        wrong = rng.choice(pool - 1, size=n_candidates - 1, replace=False)
        wrong = wrong + (wrong >= q % pool)  # every image but the positive
        paths = [f"images/{i}.png" for i in [q % pool, *wrong]]
        records.append({"qry_text": f"find image {q % pool}", "qry_img_path": None,
                        "tgt_text": [""] * n_candidates, "tgt_img_path": paths})
    return write_records(folder / "eval.parquet", records, kind="eval")


def child(path: str, batch_size: int) -> None:
    """Evaluate one eval set in this fresh process; print phase times and memory as JSON."""
    import torch

    from llave_kit.dual_encoder import TinyDualEmbedder
    from llave_kit.evaluation import embed_eval_lists, read_eval_lists, score_embedded_lists

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    model = TinyDualEmbedder.build([f"find image {i}" for i in range(10)])
    start = time.perf_counter()
    lists = read_eval_lists(path)
    read = time.perf_counter()
    embedded = embed_eval_lists(model, lists, batch_size=batch_size, progress=False)
    embed = time.perf_counter()
    scores = score_embedded_lists(embedded, k=5)
    done = time.perf_counter()
    print(json.dumps({
        "queries": len(lists.query_texts), "candidates": lists.index.shape[1],
        "distinct": len(lists.candidate_texts), "p@1": float(np.mean(scores.ranks == 1)),
        "read_s": read - start, "embed_s": embed - read, "score_s": done - embed,
        "total_s": done - start, "threads": torch.get_num_threads(),
        "baseline_rss": baseline,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_case(root: Path, name: str, n_queries, n_candidates, pool, batch_size) -> dict:
    folder = root / name
    start = time.perf_counter()
    path = write_eval_set(folder, n_queries, n_candidates, pool, seed=0)
    written = time.perf_counter() - start
    done = subprocess.run([sys.executable, __file__, "--child", str(path), "--batch-size",
                           str(batch_size)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"name": name, "pool": pool, "write_s": written, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="200 x 200 from 1000 (seconds)")
    parser.add_argument("--child", metavar="EVAL_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch_size)
        return
    if args.quick:
        args.queries, args.candidates, args.pool = 200, 200, 1000
    q, c, p = args.queries, args.candidates, args.pool
    cases = [("A", q, c, p), ("B", q, c, p // 2), ("C", q, c // 2, p)]
    with tempfile.TemporaryDirectory() as temporary:
        results = [run_case(Path(temporary), *case, args.batch_size) for case in cases]
    print("| case | queries x candidates | pool | distinct | read s | embed s | score s | total s "
          "| items/s | peak RSS MiB | growth MiB |")
    print("|---" * 11 + "|")
    for r in results:
        items = r["queries"] + r["distinct"]
        print(f"| {r['name']} | {r['queries']} x {r['candidates']} | {r['pool']} | "
              f"{r['distinct']} | {r['read_s']:.2f} | {r['embed_s']:.2f} | {r['score_s']:.2f} | "
              f"{r['total_s']:.2f} | {items / r['total_s']:.0f} | {r['peak_rss'] / 2**20:.0f} | "
              f"{(r['peak_rss'] - r['baseline_rss']) / 2**20:.0f} |")
    a, b, c_ = results
    print(f"\ntime A / B (distinct items halved, Q x C kept): total {a['total_s'] / b['total_s']:.2f}, "
          f"embed {a['embed_s'] / b['embed_s']:.2f}")
    print(f"time A / C (Q x C halved, distinct items kept): total {a['total_s'] / c_['total_s']:.2f}, "
          f"embed {a['embed_s'] / c_['embed_s']:.2f}")
    references = q * c
    print(f"previous path at A: {references:,} candidate images decoded (now {a['distinct']:,}); "
          f"(Q, C, D) float32 array {references * 128 * 4 / 2**30:.2f} GiB at D = 128, "
          f"{references * MMEB_LARGEST_DIM * 4 / 2**30:.1f} GiB at D = {MMEB_LARGEST_DIM}")
    print(f"now at A: distinct candidates (N, D) {a['distinct'] * 128 * 4 / 2**20:.1f} MiB at "
          f"D = 128, {a['distinct'] * MMEB_LARGEST_DIM * 4 / 2**20:.0f} MiB at D = "
          f"{MMEB_LARGEST_DIM}; index (Q, C) int64 {references * 8 / 2**20:.1f} MiB")
    verdict = "met" if a["peak_rss"] <= GOAL_PEAK_BYTES else "MISSED"
    print(f"goal peak RSS <= 2 GiB: {verdict} ({a['peak_rss'] / 2**30:.2f} GiB; "
          f"{a['threads']} torch threads)")


if __name__ == "__main__":
    main()
