"""One-command GPU check (`make gpu-check`, under 5 minutes on one GPU): what the kit achieves on it.

    python scripts/gpu_check.py                         # CUDA; without one: a line, exit status 0
    python scripts/gpu_check.py --device cpu --tiny     # every code path on tiny sizes, in seconds

1. Matrix products: a bf16 (and a float32) n x n product's TFLOP/s, the roof to compare with.
2. The tiled loss (`llave_kit.tiled`, through `hardness_weighted_info_nce(chunk_size=...)`):
   forward + backward TFLOP/s at B x B x D, counting the 4 B x B x D products any exact
   recomputing method does (1 forward, 3 backward: 8 B^2 D flops), float32 inputs as training
   passes them.
3. The largest batch the tiled and the dense loss fit at D = 1024: doubling until out of memory,
   then bisection (the tiled search stops at --max-batch: its memory grows as B x D only, and
   its time as B^2).
4. Train steps/s of a random-init LLaVA-OneVision-0.5B-shaped embedder (24-layer Qwen2, hidden
   896; SigLIP-so400m at 384 px, one base view + one crop: 1458 image tokens per image), bf16,
   gradient checkpointing, GradCache; DDP and FSDP on a world-size-1 process group, with peak
   memory beside `llave_kit.memory_plan`'s estimate.

Writes gpu_check.json and gpu_check.md (a section for benchmarks/RESULTS.md) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from llave_kit.encoders import LlavaOnevisionImageTextProcessor, LmmEmbedder, default_model
from llave_kit.gradcache import Encoder, contrastive_backward
from llave_kit.losses import hardness_weighted_info_nce
from llave_kit.memory_plan import (
    Precision,
    estimate_training_memory,
    llava_onevision_0_5b_config,
    model_size,
)
from llave_kit.sharding import mixed_precision, shard_model
from llave_kit.train import TrainConfig, build_loss, build_optimizer

SKIPPED = "no CUDA GPU: gpu-check skipped"
# Full run (one GPU) and --tiny (CPU, seconds): sizes of every measurement
SIZES = {
    False: dict(matmul=8192, loss_batch=16384, dim=1024, chunk=4096, search_start=1024,
                max_batch=262144, resolution=1024, image=384, pairs=16, gradcache=8, steps=5),
    True: dict(matmul=256, loss_batch=256, dim=64, chunk=64, search_start=64,
               max_batch=512, resolution=64, image=56, pairs=4, gradcache=2, steps=2),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call (other load only adds time)."""
    step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / best_time(lambda: a @ b, device, repeats) / 1e12


