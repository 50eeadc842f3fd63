"""The MMEB data format: records, readers and writers, PyTorch datasets and collates, manifests.

Formats (MMEB / VLM2Vec; one record per jsonl line or parquet row; image paths relative to an image
root; an empty or null image path means "no image"; texts mark the image with `<|image_1|>`):

    train  qry, qry_image_path, pos_text, pos_image_path [, neg_text, neg_image_path]
    eval   qry_text, qry_img_path, tgt_text (list), tgt_img_path (list); candidate 0 is the positive

A data set folder (written by the built-in generators `llave_kit.scenes` and `llave_kit.digits`,
described by `write_mmeb_manifest` for real MMEB files, or by hand):

    manifest.json                    tasks, meta-task of each, files, counts, seed, parameters
    vocabulary.txt                   every word the texts use, one per line
    labels.jsonl                     per-image labels (for clustering studies)
    train/<task>.jsonl               training pairs
    eval/<task>_<level>.jsonl        candidate lists, one file per hardness level
    images/...                       PNG files; paths in the records are relative to the folder

Real MMEB is read where it lies (`find_mmeb_files`, `open_mmeb_folder`, `write_mmeb_manifest`):
a dataset is a flat file or a folder of shards read in name order as one dataset, and the images
may live under a separate root:

    eval/<dataset>.jsonl|parquet                     MMEB-eval, flat
    eval/<dataset>/test-00000-of-00002.parquet ...   MMEB-eval as published (test*.parquet|jsonl)
    train/<subset>.jsonl|parquet                     MMEB-train, flat
    train/<subset>/original-00000-of-00001.parquet   MMEB-train as published: the split chosen by
    train/<subset>/diverse_instruction-*.parquet     `train_splits` (default: original, else train)
    <image root>/...                                 relative to the folder, or absolute

A manifest names each task's files as one path (the generators) or a list of shards (MMEB).

One shape per concept on the way from a file to a loss: a record (the columns above) becomes a
`TrainItem` or an `EvalItem` (`TrainPairDataset`, `EvalDataset`: images opened, nulls made ""), and
a list of items becomes a `TrainBatch` or an `EvalBatch` (`collate_train_pairs`, `collate_eval`).

Bad input raises ValueError / FileNotFoundError naming file and line (parquet: row); with
on_error="skip" bad records are dropped, counted in `.skipped` and reported in a
`SkippedRecordsWarning`.

The generators import this module, never the reverse (tests/test_data_layers.py checks it).

Example:
    info = load_manifest("data/scenes")
    for task in info.tasks:
        ds = info.eval_dataset(task, "hard")    # EvalDataset
    mmeb = open_mmeb_folder("data/mmeb", image_root="../mmeb-images")  # with or without manifest
"""
from __future__ import annotations

import json
import os
import random
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypedDict

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from llave_kit.files import atomic_path, write_text

IMAGE_PLACEHOLDER = "<|image_1|>"

# Column -> kind of value: "text"/"path" are str or null, "texts"/"paths" lists of them.
TRAIN_COLUMNS = {"qry": "text", "qry_image_path": "path",
                 "pos_text": "text", "pos_image_path": "path"}
TRAIN_NEGATIVE_COLUMNS = {"neg_text": "text", "neg_image_path": "path"}
EVAL_COLUMNS = {"qry_text": "text", "qry_img_path": "path",
                "tgt_text": "texts", "tgt_img_path": "paths"}

# MMEB-style instructions, as the built-in generators write them into their texts: lower case and
# without punctuation, so that a word-level pre-tokenizer splits them into plain words.
INSTRUCTIONS = {
    "classify": f"{IMAGE_PLACEHOLDER} represent the given image for classification",
    "image_target": f"{IMAGE_PLACEHOLDER} represent the given image",
    "crop_target": f"{IMAGE_PLACEHOLDER} represent the given cropped image of the object",
    "caption_image": f"{IMAGE_PLACEHOLDER} find a caption describing the given image",
    "find_image": "find an image that matches the given caption {caption}",
}
MANIFEST_VERSION = 1
ON_ERROR_CHOICES = ("raise", "skip")
RECORD_SUFFIXES = (".jsonl", ".parquet")


class SkippedRecordsWarning(UserWarning):
    """Bad records were dropped (on_error="skip"); the message counts them and quotes the first."""


# --------------------------------------------------------------------------------------------------
# Records: parse, validate, read, write


