"""Atomic writes: a reader sees a file or folder whole, never half-written.

Everything the kit writes to disk (data sets, checkpoints, embeddings, figures, reports) goes
through one of these, so an interrupted run leaves either the old content or the new one:

    with atomic_path("out/table.parquet") as tmp:    # any writer that takes a path
        frame.to_parquet(tmp)
    write_text("out/summary.md", text)               # the common case
    with staged_directory("out/model", overwrite=True) as stage:   # a whole folder
        (stage / "config.json").write_text("{}")

Temporary names are hidden siblings of the target (`.<name>.tmp-<hex>`, `.<name>.staging-<hex>`,
`.<name>.old-<hex>`), on the same file system, so the final os.replace is a rename.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _sibling(path: Path, role: str) -> Path:
    return path.with_name(f".{path.name}.{role}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def staged_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes `out_dir` in one rename.

    A writer that fails half-way leaves nothing behind, and readers never see a half-written
    folder. An existing non-empty `out_dir` is replaced only with overwrite=True.
    """
    out_dir = Path(out_dir)
    _check_output_dir(out_dir, overwrite)
    stage = _sibling(out_dir, "staging")
    stage.mkdir(parents=True)
    try:
        yield stage
        old = _sibling(out_dir, "old")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(stage, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir}: exists and is not empty (other files, or a data set made "
                         f"with other parameters); pass overwrite=True or choose another folder")
