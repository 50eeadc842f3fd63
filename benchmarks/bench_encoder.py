"""Train-step throughput of the CPU default embedder (forward + backward through InfoNCE + AdamW).

Each step embeds a batch of image+text queries (56x56 images, an MMEB-style instruction) and text
targets, computes symmetric InfoNCE and takes an AdamW step; processing (chat template, tokenizer,
image processor) is timed too, and reported separately.

Run: .venv/bin/python benchmarks/bench_encoder.py [--model tiny-qwen2-vl] [--batch 64] [--threads 1]
"""
import argparse
import time

import numpy as np
import torch
from PIL import Image

from llave_kit.encoders import default_model
from llave_kit.losses import info_nce

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["cube", "sphere", "cylinder", "cone"]
INSTRUCTION = "Represent the given image with the following question: what shape is shown?"


def make_batch(batch: int, seed: int):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (batch, 56, 56, 3), dtype=np.uint8)
    images = [Image.fromarray(p) for p in pixels]
    captions = [f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)}" for _ in range(batch)]
    return [f"<|image_1|> {INSTRUCTION}"] * batch, images, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen2-vl")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    embedder = default_model(args.model, [INSTRUCTION, *COLOURS, *SHAPES, "a"]).train()
    optimizer = torch.optim.AdamW([p for p in embedder.parameters() if p.requires_grad], lr=1e-3)
    batches = [make_batch(args.batch, seed) for seed in range(args.steps)]
    process_s = step_s = 0.0
    for i, (queries, images, captions) in enumerate(batches):
        start = time.perf_counter()
        query_batch = embedder.tokenize(queries, images)
        target_batch = embedder.tokenize(captions, [None] * args.batch)
        processed = time.perf_counter()
        loss = info_nce(embedder(query_batch), embedder(target_batch), temperature=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 3:  # the first steps warm up allocators and caches
            process_s += processed - start
            step_s += time.perf_counter() - processed
    timed = args.steps - 3
    n_params = sum(p.numel() for p in embedder.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f}M params, batch {args.batch}, "
          f"{args.threads} thread(s)")
    print(f"  processing {process_s / timed * 1e3:.0f} ms/step, model fwd+bwd+AdamW "
          f"{step_s / timed * 1e3:.0f} ms/step")
    print(f"  {timed / (process_s + step_s):.2f} train steps/s overall "
          f"({timed / step_s:.2f} steps/s model only)")


if __name__ == "__main__":
    main()
