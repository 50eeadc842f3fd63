"""The README's Python examples run as written (blocks marked ```python skip need a GPU or a hub)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert BLOCKS, "README.md should show runnable Python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples run from the repository root: give them its checkpoints
    (tmp_path / "checkpoints").symlink_to(README.parent / "checkpoints")
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
