"""A small two-tower embedder for CPU studies that need thousands of training steps in minutes.

    >>> from PIL import Image
    >>> model = TinyDualEmbedder.build(["what is in the top left", "a small red circle"])
    >>> image = Image.new("RGB", (84, 84), "red")
    >>> model.encode(["<|image_1|> what is in the top left", "a small red circle"], [image, None]).shape
    torch.Size([2, 128])

`load_embedder("tiny-dual")` builds it with the scenes vocabulary.

The tiny LMM defaults (`encoders.default_model`) run the real LLaVE path, but learn the scenes data's
one-attribute distinctions slowly on a CPU (hard-list P@1 about 0.13 after 500 steps, ~3 minutes).
Studies that compare training recipes need models that learn within seconds, so this model has the
same interface (`encoders.Embedder`, plus `from_pretrained`) with cheap towers:

    image: 14x14 patches (6x6 of them) -> a 3x3 conv over neighbouring patches -> the whole grid,
           flattened so position survives -> linear; plus a text-directed attention over the patches
    text:  word embeddings -> bidirectional GRU (word order matters: "red circle, blue square")
    both:  the features (a missing modality contributes zeros) -> MLP -> L2-normalise

Any input mixes text and image as `LmmEmbedder` does; the `<|image_1|>` placeholder is dropped.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from llave_kit.data import text_words
from llave_kit.files import staged_directory

IMAGE_SIZE = 84
PATCH = 14  # 84 / 14 = 6 patches a side: 2 x 2 patches per cell of the scenes' 3 x 3 grid
GRID = IMAGE_SIZE // PATCH
CONFIG_FILE = "dual_encoder.json"
WEIGHTS_FILE = "model.safetensors"
PAD, UNKNOWN = "<pad>", "<unk>"


def words_of(text: str) -> list[str]:
    return [word.lower() for word in text_words(text)]


class TinyDualEmbedder(nn.Module):
    def __init__(self, words: Sequence[str], embedding_dim: int = 128, width: int = 64):
        super().__init__()
        self.words = [PAD, UNKNOWN, *words]
        self.word_ids = {word: i for i, word in enumerate(self.words)}
        self.vocabulary_digest = hashlib.sha256(" ".join(self.words).encode()).hexdigest()
        self.embedding_dim, self.width = embedding_dim, width
        self.convs = nn.Sequential(  # (N, 3, 84, 84) -> (N, width, 6, 6)
            nn.Conv2d(3, width, kernel_size=PATCH, stride=PATCH), nn.ReLU(),  # patches, as a ViT
            nn.Conv2d(width, width, kernel_size=3, padding=1), nn.ReLU(),  # neighbouring patches
        )
        self.image_head = nn.Linear(width * GRID * GRID, 2 * width)
        self.patch_positions = nn.Parameter(torch.zeros(GRID * GRID, width))
        self.attention_query = nn.Linear(2 * width, width)
        self.word_embeddings = nn.Embedding(len(self.words), width, padding_idx=0)
        self.gru = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.fuse = nn.Sequential(nn.Linear(5 * width, 2 * width), nn.ReLU(),
                                  nn.Linear(2 * width, embedding_dim))

    @classmethod
    def build(cls, vocabulary: Iterable[str], seed: int = 0, device=None,
              **sizes) -> TinyDualEmbedder:
        words = sorted({word for text in vocabulary for word in words_of(text)})
        with torch.random.fork_rng(devices=[]):  # seeded weights, global RNG untouched
            torch.manual_seed(seed)
            return cls(words, **sizes).to(device)

    @property
    def device(self) -> torch.device:
        return self.image_head.weight.device

    def _patches(self, images: Sequence[Image.Image | None]) -> tuple[list[int], torch.Tensor]:
        """Indices of the items that have an image, and their patch features (n, GRID², width)."""
        present = [i for i, image in enumerate(images) if image is not None]
        if not present:
            return present, torch.zeros(0, GRID * GRID, self.width, device=self.device)
        pixels = np.stack([np.asarray(images[i].convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)),
                                      dtype=np.float32) / 255.0 for i in present])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device)  # (n, 3, 84, 84)
        return present, self.convs(x).flatten(2).transpose(1, 2)  # (n, 36, width)

    def _image_features(self, images, text: torch.Tensor) -> torch.Tensor:
        """Whole-image features (2 width) and a text-directed look at the patches (width).

        The text picks patches by attention ("what is in the top left" must read one cell);
        a missing image contributes zeros.
        """
        present, patches = self._patches(images)
        if not present:
            return text.new_zeros(len(images), 3 * self.width)
        whole = self.image_head(patches.flatten(1))  # (n, 2 width): position survives
        keys = patches + self.patch_positions  # (n, 36, width)
        query = self.attention_query(text[present])  # (n, width)
        weights = torch.softmax(keys @ query[:, :, None] / self.width ** 0.5, dim=1)
        looked_at = (weights * patches).sum(dim=1)  # (n, width)
        seen = torch.cat([whole, looked_at], dim=1)  # (n, 3 width)
        # Zeros in the dtype the image tower produced: under autocast that is bf16 while the text
        # tower's GRU stays float32, and the row assignment below needs both sides to agree.
        features = seen.new_zeros(len(images), 3 * self.width)
        features[present] = seen
        return features

    def _text_features(self, texts: Sequence[str]) -> torch.Tensor:
        ids = [[self.word_ids.get(w, 1) for w in words_of(text)] for text in texts]
        lengths = torch.tensor([max(len(row), 1) for row in ids])
        padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
        for i, row in enumerate(ids):
            padded[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.word_embeddings(padded.to(self.device)), lengths, batch_first=True,
            enforce_sorted=False)
        _, last = self.gru(packed)  # (2, N, width): final state of each direction
        features = torch.cat([last[0], last[1]], dim=1)
        empty = torch.tensor([not row for row in ids], device=self.device)
        return features.masked_fill(empty[:, None], 0.0)  # no text -> no text feature

    def encode(self, texts: Sequence[str], images: Sequence[Image.Image | None]) -> torch.Tensor:
        if len(texts) != len(images):
            raise ValueError(f"got {len(texts)} texts but {len(images)} images")
        if not texts:
            raise ValueError("empty batch: nothing to encode")
        text = self._text_features(texts)  # (N, 2 width)
        fused = torch.cat([self._image_features(images, text), text], dim=1)  # (N, 5 width)
        return F.normalize(self.fuse(fused), dim=-1)

    # Queries and targets share one encoder and take no instructions: scenes texts carry their own.
    def encode_queries(self, texts: Sequence[str],
                       images: Sequence[Image.Image | None]) -> torch.Tensor:
        return self.encode(texts, images)

    def encode_targets(self, texts: Sequence[str],
                       images: Sequence[Image.Image | None]) -> torch.Tensor:
        return self.encode(texts, images)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        config = {"words": self.words[2:], "embedding_dim": self.embedding_dim, "width": self.width}
        with staged_directory(directory, overwrite=True) as staging:  # all or nothing on disk
            (staging / CONFIG_FILE).write_text(json.dumps(config))
            save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                      str(staging / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device=None, **_) -> TinyDualEmbedder:
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: not a saved TinyDualEmbedder")
        model = cls(**json.loads((directory / CONFIG_FILE).read_text()))
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return model.to(device).eval()

    @staticmethod
    def is_saved_in(directory: str | os.PathLike) -> bool:
        return (Path(directory) / CONFIG_FILE).exists()
