"""scikit-learn's handwritten digits as an MMEB data set folder: a real image source, offline.

Two tasks over the 1,797 8x8 digits (upscaled): digits_cls (classification: image -> "a
handwritten digit seven" among distinct digit captions) and digits_t2i (retrieval: caption ->
image among images of distinct digits), written in the formats of `llave_kit.data`.

Example:
    info = make_digits_dataset("data/digits")
    info.eval_dataset("digits_cls", "random")
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from llave_kit.data import (
    INSTRUCTIONS,
    MANIFEST_VERSION,
    DatasetInfo,
    existing_dataset,
    load_manifest,
    record_words,
    write_manifest,
    write_records,
)
from llave_kit.files import staged_directory, write_text

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_CAPTION = "a handwritten digit {digit}"


def digit_caption(label: int) -> str:
    return DIGIT_CAPTION.format(digit=DIGIT_WORDS[label])


def _digit_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """8x8 values in [0, 16] -> image_size x image_size RGB, white strokes on black, bilinear."""
    gray = Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), mode="L")
    return gray.resize((image_size, image_size), Image.BILINEAR).convert("RGB")


def _digit_pairs(labels: list[int], paths: list[str], ids: list[int]) -> dict[str, list[dict]]:
    """Training pairs of both digit tasks for the images `ids`."""
    cls, t2i = [], []
    for i in ids:
        caption = digit_caption(labels[i])
        cls.append({"qry": INSTRUCTIONS["classify"], "qry_image_path": paths[i],
                    "pos_text": caption, "pos_image_path": ""})
        t2i.append({"qry": INSTRUCTIONS["find_image"].format(caption=caption),
                    "qry_image_path": "", "pos_text": INSTRUCTIONS["image_target"],
                    "pos_image_path": paths[i]})
    return {"digits_cls": cls, "digits_t2i": t2i}


def _digit_lists(labels, paths, ids, rng, num_candidates: int) -> dict[str, list[dict]]:
    """Eval lists of both digit tasks: the truth first, then one candidate per other digit drawn."""
    by_label = {d: [i for i in ids if labels[i] == d] for d in range(10)}
    cls, t2i = [], []
    for i in ids:
        others = [d for d in range(10) if d != labels[i]]
        negatives = [others[k] for k in rng.permutation(9)[: num_candidates - 1]]
        caption = digit_caption(labels[i])
        cls.append({"qry_text": INSTRUCTIONS["classify"], "qry_img_path": paths[i],
                    "tgt_text": [caption] + [digit_caption(d) for d in negatives],
                    "tgt_img_path": [""] * num_candidates})
        images = [paths[by_label[d][rng.integers(len(by_label[d]))]] for d in negatives]
        t2i.append({"qry_text": INSTRUCTIONS["find_image"].format(caption=caption),
                    "qry_img_path": "", "tgt_text": [INSTRUCTIONS["image_target"]] * num_candidates,
                    "tgt_img_path": [paths[i]] + images})
    return {"digits_cls": cls, "digits_t2i": t2i}


def make_digits_dataset(
    out_dir: str | os.PathLike,
    *,
    train_fraction: float = 0.5,
    num_candidates: int = 10,
    image_size: int = 56,
    seed: int = 0,
    overwrite: bool = False,
) -> DatasetInfo:
    """scikit-learn's 1,797 handwritten digits (8x8, upscaled) as an MMEB data set folder.

    Tasks: digits_cls (classification: image -> "a handwritten digit seven" among `num_candidates`
    distinct digit captions) and digits_t2i (retrieval: caption -> image among images of distinct
    digits). A seeded split puts `train_fraction` of the images into training pairs, the rest into
    eval lists (level "random"). labels.jsonl gives each image's digit for clustering studies.
    Same parameters and an existing folder -> the folder is reused.
    """
    from sklearn.datasets import load_digits

    if not 2 <= num_candidates <= 10:
        raise ValueError(f"num_candidates must be in [2, 10] (ten digits), got {num_candidates}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    params = {"train_fraction": train_fraction, "num_candidates": num_candidates,
              "image_size": image_size, "seed": seed}
    if (info := existing_dataset(out_dir, "digits", params, overwrite)) is not None:
        return info
    digits, rng = load_digits(), np.random.default_rng(seed)
    labels = [int(t) for t in digits.target]
    paths = [f"images/digits/{i:04d}.png" for i in range(len(labels))]
    is_train = np.zeros(len(labels), bool)
    is_train[rng.permutation(len(labels))[: round(train_fraction * len(labels))]] = True
    train_ids, eval_ids = np.flatnonzero(is_train).tolist(), np.flatnonzero(~is_train).tolist()
    pairs = _digit_pairs(labels, paths, train_ids)
    lists = _digit_lists(labels, paths, eval_ids, rng, num_candidates)
    with staged_directory(out_dir, overwrite) as stage:
        for i, rel in enumerate(paths):
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            _digit_image(digits.images[i], image_size).save(stage / rel, format="PNG")
        for task in pairs:
            write_records(stage / f"train/{task}.jsonl", pairs[task], kind="train")
            write_records(stage / f"eval/{task}_random.jsonl", lists[task], kind="eval")
        write_records(stage / "labels.jsonl", [
            {"image_path": p, "split": "train" if is_train[i] else "eval", "label": labels[i],
             "digit": DIGIT_WORDS[labels[i]]} for i, p in enumerate(paths)])
        records = [r for group in (pairs, lists) for rows in group.values() for r in rows]
        words = sorted({w for r in records for w in record_words(r)})
        write_text(stage / "vocabulary.txt", "\n".join(words) + "\n")
        write_manifest(stage, _digits_manifest(params, len(train_ids), len(eval_ids), len(paths)))
    return load_manifest(out_dir)


def _digits_manifest(params: dict, n_train: int, n_eval: int, n_images: int) -> dict:
    def task(name, meta_task, query, target):
        return {"meta_task": meta_task, "query_modality": query, "target_modality": target,
                "train": f"train/{name}.jsonl", "n_train": n_train,
                "eval": {"random": f"eval/{name}_random.jsonl"}, "hard_fraction": {"random": 0.0},
                "n_eval": n_eval, "num_candidates": params["num_candidates"]}

    return {
        "name": "digits", "version": MANIFEST_VERSION, "seed": params["seed"], "parameters": params,
        "image_root": ".", "vocabulary": "vocabulary.txt", "labels": "labels.jsonl",
        "tasks": {"digits_cls": task("digits_cls", "classification", "image", "text"),
                  "digits_t2i": task("digits_t2i", "retrieval", "text", "image")},
        "counts": {"train_pairs": 2 * n_train, "eval_queries": 2 * n_eval, "images": n_images},
    }
