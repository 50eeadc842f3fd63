"""llave_kit.notebook: notebooks work from the project root and stop on missing inputs in one line."""
import os

import pandas as pd
import pytest

from llave_kit.notebook import MissingInputError, project_root, start


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "checkpoints" / "start").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "notebooks")  # where JupyterLab starts a notebook's kernel
    with pd.option_context("display.max_colwidth", 50):  # pandas' default, restored after
        yield tmp_path


def test_project_root_is_the_nearest_folder_with_a_marker(project, tmp_path_factory):
    assert project_root() == project.resolve()
    assert project_root(project / "notebooks") == project.resolve()
    bare = tmp_path_factory.mktemp("bare")  # no marker anywhere above: the folder itself
    assert project_root(bare) == bare.resolve()


def test_start_moves_to_the_root_and_accepts_existing_inputs(project):
    start(checkpoints=["checkpoints/start", "tiny-dual", "Qwen/Qwen2-VL-2B-Instruct"], data="scenes")
    assert os.getcwd() == str(project.resolve())
    assert pd.options.display.max_colwidth is None  # verdict sentences are shown whole


@pytest.mark.parametrize("inputs, message", [
    ({"checkpoints": ["runs/cpu_demo/train_lmm/final"]},
     "no checkpoint folder at runs/cpu_demo/train_lmm/final .*run `make reproduce` or notebook 01 first"),
    ({"checkpoints": ["checkpoints/start"], "data": "data/mmeb"},
     "data folder data/mmeb does not exist"),
])
def test_a_missing_input_stops_with_one_line(project, inputs, message):
    with pytest.raises(MissingInputError, match=message) as raised:
        start(**inputs)
    rendered = raised.value._render_traceback_()  # what IPython prints instead of a traceback
    assert len(rendered) == 1 and rendered[0].startswith("MissingInputError: ")
