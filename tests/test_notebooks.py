"""Every study notebook runs under papermill with tiny parameters, through the real pipeline.

Also: each .ipynb is stored without outputs and in sync with its jupytext .py twin, and every
parameters cell is one papermill can read (it silently drops lines it cannot parse).
"""
import ast
import json
import os
import shutil
from pathlib import Path

import jupytext
import nbformat
import papermill
import pytest

from llave_kit.cli import main
from llave_kit.data import load_manifest, read_records, write_records
from llave_kit.pipeline import check_parameters, load_pipeline, read_metrics, run_pipeline

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TINY = {"n_train": 6, "n_eval": 4}
TINY_TRAIN = {"steps": 2, "batch_size": 8, **TINY}
FINETUNE = {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "temperature": 0.05, "device": "cpu"}


def tiny_pipeline() -> dict:
    return {"name": "tiny", "defaults": {
        "data_dir": "{runs_dir}/data/scenes", "digits_dir": "{runs_dir}/data/digits", **TINY,
        "base_checkpoint": "tiny-dual", "finetune": FINETUNE, "seeds": [0, 1],
        "train_dir": "{runs_dir}/finetunes", "cache_dir": "{runs_dir}/cache", "n_resamples": 50,
    }, "runs": [
        {"name": "basics", "notebook": "notebooks/00_contrastive_basics.ipynb",
         "parameters": {"interactive": False, "batch_size": 8}},
        {"name": "train", "notebook": "notebooks/01_train.ipynb",
         "parameters": {**TINY_TRAIN, "model": "tiny-dual", "record_p_at_1_as": "lmm_p_at_1"}},
        {"name": "overlap", "notebook": "notebooks/02_similarity_overlap.ipynb"},
        {"name": "retrieval", "notebook": "notebooks/03_retrieval_study.ipynb",
         "depends_on": ["overlap"], "parameters": {"failures_shown": 2}},
        {"name": "clustering", "notebook": "notebooks/04_clustering_study.ipynb",
         "depends_on": ["overlap"], "parameters": {"digits_steps": 2, "projection": "pca"}},
        {"name": "alpha_sweep", "notebook": "notebooks/05_alpha_sweep.ipynb",
         "depends_on": ["overlap"],
         "parameters": {"alphas": [0.0, 9.0], "ladder_batch_size": 4, "pool_factor": 2}},
    ]}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    spec = root / "tiny.yaml"
    spec.write_text(json.dumps(tiny_pipeline()))
    pipeline = load_pipeline(spec, root=root)
    outcomes = run_pipeline(pipeline, log=lambda message: None)
    return pipeline, outcomes


def test_every_notebook_runs_in_the_pipeline(executed):
    pipeline, outcomes = executed
    failed = {o.run.name: o.error for o in outcomes if o.status != "ran"}
    assert not failed, failed
    assert {o.run.notebook.name for o in outcomes} == {path.name for path in NOTEBOOKS}
    assert not (pipeline.figures_dir / ".staging").exists()  # no leftover beside the figures