def _iter_raw(path: Path) -> Iterator[tuple[str, str | dict]]:
    """Yield (where, raw) per record: raw is the jsonl line (str) or the parquet row (dict)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise ValueError(f"{path}: cannot read parquet ({e})") from None
        yield from ((f"{path}: row {i}", row) for i, row in enumerate(rows, 1))
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{number}", line
    else:
        raise ValueError(f"{path}: unsupported format {path.suffix!r} (use .jsonl or .parquet)")


def _check_value(where: str, column: str, kind: str, value) -> None:
    if kind in ("text", "path"):
        if value is not None and not isinstance(value, str):
            got = type(value).__name__
            raise ValueError(f"{where}: column {column!r} must be a string, got {got}")
        return
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: column {column!r} must be a non-empty list")
    for item in value:
        _check_value(where, column, kind[:-1], item)


def parse_record(where: str, raw: str | dict, kind: str) -> dict:
    """Parse one jsonl line (or take one parquet row) and check it is a valid `kind` record.

    kind: "train" or "eval". Raises ValueError naming `where` (file:line) and the problem.
    """
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    columns = {"train": TRAIN_COLUMNS, "eval": EVAL_COLUMNS}[kind]
    for column, value_kind in columns.items():
        if column not in raw:
            raise ValueError(f"{where}: missing column {column!r}")
        _check_value(where, column, value_kind, raw[column])
    if kind == "train":
        for column, value_kind in TRAIN_NEGATIVE_COLUMNS.items():
            _check_value(where, column, value_kind, raw.get(column))
    _check_sides(where, raw, kind)
    return raw


def _check_sides(where: str, record: dict, kind: str) -> None:
    """Every query, positive and candidate needs a text or an image."""
    if kind == "train":
        sides = {"query": ("qry", "qry_image_path"), "positive": ("pos_text", "pos_image_path")}
        for side, (text, image) in sides.items():
            if not (record[text] or record[image]):
                raise ValueError(f"{where}: the {side} has neither text nor image")
        return
    if not (record["qry_text"] or record["qry_img_path"]):
        raise ValueError(f"{where}: the query has neither text nor image")
    texts, images = record["tgt_text"], record["tgt_img_path"]
    if len(texts) != len(images):
        raise ValueError(f"{where}: tgt_text has {len(texts)} items but tgt_img_path {len(images)}")
    for i, (text, image) in enumerate(zip(texts, images)):
        if not (text or image):
            raise ValueError(f"{where}: candidate {i} has neither text nor image")


def _image_paths(record: dict, kind: str) -> list[str]:
    if kind == "train":
        paths = [record["qry_image_path"], record["pos_image_path"], record.get("neg_image_path")]
    else:
        paths = [record["qry_img_path"], *record["tgt_img_path"]]
    return [p for p in paths if p]


def check_on_error(on_error: str) -> None:
    """Raise a ValueError naming the choices unless on_error is "raise" or "skip"."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _as_paths(path) -> list[Path]:
    """One file, or a list of shards of one dataset (kept in their order), as [Path]."""
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if not paths:
        raise ValueError("no files given: expected a .jsonl/.parquet file or a list of shards")
    return paths


def _read_file(path: Path, kind: str, image_root, on_error: str, good_images: set[str]):
    """[(where, record)] of a file's good records and the messages of its bad ones (skip mode)."""
    rows, errors = [], []
    for where, raw in _iter_raw(path):
        try:
            record = parse_record(where, raw, kind)
            for rel in _image_paths(record, kind) if image_root is not None else []:
                if rel not in good_images:
                    load_image(Path(image_root) / rel, where)
                    good_images.add(rel)
        except (ValueError, FileNotFoundError) as e:
            if on_error == "raise":
                raise
            errors.append(str(e))
            continue
        rows.append((where, record))
    return rows, errors


def _load_rows(path, kind: str, image_root=None, on_error: str = "raise"):
    """[(where, record)] of the good records of a file or of shards, and per file the error
    messages of its skipped ones.

    With an image_root every referenced image is opened once, so a missing or unreadable image is
    reported here, with its record's line, rather than in the middle of a training run.
    """
    check_on_error(on_error)
    paths = _as_paths(path)
    rows, errors, good_images = [], {}, set()
    for file in paths:
        file_rows, errors[file] = _read_file(file, kind, image_root, on_error, good_images)
        rows += file_rows
    _report(paths, rows, [message for messages in errors.values() for message in messages])
    return rows, errors


def _report(paths: list[Path], rows: list, errors: list[str]) -> None:
    name = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more shards)"
    if errors:
        warnings.warn(f"{name}: skipped {len(errors)} bad record(s); first: {errors[0]}",
                      SkippedRecordsWarning, stacklevel=4)
    if not rows:
        all_bad = f" (all {len(errors)} bad)" if errors else ""
        raise ValueError(f"{name}: no usable records{all_bad}")


def read_records(path, kind: str, on_error: str = "raise") -> list[dict]:
    """Records of a jsonl or parquet file (or of a list of shards) of `kind` "train" or "eval", as
    dicts, unchanged."""
    rows, _ = _load_rows(path, kind, on_error=on_error)
    return [record for _, record in rows]


