"""A training run in a process of its own, for tests that kill it at a chosen point.

    python tests/train_child.py OUT_DIR [--resume] [--kill-deleting NAME]

Trains TinyEmbedder (dropout 0.2, so the RNG state matters) on 40 items: 4 steps of 2 batches of
8, a checkpoint after every step, the newest one kept. --kill-deleting NAME: when the run deletes a
folder whose name contains NAME, the folder's tensor files go first, as an rmtree caught half-way
leaves it, and the process SIGKILLs itself.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
from pathlib import Path

import torch
from tiny_training import TinyEmbedder, collate, make_items

from llave_kit.train import TrainConfig, train

TENSOR_FILES = ("model.safetensors", "trainer_state.safetensors")


def kill_while_deleting(name: str) -> None:
    rmtree = shutil.rmtree

    def rmtree_killed_half_way(path, *args, **kwargs):
        folder = Path(path)
        if name in folder.name and (folder / TENSOR_FILES[0]).exists():
            for file in TENSOR_FILES:
                (folder / file).unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree_killed_half_way


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-deleting", metavar="NAME")
    args = parser.parse_args()
    if args.kill_deleting:
        kill_while_deleting(args.kill_deleting)
    torch.set_num_threads(1)  # every run of a test computes alike, bit for bit
    config = TrainConfig(output_dir=args.output_dir, batch_size=8, grad_accum_steps=2,
                         max_steps=4, save_every=1, keep_last=1, lr=1e-2, temperature=0.1,
                         alpha=3.0, resume=args.resume)
    train(config, TinyEmbedder(dropout=0.2), make_items(40), collate_fn=collate)


if __name__ == "__main__":
    main()