def test_summary_reports_the_metrics_the_notebooks_recorded(executed):
    from llave_kit.report import interval_text

    pipeline, _ = executed
    summary = (pipeline.figures_dir / "summary.md").read_text()
    page = (pipeline.figures_dir / "summary.html").read_text()
    record = json.loads((pipeline.figures_dir / "summary.json").read_text())
    overlap = read_metrics(pipeline.runs_dir / "overlap.ipynb")
    assert record["runs"]["overlap"]["metrics"] == overlap
    gap = overlap["table1"]["gap"]["weighted"]
    section = summary.split(". overlap\n")[1].split("\n## ")[0]
    weighted = next(line for line in section.splitlines() if line.startswith("| weighted |"))
    assert "Table 1 · gap" in section and interval_text(gap["mean"], gap["ci_low"], gap["ci_high"]) in weighted
    assert "**overlap**: " in summary.split("## Runs")[0]  # its readings open the summary
    assert set(overlap["p_at_1_hard"]) == {"before", "info_nce", "weighted"}
    for interval in overlap["p_at_1_hard"].values():  # percentile bounds are ordered; the mean
        assert interval["ci_low"] <= interval["ci_high"]  # may fall outside them (skewed cases)
    readings = {effect["reading"]: effect for effect in overlap["effects"]}
    assert any("P@1" in reading for reading in readings)
    assert all(e["verdict"] in ("reproduced", "contradicted", "inconclusive")
               for e in readings.values())
    sweep = read_metrics(pipeline.runs_dir / "alpha_sweep.ipynb")
    assert {"weighted a=0", "weighted a=9", f"InfoNCE tau'={1 / (1 / 0.05 + 9):.4f}"} <= set(sweep["sweep"]["p@1"])
    assert set(sweep["ladder"]["p@1"]) == {"1 InfoNCE", "2 + gather (x2 negatives)", "3 + focal",
                                           "4 + hardness weighting"}
    train = read_metrics(pipeline.runs_dir / "train.ipynb")
    assert train["steps"] == 2 and set(train["lmm_p_at_1"]) == {"hard", "random"}
    for figure in ("overlap/similarity_overlap.png", "overlap/readings.png",
                   "retrieval/p_at_1.png", "alpha_sweep/alpha_sweep.png",
                   "clustering/projections.png", "basics/gradient_share.png",
                   "train/training_curves.png"):
        assert (pipeline.figures_dir / figure).stat().st_size > 0, figure
        assert f"]({figure})" in summary and f'<img src="{figure}"' in page


