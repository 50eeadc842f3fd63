"""Progress bars that suit where they are shown.

In a notebook a bar is a widget, in a terminal it redraws one line in place. Anywhere else (a
`make reproduce > log`, a batch job's output file) each redraw would be a new line in the log, so
there the bar prints one plain line at most every `LOG_INTERVAL_S` seconds, and a last one at
the end.
"""
from __future__ import annotations

import sys

from tqdm import tqdm as terminal_tqdm
from tqdm.auto import tqdm as auto_tqdm

LOG_INTERVAL_S = 60.0


class _LogLines:
    """A stream for tqdm that turns each in-place redraw ("\\r…") into one line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress_bar(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)`: a widget in a notebook, a bar in a terminal, sparse log lines
    otherwise."""
    if _in_notebook():
        return auto_tqdm(iterable, **kwargs)
    if sys.stderr.isatty():
        return terminal_tqdm(iterable, **kwargs)
    return terminal_tqdm(iterable, file=_LogLines(sys.stderr), mininterval=LOG_INTERVAL_S,
                         maxinterval=LOG_INTERVAL_S, ascii=True, **kwargs)
