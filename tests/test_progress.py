"""llave_kit.progress: a bar redraws in a terminal, but writes only a few plain lines to a log."""
import io
import sys

from llave_kit.progress import progress_bar


def test_outside_a_terminal_the_bar_writes_few_whole_lines(monkeypatch):
    log = io.StringIO()  # not a terminal, like `make reproduce > log`
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress_bar(range(20_000), desc="train"):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("train: 100%"), lines


def test_disabled_bar_writes_nothing(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress_bar(range(100), disable=True):
        pass
    assert log.getvalue() == ""