def unit_rows(batch: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    query, target = (F.normalize(torch.randn(batch, dim, device=device), dim=-1) for _ in range(2))
    return query.requires_grad_(), target.requires_grad_()  # (B, D) each


def loss_step(query, target, chunk: int | None) -> None:
    hardness_weighted_info_nce(query, target, alpha=9.0, temperature=0.02, chunk_size=chunk).backward()
    query.grad = target.grad = None


def tiled_loss_tflops(device: torch.device, batch: int, dim: int, chunk: int, repeats: int = 3) -> float:
    query, target = unit_rows(batch, dim, device)
    seconds = best_time(lambda: loss_step(query, target, chunk), device, repeats)
    return 8 * batch**2 * dim / seconds / 1e12


def loss_fits(device: torch.device, batch: int, dim: int, chunk: int | None) -> bool:
    """Whether one forward + backward at this batch runs without running out of memory."""
    try:
        loss_step(*unit_rows(batch, dim, device), chunk)
        synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_fitting(fits: Callable[[int], bool], start: int, cap: int, resolution: int) -> dict:
    """The largest size that `fits`, to `resolution`: doubling from `start` to the first failure
    (or `cap`), then bisection between the last success and that failure.

    Returns {"largest": size or 0 when even `start` fails, "capped": whether `cap` still fit}.
    """
    if not fits(start):
        return {"largest": 0, "capped": False}
    good = start
    while good < cap:
        trial = min(2 * good, cap)
        if not fits(trial):
            bad = trial
            break
        good = trial
    else:
        return {"largest": good, "capped": True}
    while bad - good > resolution:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return {"largest": good, "capped": False}


# --------------------------------------------------------------------------------------------------
# Training steps of a LLaVA-OneVision-0.5B-shaped embedder


def onevision_embedder(config: LlavaOnevisionConfig, device: torch.device, image_side: int) -> LmmEmbedder:
    """Random weights in `config`'s shape, with the kit's offline word-level tokenizer (the shape,
    not the vocabulary, sets the cost); one base view + one crop per image."""
    tokenizer = default_model("tiny-llava-onevision", CAPTIONS).processor.tokenizer
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    config.video_token_index = tokenizer.convert_tokens_to_ids("<video>")
    config.image_grid_pinpoints = [[image_side, image_side]]
    config.vision_feature_select_strategy, config.vision_feature_layer = "full", -1
    config.vision_config.image_size = image_side
    config.text_config.pad_token_id = tokenizer.pad_token_id
    with torch.device(device):  # initialised where it runs: seconds on a GPU, a minute on a CPU
        network = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_side, "width": image_side}, image_grid_pinpoints=[[image_side, image_side]])
    processor = LlavaOnevisionImageTextProcessor(
        image_processor, tokenizer, tokenizer.chat_template,
        num_image_tokens=(image_side // 14) ** 2, vision_feature_select_strategy="full")
    return LmmEmbedder(network, processor, freeze_vision=True)


def shrunk(config: LlavaOnevisionConfig) -> LlavaOnevisionConfig:
    """The same architecture at CPU size (--tiny): 2 text layers of width 64, 1 SigLIP layer."""
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 64, 128, 2
    text.num_attention_heads, text.num_key_value_heads, text.vocab_size = 4, 2, 1000
    vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers = 32, 64, 1
    vision.num_attention_heads = 2
    return config


CAPTIONS = ["a photo of a red cube", "represent the given image", "a dog on a beach",
            "find an image that matches the caption"]


def synthetic_batch(pairs: int, side: int, seed: int) -> dict:
    """Image queries with an instruction, caption targets (MMEB's image-to-text retrieval)."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
              for _ in range(pairs)]
    return {"query_texts": [f"<|image_1|> {CAPTIONS[1]}"] * pairs, "query_images": images,
            "pos_texts": [CAPTIONS[i % len(CAPTIONS)] for i in range(pairs)],
            "pos_images": [None] * pairs}


def wrapped(embedder: LmmEmbedder, sharding: str, device: torch.device, precision: str):
    """The module a step calls, under DDP or FSDP2, even at world size 1 (where train() would
    leave the model unwrapped), so that their hooks and collectives are part of the timing."""
    if sharding == "ddp":
        return DistributedDataParallel(
            Encoder(embedder), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
    shard_model(embedder, mixed_precision(precision, device))
    return Encoder(embedder)


def train_speed(sharding: str, device: torch.device, sizes: dict, tiny: bool) -> dict:
    """Steps/s (and on CUDA peak memory beside the estimate) of bf16 + checkpointing + GradCache."""
    precision = "bf16" if device.type == "cuda" else "fp32"
    config = llava_onevision_0_5b_config()
    embedder = onevision_embedder(shrunk(config) if tiny else config, device, sizes["image"])
    embedder.gradient_checkpointing_enable()  # as training switches it on
    net = wrapped(embedder, sharding, device, precision)
    config = TrainConfig(lr=1e-5, temperature=0.02, alpha=9.0, precision=precision)
    optimizer, loss_fn = build_optimizer(embedder, config), build_loss(config, gather=True)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "bf16" else None
    batch = synthetic_batch(sizes["pairs"], sizes["image"], seed=0)
    embedder.train()

    def step():
        contrastive_backward(net, loss_fn, batch, chunk_size=sizes["gradcache"],
                             **({"autocast": autocast} if autocast else {}))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = best_time(step, device, sizes["steps"])
    tokens = embedder.tokenize(batch["query_texts"][:1], batch["query_images"][:1])["input_ids"].shape[1]
    record = {"sharding": sharding, "steps_per_s": 1 / seconds, "pairs_per_step": sizes["pairs"],
              "gradcache_chunk": sizes["gradcache"], "query_tokens": tokens, "precision": precision,
              "parameters": sum(p.numel() for p in embedder.parameters())}
    if device.type == "cuda":
        estimate = estimate_training_memory(
            model_size(embedder), gpus=1, sharding=sharding, lora=False, checkpointing=True,
            seq_len=tokens, precision=Precision(autocast=sharding == "ddp"))
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        record["estimated_gib"] = (estimate.static + sizes["gradcache"] * estimate.per_sequence) / 2**30
    return record


def world_of_one(device: torch.device):
    """A process group of one process, as torchrun would start it on one GPU."""
    store = tempfile.mkdtemp(prefix="gpu_check_")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{os.path.join(store, 'store')}", rank=0, world_size=1)


# --------------------------------------------------------------------------------------------------
# Report


def markdown(result: dict) -> str:
    m, loss = result["matmul"], result["tiled_loss"]
    lines = [f"## GPU check ({result['device_name']}, {result['date']})", "",
             f"`make gpu-check` ({'--tiny, ' if result['tiny'] else ''}torch {result['torch']}), "
             f"{result['seconds']:.0f} s.", "",
             "| measurement | value |", "|---|---|",
             f"| bf16 matmul {m['n']}^3 | {m['bf16_tflops']:.3g} TFLOP/s |",
             f"| float32 matmul {m['n']}^3 | {m['fp32_tflops']:.3g} TFLOP/s |",
             f"| tiled loss fwd+bwd, B = {loss['batch']}, D = {loss['dim']}, chunk {loss['chunk']} "
             f"| {loss['tflops']:.3g} TFLOP/s ({loss['tflops'] / m['fp32_tflops']:.2f} x fp32 matmul) |"]
    for path, found in result["largest_batch"].items():
        value = f"{found['largest']}" + (" (search cap)" if found["capped"] else "")
        lines.append(f"| largest {path} loss batch, D = {result['largest_batch_dim']} | {value} |")
    for run in result["train"]:
        memory = (f"; peak {run['peak_gib']:.1f} GiB, estimated {run['estimated_gib']:.1f} GiB"
                  if "peak_gib" in run else "")
        lines.append(f"| train, {run['sharding'].upper()} (world 1), {run['pairs_per_step']} pairs, "
                     f"GradCache {run['gradcache_chunk']}, {run['query_tokens']}-token queries "
                     f"| {run['steps_per_s']:.2f} steps/s{memory} |")
    return "\n".join(lines) + "\n"


def run_check(device: torch.device, tiny: bool) -> dict:
    sizes, start = SIZES[tiny], time.perf_counter()
    dtype_roof = {"bf16_tflops": matmul_tflops(device, sizes["matmul"], torch.bfloat16),
                  "fp32_tflops": matmul_tflops(device, sizes["matmul"], torch.float32)}
    dim = sizes["dim"]
    largest = {path: largest_fitting(lambda b, c=chunk: loss_fits(device, b, dim, c),
                                     sizes["search_start"], sizes["max_batch"], sizes["resolution"])
               for path, chunk in (("dense", None), ("tiled", sizes["chunk"]))}
    world_of_one(device)
    try:
        train = []
        for sharding in ("ddp", "fsdp"):
            train.append(train_speed(sharding, device, sizes, tiny))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the first model's memory, for the second
    finally:
        dist.destroy_process_group()
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "tiny": tiny,
        "matmul": {"n": sizes["matmul"], **dtype_roof},
        "tiled_loss": {"batch": sizes["loss_batch"], "dim": dim, "chunk": sizes["chunk"],
                       "tflops": tiled_loss_tflops(device, sizes["loss_batch"], dim, sizes["chunk"])},
        "largest_batch_dim": dim, "largest_batch": largest, "train": train,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks the script's logic")
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json / .md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(SKIPPED)
        return 0
    result = run_check(device, args.tiny)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