def test_studies_share_fine_tunes_by_recipe(executed):
    """Retrieval, clustering and the sweep's alpha = 0 / 9 runs reuse the overlap study's fine-tunes:
    2 arms x 2 seeds, plus the sweep's matched control (2 seeds) and the ladder's rungs 1 and 3
    (2 seeds each); nothing else was trained into train_dir."""
    pipeline, _ = executed
    recipes = list((pipeline.runs_dir / "finetunes").glob("*/recipe.json"))
    assert len(recipes) == 2 * 2 + 2 + 2 * 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean_and_paired_with_its_py_twin(path):
    stored = nbformat.read(str(path), as_version=4)
    assert all(not cell.get("outputs") and not cell.get("execution_count")
               for cell in stored.cells if cell.cell_type == "code")
    twin = jupytext.read(str(path.with_suffix(".py")))
    assert [c.source for c in stored.cells] == [c.source for c in twin.cells], \
        f"{path.name} and its .py twin differ: run `jupytext --sync {path.with_suffix('.py')}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_assignment_of_the_parameters_cell(path):
    notebook = nbformat.read(str(path), as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    assigned = [node.targets[0].id for node in ast.parse(cells[0].source).body]
    assert list(papermill.inspect_notebook(str(path))) == assigned


def publish_like_mmeb(scenes: Path, folder: Path) -> Path:
    """The scenes data laid out as MMEB is published, with no manifest: train/<task>/original-*
    and eval/<task>/test-* parquet shards (the hard lists); returns the images' own root."""
    info = load_manifest(scenes)
    for task in info.tasks:
        write_records(folder / "train" / task / "original-00000-of-00001.parquet",
                      read_records(info.train_path(task), "train"))
        lists = read_records(info.eval_path(task, "hard"), "eval")
        for shard, part in enumerate((lists[:len(lists) // 2], lists[len(lists) // 2:])):
            write_records(folder / "eval" / task / f"test-{shard:05d}-of-00002.parquet", part)
    return info.image_root


def test_gpu_pipeline_file_runs_on_a_folder_laid_out_as_mmeb_is_published(executed, capsys):
    """pipelines/mmeb_gpu.yaml as shipped, on the tiny scenes data laid out as MMEB is published
    (described in place by describe-mmeb, nothing moved), with the hub checkpoint swapped for a tiny
    stand-in through --set style overrides: every parameter it names is declared and used."""
    studies_pipeline, _ = executed
    root = studies_pipeline.root
    scenes = studies_pipeline.runs_dir / "data" / "scenes"
    mmeb = root / "mmeb"
    image_root = publish_like_mmeb(scenes, mmeb)
    assert main(["describe-mmeb", str(mmeb), "--image-root", os.path.relpath(image_root, mmeb)]) == 0
    assert "cls_object" in capsys.readouterr().out
    overrides = {
        "base_checkpoint": "tiny-dual", "data": str(mmeb), "data_dir": str(scenes), **TINY,
        "finetune": {**FINETUNE, "gradcache_chunk_size": 4}, "seeds": [0],
        "failure_task": "cls_object", "digits_steps": 2, "projection": "pca",
        "alphas": [0.0, 9.0], "ladder": False, "n_resamples": 50,
    }
    pipeline = load_pipeline(REPO / "pipelines" / "mmeb_gpu.yaml", root=root, overrides=overrides)
    outcomes = run_pipeline(pipeline, log=lambda message: None)
    assert {o.run.name: o.error for o in outcomes if o.status != "ran"} == {}
    overlap = read_metrics(pipeline.runs_dir / "overlap.ipynb")
    assert set(overlap["p_at_1_test"]) == {"before", "info_nce", "weighted"}  # MMEB's level name


def test_shipped_pipelines_only_name_declared_parameters():
    for name in ("cpu_demo", "mmeb_gpu"):
        check_parameters(load_pipeline(REPO / "pipelines" / f"{name}.yaml", root=REPO))


def test_every_figure_is_shown_inline_in_the_executed_notebooks(executed):
    """Each cell that saves a figure also shows it as a PNG (not '<Figure size …>' text)."""
    pipeline, outcomes = executed
    for outcome in outcomes:
        notebook = nbformat.read(str(pipeline.runs_dir / f"{outcome.run.name}.ipynb"), as_version=4)
        for cell in notebook.cells:
            if cell.cell_type != "code" or "save_figure(" not in cell.source:
                continue
            shown = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert len(shown) == cell.source.count("save_figure("), (outcome.run.name, cell.source)
            texts = [o.get("data", {}).get("text/plain", "") for o in cell.outputs]
            assert not any(text.startswith("<Figure size") for text in texts)


@pytest.fixture
def project_copy(tmp_path):
    """A project root (marked by pyproject.toml) holding the notebooks, as a clone would."""
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks")
    shutil.copytree(REPO / "checkpoints" / "tiny-dual-scenes", tmp_path / "checkpoints" / "tiny-dual-scenes")
    return tmp_path


def test_default_paths_resolve_against_the_project_root_from_the_notebooks_folder(project_copy):
    """JupyterLab starts the kernel in notebooks/: figures still land in the root's figures/."""
    papermill.execute_notebook(
        str(project_copy / "notebooks" / "00_contrastive_basics.ipynb"), str(project_copy / "out.ipynb"),
        parameters={"interactive": False, "batch_size": 8}, cwd=str(project_copy / "notebooks"),
        progress_bar=False, kernel_name="python3")
    assert (project_copy / "figures" / "notebooks" / "basics" / "gradient_share.png").stat().st_size > 0
    assert not (project_copy / "notebooks" / "figures").exists()


def test_missing_inputs_stop_the_first_cell_with_one_sentence_before_anything_is_made(project_copy):
    with pytest.raises(papermill.PapermillExecutionError) as raised:
        papermill.execute_notebook(
            str(project_copy / "notebooks" / "02_similarity_overlap.ipynb"), str(project_copy / "out.ipynb"),
            parameters={"base_checkpoint": "runs/cpu_demo/train_lmm/final"},
            cwd=str(project_copy / "notebooks"), progress_bar=False, kernel_name="python3")
    assert raised.value.ename == "MissingInputError"
    assert "run `make reproduce` or notebook 01 first" in raised.value.evalue
    assert len(raised.value.traceback) == 1  # one sentence, not a library traceback
    assert not (project_copy / "runs").exists()  # no data generated, nothing trained