def write_records(path, records: Iterable[dict], kind: str | None = None) -> Path:
    """Write records to .jsonl or .parquet atomically; with `kind`, validate each record first."""
    path, records = Path(path), list(records)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: unsupported format {path.suffix!r} (use .jsonl or .parquet)")
    for i, record in enumerate(records, 1):
        if kind is not None:
            parse_record(f"{path}: record {i}", record, kind)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records), tmp)
        else:
            lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            tmp.write_text("".join(lines), encoding="utf-8")
    return path


IMAGE_CACHE_ENV = "LLAVE_KIT_IMAGE_CACHE_MB"
DEFAULT_IMAGE_CACHE_MB = 512


class ImageCache:
    """Decoded RGB images kept in memory within a byte budget, least recently used out first.

    Why: datasets open their images on every item access, so a training run decoded the same PNGs
    every step (3.1 s of a 10.2 s tiny-dual run). With the cache each process (each DataLoader
    worker too) decodes a file once.

    - Not stale: every call stats the file, and an entry counts only while the file's absolute path,
      device, inode, size, mtime and ctime (ns) are unchanged; a rewritten or replaced file is
      decoded afresh, a deleted one raises as before. (A rewrite of the same size within one tick
      of the file system's clock, keeping inode and both times, would go unnoticed.)
    - Not shared: callers get a copy (about 3 us for 56x56), so drawing on one cannot change the
      next caller's image.
    - Bounded: an image counts 4 bytes a pixel (PIL's RGB layout); one larger than the whole budget
      is not kept. The budget holds per process (DataLoader workers have one each): it is
      LLAVE_KIT_IMAGE_CACHE_MB (default 512; 0 disables the cache) read at import, or
      `IMAGE_CACHE.set_budget(max_bytes)`; `IMAGE_CACHE.clear()` empties it.
    """

    def __init__(self, max_bytes: int):
        self._entries: OrderedDict[str, tuple[tuple, Image.Image, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_bytes, self.nbytes, self.hits, self.misses = 0, 0, 0, 0
        self.set_budget(max_bytes)

    @classmethod
    def from_environment(cls) -> ImageCache:
        raw = os.environ.get(IMAGE_CACHE_ENV, str(DEFAULT_IMAGE_CACHE_MB))
        try:
            megabytes = float(raw)
        except ValueError:
            megabytes = float("nan")
        if not megabytes >= 0 or megabytes == float("inf"):
            raise ValueError(f"{IMAGE_CACHE_ENV}={raw!r}: expected a size in MiB >= 0 (0 disables "
                             f"the image cache)")
        return cls(int(megabytes * 2**20))

    def __len__(self) -> int:
        return len(self._entries)

    def set_budget(self, max_bytes: int) -> None:
        """Change the budget (0 disables the cache), evicting what no longer fits."""
        with self._lock:
            self.max_bytes = max(int(max_bytes), 0)
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def load(self, path: str | os.PathLike, decode) -> Image.Image:
        """A copy of `decode(path)`, decoded only when the file changed since it was cached."""
        if self.max_bytes <= 0:
            return decode(path)
        name, stat = os.path.abspath(path), os.stat(path)
        signature = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        with self._lock:
            entry = self._entries.get(name)
            hit = entry is not None and entry[0] == signature
            if hit:
                self._entries.move_to_end(name)
                self.hits += 1
        if hit:
            return entry[1].copy()  # the cached image itself is never handed out, so never changed
        image = decode(path)
        size = image.width * image.height * 4
        with self._lock:
            self.misses += 1
            if (old := self._entries.pop(name, None)) is not None:
                self.nbytes -= old[2]
            if size <= self.max_bytes:
                self._entries[name] = (signature, image, size)
                self.nbytes += size
                self._evict()
        return image.copy()

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes:
            _, (_, _, size) = self._entries.popitem(last=False)
            self.nbytes -= size


IMAGE_CACHE = ImageCache.from_environment()


def _decode_rgb(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def load_image(path: str | os.PathLike, where: str = "") -> Image.Image:
    """Open an image as RGB; FileNotFoundError/ValueError name `where` (file:line) and the path.

    Decoded images are cached per process (`ImageCache`); each call returns the caller's own copy.
    """
    prefix = f"{where}: " if where else ""
    try:
        return IMAGE_CACHE.load(path, _decode_rgb)
    except FileNotFoundError:
        raise FileNotFoundError(f"{prefix}image not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable/truncated files
        raise ValueError(f"{prefix}unreadable image {path} ({e})") from None


# --------------------------------------------------------------------------------------------------
# Datasets and collates: what a record becomes on its way to a model
#
# Texts are str ("" where the record has null or ""), images PIL RGB or None ("no image").


class TrainItem(TypedDict):
    """One training pair, as `TrainPairDataset` yields it."""

    query_text: str
    query_image: Image.Image | None
    pos_text: str
    pos_image: Image.Image | None
    # None when the record has no negative (neither neg_text nor neg_image_path); otherwise a str
    # ("" for an image-only negative), and neg_image is None for a text-only one
    neg_text: str | None
    neg_image: Image.Image | None


class TrainBatch(TypedDict):
    """Training pairs field by field (`collate_train_pairs`): queries and positives line up by row.

    neg_texts / neg_images hold only the items that carry a negative, so they may be shorter than
    the batch: extra negatives are shared by every query (target rows B.. of the losses).
    """

    query_texts: list[str]
    query_images: list[Image.Image | None]
    pos_texts: list[str]
    pos_images: list[Image.Image | None]
    neg_texts: list[str]
    neg_images: list[Image.Image | None]


class EvalItem(TypedDict):
    """One candidate list, as `EvalDataset` yields it; candidate 0 is the positive."""

    query_text: str
    query_image: Image.Image | None
    candidate_texts: list[str]
    candidate_images: list[Image.Image | None]


class EvalBatch(TypedDict):
    """Candidate lists field by field (`collate_eval`)."""

    query_texts: list[str]
    query_images: list[Image.Image | None]
    candidate_texts: list[list[str]]
    candidate_images: list[list[Image.Image | None]]


def default_image_root(path: Path) -> Path:
    """The data set folder holding `path` (a manifest.json in its folder or the one above it),
    else the file's own folder."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "manifest.json").is_file():
            return load_manifest(folder).image_root
    return path.parent


class _RecordDataset(Dataset):
    """Shared loading: records validated up front, images opened lazily per item.

    Args:
        path: a .jsonl or .parquet file, or a list of them (shards of one dataset, read in that
            order). image_root: folder the image paths are relative to (default:
            `default_image_root` of the first file).
        on_error: "raise" (default) or "skip" bad records (count in `.skipped`, messages in
            `.skip_reasons`, one warning).
        check_images: open every referenced image once up front, so a missing or unreadable one is
            reported (or skipped) with its line before any training starts.
    """

    kind = ""

    def __init__(self, path, image_root=None, on_error: str = "raise", check_images: bool = True):
        self.paths = _as_paths(path)
        if image_root is None:
            image_root = default_image_root(self.paths[0])
        self.image_root = Path(image_root)
        checked_root = self.image_root if check_images else None
        self.rows, errors = _load_rows(self.paths, self.kind, checked_root, on_error)
        self.skip_reasons = [message for messages in errors.values() for message in messages]
        self.skipped = len(self.skip_reasons)

    @property
    def records(self) -> list[dict]:
        return [record for _, record in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, rel: str | None, where: str) -> Image.Image | None:
        return load_image(self.image_root / rel, where) if rel else None


class TrainPairDataset(_RecordDataset):
    """MMEB training pairs, one `TrainItem` per record."""

    kind = "train"

    def __getitem__(self, i: int) -> TrainItem:
        where, r = self.rows[i]
        has_negative = bool(r.get("neg_text") or r.get("neg_image_path"))
        return TrainItem(
            query_text=r["qry"] or "",
            query_image=self._image(r["qry_image_path"], where),
            pos_text=r["pos_text"] or "",
            pos_image=self._image(r["pos_image_path"], where),
            neg_text=(r.get("neg_text") or "") if has_negative else None,
            neg_image=self._image(r.get("neg_image_path"), where) if has_negative else None,
        )


class EvalDataset(_RecordDataset):
    """MMEB candidate lists, one `EvalItem` per record."""

    kind = "eval"

    def __getitem__(self, i: int) -> EvalItem:
        where, r = self.rows[i]
        return EvalItem(
            query_text=r["qry_text"] or "",
            query_image=self._image(r["qry_img_path"], where),
            candidate_texts=[t or "" for t in r["tgt_text"]],
            candidate_images=[self._image(p, where) for p in r["tgt_img_path"]],
        )


def collate_train_pairs(items: list[TrainItem]) -> TrainBatch:
    """Batch training pairs field by field; only items that carry a negative add to neg_*."""
    negatives = [it for it in items if it["neg_text"] is not None]
    return TrainBatch(
        query_texts=[it["query_text"] for it in items],
        query_images=[it["query_image"] for it in items],
        pos_texts=[it["pos_text"] for it in items],
        pos_images=[it["pos_image"] for it in items],
        neg_texts=[it["neg_text"] for it in negatives],
        neg_images=[it["neg_image"] for it in negatives],
    )


def collate_eval(items: list[EvalItem]) -> EvalBatch:
    """Batch candidate lists field by field."""
    return EvalBatch(
        query_texts=[it["query_text"] for it in items],
        query_images=[it["query_image"] for it in items],
        candidate_texts=[it["candidate_texts"] for it in items],
        candidate_images=[it["candidate_images"] for it in items],
    )


# --------------------------------------------------------------------------------------------------
# Data set folders: manifest and description


@dataclass(frozen=True)
class DatasetInfo:
    """A data set folder described by its manifest.json (see the module docstring for the layout).

    manifest keys: name, version, seed, parameters, image_root, vocabulary, labels, counts, and
    tasks: {task: {meta_task, query_modality, target_modality, train, n_train, eval: {level: file},
    hard_fraction: {level: f}, n_eval, num_candidates[, attributes: {level: file}]}}. A file entry
    is one path or a list of shards; vocabulary and labels are None for a folder described in
    memory (`open_mmeb_folder`). on_error is the default of every dataset it builds.
    """

    root: Path
    manifest: dict
    on_error: str = "raise"

    def __post_init__(self):
        check_on_error(self.on_error)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    @property
    def image_root(self) -> Path:
        return self.root / self.manifest["image_root"]

    def task(self, task: str) -> dict:
        if task not in self.manifest["tasks"]:
            raise ValueError(f"unknown task {task!r}; {self.root} has {self.tasks}")
        return self.manifest["tasks"][task]

    def meta_task(self, task: str) -> str:
        return self.task(task)["meta_task"]

    def tasks_of(self, meta_task: str) -> list[str]:
        return [t for t in self.tasks if self.meta_task(t) == meta_task]

    def levels(self, task: str) -> list[str]:
        return list(self.task(task)["eval"])

    def train_paths(self, task: str) -> list[Path]:
        """The training files of `task`, shards in reading order."""
        files = _file_list(self.task(task)["train"])
        if not files:
            raise ValueError(f"task {task!r} of {self.root} has no training pairs (eval only)")
        return [self.root / file for file in files]

    def eval_paths(self, task: str, level: str) -> list[Path]:
        """The candidate-list files of `task` at `level`, shards in reading order."""
        files = self.task(task)["eval"]
        if level not in files:
            raise ValueError(f"task {task!r} has no level {level!r}; levels: {list(files)}")
        return [self.root / file for file in _file_list(files[level])]

    def train_path(self, task: str) -> Path:
        """The one training file of `task` (`train_paths` for a sharded one)."""
        return _only_file(self.train_paths(task))

    def eval_path(self, task: str, level: str) -> Path:
        """The one candidate-list file of `task` at `level` (`eval_paths` for a sharded one)."""
        return _only_file(self.eval_paths(task, level))

    def train_dataset(self, tasks: Iterable[str] | None = None, **kwargs) -> ConcatDataset:
        """Training pairs of `tasks` (default: all that have some) as one dataset; kwargs go to
        TrainPairDataset."""
        names = [t for t in self.tasks if self.task(t)["train"]] if tasks is None else list(tasks)
        if not names:
            raise ValueError(f"{self.root}: no training pairs (every task is eval only)")
        kwargs = {"on_error": self.on_error, **kwargs}
        parts = [TrainPairDataset(self.train_paths(t), self.image_root, **kwargs) for t in names]
        return ConcatDataset(parts)

    def eval_dataset(self, task: str, level: str, **kwargs) -> EvalDataset:
        kwargs = {"on_error": self.on_error, **kwargs}
        return EvalDataset(self.eval_paths(task, level), self.image_root, **kwargs)

    def record_files(self) -> Iterator[tuple[str, str, list[Path]]]:
        """(task, kind, files) of every training set ("train") and candidate-list set ("eval")."""
        for task in self.tasks:
            if self.task(task)["train"]:
                yield task, "train", self.train_paths(task)
            for level in self.levels(task):
                yield task, "eval", self.eval_paths(task, level)

    def candidate_attributes(self, task: str, level: str) -> list[dict]:
        """Per query {"truth": attrs, "candidates": [attrs, ...], "hard": [bool, ...]} (scenes)."""
        files = self.task(task).get("attributes", {})
        if level not in files:
            raise ValueError(f"{self.root}: task {task!r} has no candidate attributes ({level!r})")
        return _read_jsonl_objects(self.root / files[level])

    def vocabulary(self) -> list[str]:
        """The words of the texts, from vocabulary.txt (or read from the records, without one)."""
        if self.manifest["vocabulary"] is None:
            return sorted({word for _, kind, files in self.record_files()
                           for record in read_records(files, kind, self.on_error)
                           for word in record_words(record)})
        return (self.root / self.manifest["vocabulary"]).read_text(encoding="utf-8").split()

    def labels(self) -> list[dict]:
        """Per-image labels {"image_path", "split", ...} (scenes: task, role, count, shape, ...)."""
        if self.manifest["labels"] is None:
            return []
        return _read_jsonl_objects(self.root / self.manifest["labels"])


def _file_list(entry: str | list[str] | None) -> list[str]:
    """A manifest's file entry as a list: the generators write one name, MMEB folders lists."""
    if not entry:
        return []
    return [entry] if isinstance(entry, str) else list(entry)


def _only_file(paths: list[Path]) -> Path:
    if len(paths) > 1:
        raise ValueError(f"{paths[0]} is one of {len(paths)} shards; use train_paths/eval_paths")
    return paths[0]


def _read_jsonl_objects(path: Path) -> list[dict]:
    rows = []
    for where, line in _iter_raw(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
    return rows


MANIFEST_KEYS = ("name", "version", "seed", "parameters", "image_root", "vocabulary", "labels",
                 "tasks")
TASK_KEYS = ("meta_task", "train", "eval")


def load_manifest(path: str | os.PathLike) -> DatasetInfo:
    """Read a data set folder's manifest.json (path: the folder or the manifest file)."""
    path = Path(path)
    file = path / "manifest.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (not a data set folder?)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}: malformed JSON ({e.msg})") from None
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    missing += [f"tasks.{t}.{k}" for t, spec in manifest.get("tasks", {}).items()
                for k in TASK_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{file}: missing keys {missing}")
    return DatasetInfo(file.parent, manifest)


def write_manifest(root: Path, manifest: dict) -> Path:
    return write_text(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def existing_dataset(out_dir, name: str, parameters: dict, overwrite: bool) -> DatasetInfo | None:
    """The data set already in out_dir when it was made by `name` with the same parameters."""
    if overwrite or not (Path(out_dir) / "manifest.json").is_file():
        return None
    info = load_manifest(out_dir)
    same = (info.name, info.manifest["version"], info.manifest["parameters"]) == (
        name, MANIFEST_VERSION, json.loads(json.dumps(parameters)))
    return info if same else None


def text_words(text: str) -> list[str]:
    """The words of a built-in text: the image placeholder dropped, split on whitespace."""
    return text.replace(IMAGE_PLACEHOLDER, " ").split()


# --------------------------------------------------------------------------------------------------
# Describing a real MMEB folder

MMEB_META_TASKS = {
    **dict.fromkeys(["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365",
                     "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"], "classification"),
    **dict.fromkeys(["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
                     "ScienceQA", "VizWiz", "GQA", "TextVQA"], "vqa"),
    **dict.fromkeys(["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i",
                     "MSCOCO_i2t", "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"],
                    "retrieval"),
    **dict.fromkeys(["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"], "grounding"),
}


# The 20 data sets MMEB-train covers; the other 16 are out of distribution (VLM2Vec, Table 2).
MMEB_IN_DISTRIBUTION = frozenset([
    "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
    "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
    "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
    "WebQA", "MSCOCO"])


def mmeb_in_distribution(name: str) -> bool | None:
    """True for MMEB-train's 20 data sets, False for MMEB's other 16, None for any other name."""
    return name in MMEB_IN_DISTRIBUTION if name in MMEB_META_TASKS else None


# MMEB-train spells one subset differently from its MMEB-eval dataset.
MMEB_TRAIN_NAMES = {"ImageNet_1K": "ImageNet-1K"}
MMEB_EVAL_SPLIT = "test"
# MMEB-train ships each subset's pairs as `original` shards, the same pairs with reworded
# instructions as `diverse_instruction` shards, and a few subsets only as `train` shards. The
# default reads `original` (else `train`): LLaVE trains on the original instructions, and reading
# both would count every pair twice.
DEFAULT_TRAIN_SPLITS = ("original", "train")


def find_mmeb_files(root: str | os.PathLike, train_splits: Sequence[str] | None = None
                    ) -> dict[str, dict[str, list[Path]]]:
    """{"train": {dataset: files}, "eval": {dataset: files}} of an MMEB folder, flat or published.

    A dataset is a flat file (`eval/<dataset>.jsonl|parquet`) or a folder of shards, kept in name
    order: `eval/<dataset>/test*.parquet|jsonl`, `train/<subset>/<split>-*.parquet`. train_splits
    names the training splits to read, all of them for every subset (default: `original`, else
    `train`); a subset folder with none of them is an error naming the splits it has.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    splits = _checked_splits(train_splits)
    found: dict[str, dict[str, list[Path]]] = {"train": {}, "eval": {}}
    for kind, datasets in found.items():
        folder = root / kind
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            if entry.name.startswith("."):
                continue
            name = entry.name if entry.is_dir() else entry.stem
            if kind == "train":
                name = MMEB_TRAIN_NAMES.get(name, name)
            files = (_dataset_shards(entry, kind, splits) if entry.is_dir()
                     else [entry] if entry.suffix in RECORD_SUFFIXES else [])
            if files and name in datasets:
                raise ValueError(f"{folder}: dataset {name!r} is there twice "
                                 f"({datasets[name][0].relative_to(folder)} and {entry.name})")
            if files:
                datasets[name] = files
    if not (found["train"] or found["eval"]):
        raise FileNotFoundError(
            f"{root}: no MMEB data: no eval/<dataset>.jsonl|parquet, eval/<dataset>/test*.parquet, "
            "train/<subset>.jsonl|parquet or train/<subset>/<split>-*.parquet")
    return found


def _checked_splits(train_splits) -> tuple[str, ...] | None:
    if train_splits is None:
        return None
    if (isinstance(train_splits, str) or not train_splits
            or not all(isinstance(split, str) and split for split in train_splits)):
        raise ValueError(f"train_splits must be a non-empty list of split names (e.g. "
                         f"['original', 'diverse_instruction']), got {train_splits!r}")
    return tuple(dict.fromkeys(train_splits))


def _dataset_shards(folder: Path, kind: str, splits: tuple[str, ...] | None) -> list[Path]:
    """A dataset folder's files of the wanted split(s), each split's shards in name order."""
    files = [f for f in sorted(folder.iterdir())
             if f.is_file() and f.suffix in RECORD_SUFFIXES and not f.name.startswith(".")]

    def split(name: str) -> list[Path]:  # `test.parquet`, `test-00000-of-00002.parquet`, ...
        return [f for f in files if f.stem == name or f.name.startswith(f"{name}-")]

    if kind == "eval":
        chosen, wanted = split(MMEB_EVAL_SPLIT), f"{MMEB_EVAL_SPLIT}*.parquet|jsonl"
    elif splits is None:
        chosen = next((shards for name in DEFAULT_TRAIN_SPLITS if (shards := split(name))), [])
        wanted = "original or train shards (choose others with train_splits)"
    else:
        chosen, wanted = [f for name in splits for f in split(name)], f"shards of {list(splits)}"
    if files and not chosen:
        present = sorted({f.stem.split("-")[0] for f in files})
        raise ValueError(f"{folder}: no {wanted}; its files are of split(s) {present}")
    return chosen


def _mmeb_manifest(root: Path, found: dict, image_root, train_splits, level: str,
                   meta_tasks: dict[str, str] | None = None) -> dict:
    """The manifest of the files `find_mmeb_files` found, without counts, vocabulary or labels."""
    lookup = {**MMEB_META_TASKS, **(meta_tasks or {})}
    tasks = {}
    for name in sorted(set(found["train"]) | set(found["eval"])):
        train, evaluation = (
            [f.relative_to(root).as_posix() for f in found[kind].get(name, [])]
            for kind in ("train", "eval"))
        tasks[name] = {"meta_task": lookup.get(name, "other"),
                       "in_distribution": mmeb_in_distribution(name),
                       "train": train or None, "eval": {level: evaluation} if evaluation else {}}
    splits = _checked_splits(train_splits)
    return {"name": root.resolve().name, "version": MANIFEST_VERSION, "seed": None,
            "parameters": {"train_splits": list(splits) if splits else None},
            "image_root": Path(image_root).as_posix(), "vocabulary": None, "labels": None,
            "tasks": tasks}


def open_mmeb_folder(root: str | os.PathLike, image_root: str | os.PathLike | None = None,
                     train_splits: Sequence[str] | None = None, on_error: str = "raise"
                     ) -> DatasetInfo:
    """An MMEB folder as a DatasetInfo, reading only file names (records are read when used).

    With a manifest.json (describe-mmeb's or a generator's) that manifest; without one, the files
    `find_mmeb_files` finds, described in memory (nothing is written: meta-tasks from MMEB's names,
    the vocabulary read from the texts when asked for). image_root (relative to `root`, or
    absolute) replaces the manifest's; train_splits must be those the manifest was written for.
    on_error ("raise" or "skip") is the default of every dataset the DatasetInfo builds.
    """
    root = Path(root)
    if (root / "manifest.json").is_file():
        manifest = load_manifest(root).manifest
        recorded = manifest["parameters"].get("train_splits")
        if train_splits is not None and list(_checked_splits(train_splits)) != recorded:
            raise ValueError(f"{root / 'manifest.json'} was written for train splits {recorded}, "
                             f"not {list(train_splits)}: describe the folder again with them")
        if image_root is not None:
            manifest = {**manifest, "image_root": Path(image_root).as_posix()}
    else:
        found = find_mmeb_files(root, train_splits)
        manifest = _mmeb_manifest(root, found, image_root or ".", train_splits, MMEB_EVAL_SPLIT)
    info = DatasetInfo(root, manifest, on_error)
    if not info.image_root.is_dir():
        raise FileNotFoundError(f"{info.image_root}: the image root is not a folder")
    return info


def write_mmeb_manifest(root: str | os.PathLike, image_root: str = ".", level: str = "test",
                        meta_tasks: dict[str, str] | None = None,
                        train_splits: Sequence[str] | None = None,
                        check_images: str | int = "all", on_error: str = "raise") -> DatasetInfo:
    """Describe a folder of MMEB files (layouts: `find_mmeb_files`) in manifest.json, so studies
    can use it; write vocabulary.txt and an empty labels.jsonl beside it.

    Every record is read and checked (on_error: "raise" at the first bad one, or "skip" and count
    them per file). Per dataset the manifest records its files, meta-task (`meta_tasks`, else
    MMEB's 36 names, else "other"), in_distribution (one of MMEB-train's 20), n_train, n_eval,
    skipped {file: count} and images {referenced, checked, missing, missing_examples}: whether the
    referenced images exist under `image_root` (relative to `root`, or absolute), checked for
    "all" or for a random sample of `check_images` per dataset (seed 0). Nothing is written
    unless every file was read.
    """
    root, sample = Path(root), _checked_sample_size(check_images)
    check_on_error(on_error)
    manifest = _mmeb_manifest(root, find_mmeb_files(root, train_splits), image_root, train_splits,
                              level, meta_tasks)
    info = DatasetInfo(root, manifest, on_error)
    if not info.image_root.is_dir():
        raise FileNotFoundError(f"{info.image_root}: the image root is not a folder")
    words, referenced = _survey_records(info)
    for task, spec in manifest["tasks"].items():
        spec["images"] = _check_image_files(info.image_root, referenced[task], sample)
    specs = manifest["tasks"].values()
    manifest["counts"] = {
        "datasets": len(specs), "train": sum(s["n_train"] for s in specs),
        "eval": sum(s["n_eval"] for s in specs),
        "skipped": sum(n for s in specs for n in s["skipped"].values()),
        "images_checked": sum(s["images"]["checked"] for s in specs),
        "images_missing": sum(s["images"]["missing"] for s in specs)}
    manifest["checks"] = {"images": check_images, "on_error": on_error}
    manifest.update(vocabulary="vocabulary.txt", labels="labels.jsonl")
    write_text(root / "vocabulary.txt", "\n".join(sorted(words)) + "\n")
    write_text(root / "labels.jsonl", "")
    write_manifest(root, manifest)  # last: a manifest never names files not yet written
    return replace(load_manifest(root), on_error=on_error)


def _survey_records(info: DatasetInfo) -> tuple[set[str], dict[str, set[str]]]:
    """Read every record of `info` (by its on_error), adding n_train, n_eval and skipped
    {file: count} to each task of its manifest; the words of the texts and each task's images."""
    words: set[str] = set()
    referenced: dict[str, set[str]] = {task: set() for task in info.tasks}
    for task in info.tasks:
        info.task(task).update(n_train=0, n_eval=0, skipped={})
    for task, kind, files in info.record_files():
        spec = info.task(task)
        rows, errors = _load_rows(files, kind, on_error=info.on_error)
        spec["skipped"].update({file.relative_to(info.root).as_posix(): len(messages)
                                for file, messages in errors.items()})
        spec[f"n_{kind}"] += len(rows)
        for _, record in rows:
            words.update(record_words(record))
            referenced[task].update(_image_paths(record, kind))
    return words, referenced


def _checked_sample_size(check_images: str | int) -> int | None:
    """None for "all", else the number of images to check per dataset."""
    if check_images == "all":
        return None
    if isinstance(check_images, bool) or not isinstance(check_images, int) or check_images < 0:
        raise ValueError(f"check_images must be 'all' or a number of images >= 0 per dataset, "
                         f"got {check_images!r}")
    return check_images


def _check_image_files(image_root: Path, referenced: set[str], sample: int | None) -> dict:
    """Which of the referenced images (all, or a seeded random sample) are missing."""
    names = sorted(referenced)
    if sample is not None and sample < len(names):
        names = sorted(random.Random(0).sample(names, sample))
    missing = [name for name in names if not (image_root / name).is_file()]
    return {"referenced": len(referenced), "checked": len(names), "missing": len(missing),
            "missing_examples": missing[:3]}


def record_words(record: dict) -> list[str]:
    """The lower-cased words of every text of a train or eval record."""
    texts = [record.get(k) for k in ("qry", "pos_text", "neg_text", "qry_text")]
    texts += list(record.get("tgt_text") or [])
    return [w.lower() for text in texts if text for w in text_words(text)]
