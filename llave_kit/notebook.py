"""What a study notebook calls first: work from the project root and check its inputs.

    from llave_kit.notebook import start
    start(checkpoints=[base_checkpoint], data=data)     # first cell after the parameters

JupyterLab starts a kernel in the notebook's own folder, papermill in the pipeline's root; the
notebooks' default paths (`checkpoints/…`, `runs/…`, `figures/…`) are written relative to the
project root, so `start` moves there first and the same defaults work from both. It then checks
that every named checkpoint and data folder exists, before anything is generated or trained: a
missing one stops the notebook with one sentence saying what to run, not a library traceback.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from llave_kit.encoders import CPU_MODELS, missing_checkpoint
from llave_kit.studies import BUILT_IN_DATA

PROJECT_MARKERS = ("pyproject.toml", ".git")
HOW_TO_MAKE_INPUTS = "run `make reproduce` or notebook 01 first"


class MissingInputError(FileNotFoundError):
    """A notebook's input does not exist. IPython shows only its message, not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


def project_root(folder: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above `folder` (default: the working folder) that holds a
    pyproject.toml or .git; `folder` itself when none does (e.g. a pipeline's temporary root)."""
    here = Path(folder or os.getcwd()).resolve()
    for candidate in (here, *here.parents):
        if any((candidate / marker).exists() for marker in PROJECT_MARKERS):
            return candidate
    return here


def start(checkpoints: Iterable[str] = (), data: str | None = None) -> None:
    """Work from the project root, show whole table cells, and check the notebook's inputs.

    checkpoints: model names, folders or hub ids the notebook loads; data: "scenes", "digits"
    or an MMEB folder. Raises MissingInputError naming the first missing input. Returns nothing,
    so the cell that calls it last shows no path.
    """
    root = project_root()
    os.chdir(root)
    pd.set_option("display.max_colwidth", None)  # readings and verdicts are sentences
    for checkpoint in checkpoints:
        if checkpoint not in CPU_MODELS and (problem := missing_checkpoint(checkpoint)):
            raise MissingInputError(f"{problem} (from {root}): {HOW_TO_MAKE_INPUTS}.")
    if data is not None and data not in BUILT_IN_DATA and not Path(data).expanduser().is_dir():
        raise MissingInputError(f"data folder {data} does not exist (from {root}): give an MMEB "
                                f"folder or one of {list(BUILT_IN_DATA)}.")
