"""Share of a tiny-dual training step spent on data handling, with the decoded-image cache off and on.

Each step draws a batch of scenes training pairs (seeded, the same batches for both settings),
loads them through the dataset (`TrainPairDataset.__getitem__`: records -> PIL images) and
`collate_train_pairs` -- the "data" time -- then embeds queries and positives with
`TinyDualEmbedder`, computes the hardness-weighted loss (temperature 0.05, alpha 9), backpropagates
and takes an AdamW step -- the "model" time (the model's own pixel conversion counts here). Cache
off is what LLAVE_KIT_IMAGE_CACHE_MB=0 gives; cache on is the default budget, warmed as in training
by the dataset's up-front image check. Settings alternate over `--rounds` to share out the noise of
a busy machine; times are summed over rounds.

Goal for the kit: data share <= 10% of the step with the cache on.

Run: .venv/bin/python benchmarks/bench_data_share.py [--batch 64] [--steps 60] [--threads 1]
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llave_kit import data as data_module
from llave_kit.data import DEFAULT_IMAGE_CACHE_MB, collate_train_pairs
from llave_kit.dual_encoder import TinyDualEmbedder
from llave_kit.losses import make_loss
from llave_kit.scenes import make_scenes_dataset

GOAL_SHARE = 0.10


def batch_indices(n_items: int, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """Shuffled epochs cut into batches, as the trainer's sampler does (drop_last)."""
    rng, batches = np.random.default_rng(seed), []
    while len(batches) < steps:
        order = rng.permutation(n_items)
        batches += [order[i:i + batch] for i in range(0, n_items - batch + 1, batch)]
    return batches[:steps]


def time_steps(info, budget_bytes: int, batches, warmup: int, seed: int) -> dict:
    """Run warm-up + timed steps with the image cache at `budget_bytes`; data/model seconds."""
    cache = data_module.IMAGE_CACHE
    cache.set_budget(budget_bytes)
    cache.clear()
    dataset = info.train_dataset()  # checks every image once, which fills an enabled cache
    model = TinyDualEmbedder.build(info.vocabulary(), seed=seed).train()
    loss_fn = make_loss("hardness_weighted", temperature=0.05, alpha=9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data_s = model_s = 0.0
    hits, misses = cache.hits, cache.misses
    for step, indices in enumerate(batches):
        if step == warmup:
            hits, misses = cache.hits, cache.misses
        start = time.perf_counter()
        batch = collate_train_pairs([dataset[int(i)] for i in indices])
        loaded = time.perf_counter()
        queries = model.encode_queries(batch["query_texts"], batch["query_images"])
        targets = model.encode_targets(batch["pos_texts"] + batch["neg_texts"],
                                       batch["pos_images"] + batch["neg_images"])
        loss = loss_fn(queries, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:  # the first steps warm up allocators and caches
            data_s += loaded - start
            model_s += time.perf_counter() - loaded
    return {"data_s": data_s, "model_s": model_s, "steps": len(batches) - warmup,
            "hits": cache.hits - hits, "misses": cache.misses - misses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per setting and round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=300, help="training pairs per task")
    parser.add_argument("--cache-mb", type=float, default=DEFAULT_IMAGE_CACHE_MB)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"off": 0, "on": int(args.cache_mb * 2**20)}

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        # Only random eval lists: the benchmark trains, and so needs no hard-list constraints.
        info = make_scenes_dataset(Path(tmp) / "scenes", n_train=args.n_train, n_eval=10,
                                   hard_fractions={"random": 0.0}, seed=args.seed)
        generated_s = time.perf_counter() - started
        n_pairs = info.manifest["counts"]["train_pairs"]
        image_size = info.manifest["parameters"].get("image_size", "?")
        batches = batch_indices(n_pairs, args.batch, args.warmup + args.steps, args.seed)
        totals = {name: {"data_s": 0.0, "model_s": 0.0, "steps": 0, "hits": 0, "misses": 0}
                  for name in settings}
        for _ in range(args.rounds):
            for name, budget in settings.items():
                for key, value in time_steps(info, budget, batches, args.warmup, args.seed).items():
                    totals[name][key] += value
    data_module.IMAGE_CACHE.set_budget(settings["on"])

    print(f"tiny-dual, batch {args.batch}, {args.steps} timed steps x {args.rounds} round(s) per "
          f"setting ({args.warmup} warm-up), {args.threads} thread(s); scenes {n_pairs} training "
          f"pairs, {image_size}px images (generated in {generated_s:.1f} s)")
    print(f"  {'image cache':<18}{'steps/s':>8}{'data s/step':>13}{'model s/step':>14}"
          f"{'data share':>12}{'hit rate':>10}")
    rows = {}
    for name, t in totals.items():
        data_step, model_step = t["data_s"] / t["steps"], t["model_s"] / t["steps"]
        share = data_step / (data_step + model_step)
        rows[name] = (1 / (data_step + model_step), data_step, share)
        label = "off" if name == "off" else f"on ({args.cache_mb:g} MiB)"
        lookups = t["hits"] + t["misses"]
        hit_rate = f"{t['hits'] / lookups:.0%}" if lookups else "-"
        print(f"  {label:<18}{rows[name][0]:>8.2f}{data_step:>13.4f}{model_step:>14.4f}"
              f"{share:>12.1%}{hit_rate:>10}")
    (off_rate, off_data, _), (on_rate, on_data, on_share) = rows["off"], rows["on"]
    print(f"  cache on vs off: {on_rate / off_rate:.2f}x steps/s, data time / "
          f"{off_data / on_data:.1f}")
    verdict = "met" if on_share <= GOAL_SHARE else "NOT met"
    print(f"  goal data share <= {GOAL_SHARE:.0%} with the cache on: {verdict} ({on_share:.1%})")


if __name__ == "__main__":
    main()
