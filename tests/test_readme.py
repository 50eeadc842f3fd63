"""The README's Python examples run as written and print what the README shows below them.

A ```python block followed by a ```text block must print that text: words exactly, numbers within
a small tolerance (the last printed digit). Blocks marked ```python skip need a GPU or a hub.
"""
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```\n(?:\n```text\n(.*?)```)?", README.read_text(), flags=re.S)
NUMBER = re.compile(r"[+-]?\d+\.\d+")


def test_readme_has_python_examples_with_their_output():
    assert EXAMPLES and all(shown for _, shown in EXAMPLES), "each example shows what it prints"


def assert_prints_as_shown(printed: str, shown: str) -> None:
    printed_lines, shown_lines = printed.strip().splitlines(), shown.strip().splitlines()
    assert len(printed_lines) == len(shown_lines), printed
    for got, expected in zip(printed_lines, shown_lines):
        assert NUMBER.sub("#", got).split() == NUMBER.sub("#", expected).split(), (got, expected)
        for value, reference in zip(NUMBER.findall(got), NUMBER.findall(expected)):
            last_digit = 10.0 ** -len(reference.split(".")[1])
            assert float(value) == pytest.approx(float(reference), abs=1.01 * last_digit), (got, expected)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_prints_what_the_readme_shows(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples run from the repository root: give them its checkpoints
    (tmp_path / "checkpoints").symlink_to(README.parent / "checkpoints")
    code, shown = EXAMPLES[index]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README.md[python block {index}]", "exec"), {})
    assert_prints_as_shown(printed.getvalue(), shown)
