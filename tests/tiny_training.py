"""The stand-in embedder and data of the training tests, shared with the processes they start.

TinyEmbedder is a hashed-word EmbeddingBag + a linear map of tiny images, with dropout, so that a
training run takes seconds without the real encoders or data modules.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from llave_kit.losses import make_loss

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
SHAPES = ["cube", "ball", "cone", "ring", "star"]
IMAGE_SIDE = 4


class TinyEmbedder(nn.Module):
    """encode(texts, images) -> (N, D) unit vectors: mean of hashed word vectors + linear(image)."""

    def __init__(self, dim: int = 16, buckets: int = 97, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.buckets = buckets
        self.words = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.pixels = nn.Linear(3 * IMAGE_SIDE * IMAGE_SIDE, dim)
        self.mix = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def encode(self, texts, images):
        device = self.mix.weight.device
        ids = [[zlib.crc32(w.encode()) % self.buckets for w in t.split()] or [0] for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        text = self.words(torch.tensor(sum(ids, [])).to(device), offsets.to(device))  # (N, D)
        # Like an LMM, text-only inputs never touch the image weights (DDP must cope with that).
        rows = [i for i, im in enumerate(images) if im is not None]
        if rows:
            pixels = torch.stack([torch.from_numpy(np.asarray(images[i], dtype=np.float32))
                                  for i in rows]).reshape(len(rows), -1) / 255.0  # (K, 3*side^2)
            image = self.pixels(pixels.to(device, text.dtype)).to(text.dtype)  # autocast: bf16
            text = text.index_add(0, torch.tensor(rows, device=device), image)
        hidden = self.dropout(torch.tanh(text))
        return F.normalize(self.mix(hidden), dim=-1)

    def encode_queries(self, texts, images):  # through self.encode, which some tests replace
        return self.encode(texts, images)

    def encode_targets(self, texts, images):
        return self.encode(texts, images)


def make_items(n: int, seed: int = 0, with_negatives: bool = True) -> list[dict]:
    """Train-pair dicts in the interface layout: an image-of-a-scene query, a caption positive."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        pixels = rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        wrong = COLOURS[(i + 1) % len(COLOURS)]
        items.append({
            "query_text": f"<|image_1|> find the {colour} thing",
            "query_image": Image.fromarray(pixels),
            "pos_text": f"a {colour} {shape}", "pos_image": None,
            "neg_text": f"a {wrong} {shape}" if with_negatives and i % 2 == 0 else None,
            "neg_image": None,
        })
    return items


def collate(items: list[dict]) -> dict:
    """The collate_train_pairs layout: lists per field; negatives only for items that have one."""
    negs = [it for it in items if it["neg_text"] is not None or it["neg_image"] is not None]
    return {
        "query_texts": [it["query_text"] for it in items],
        "query_images": [it["query_image"] for it in items],
        "pos_texts": [it["pos_text"] for it in items],
        "pos_images": [it["pos_image"] for it in items],
        "neg_texts": [it["neg_text"] or "" for it in negs],
        "neg_images": [it["neg_image"] for it in negs],
    }


class _TimesInfGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by inf."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


class FaultAtCall(nn.Module):
    """A loss whose `call`-th call goes wrong: its value turns nan ("nan loss", the kind of blow-up
    a too-high lr produces) or stays finite with an infinite gradient ("inf gradient")."""

    def __init__(self, call: int, fault: str = "nan loss", loss: nn.Module | None = None):
        super().__init__()
        self.call, self.calls, self.fault = call, 0, fault
        self.loss = loss or make_loss("info_nce", temperature=0.1)

    def forward(self, query, target):
        self.calls += 1
        hit = self.calls == self.call
        if hit and self.fault == "inf gradient":
            query = _TimesInfGradient.apply(query)
        value = self.loss(query, target)
        return value * math.nan if hit and self.fault == "nan loss" else value
