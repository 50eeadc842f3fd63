"""Every study notebook runs under papermill with tiny parameters, through the real pipeline.

Also: each .ipynb is stored without outputs and in sync with its jupytext .py twin, and every
parameters cell is one papermill can read (it silently drops lines it cannot parse).
"""
import ast
import json
import shutil
from pathlib import Path

import jupytext
import nbformat
import papermill
import pytest

from llave_kit.pipeline import check_parameters, load_pipeline, read_metrics, run_pipeline

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TINY = {"n_train": 6, "n_eval": 4}
TINY_TRAIN = {"steps": 2, "batch_size": 8, **TINY}
MODELS = {"before": "{runs_dir}/pretrain/final", "after InfoNCE": "{runs_dir}/finetune_info_nce/final",
          "after weighting": "{runs_dir}/finetune_weighted/final"}


def tiny_pipeline() -> dict:
    data = {"data_dir": "{runs_dir}/data/scenes"}
    finetune = {**data, **TINY_TRAIN, "model": "{runs_dir}/pretrain/final"}
    return {"name": "tiny", "runs": [
        {"name": "basics", "notebook": "notebooks/00_contrastive_basics.ipynb",
         "parameters": {"interactive": False, "batch_size": 8}},
        {"name": "pretrain", "notebook": "notebooks/01_train.ipynb",
         "parameters": {**data, **TINY_TRAIN}},
        {"name": "finetune_info_nce", "notebook": "notebooks/01_train.ipynb",
         "depends_on": ["pretrain"], "parameters": finetune},
        {"name": "finetune_weighted", "notebook": "notebooks/01_train.ipynb",
         "depends_on": ["pretrain"],
         "parameters": {**finetune, "loss": "hardness_weighted", "alpha": 9.0}},
        {"name": "overlap", "notebook": "notebooks/02_similarity_overlap.ipynb",
         "depends_on": ["finetune_info_nce", "finetune_weighted"],
         "parameters": {**data, **TINY, "before_checkpoint": MODELS["before"],
                        "info_nce_checkpoint": MODELS["after InfoNCE"],
                        "weighted_checkpoint": MODELS["after weighting"],
                        "cache_dir": "{runs_dir}/cache"}},
        {"name": "retrieval", "notebook": "notebooks/03_retrieval_study.ipynb",
         "depends_on": ["finetune_info_nce", "finetune_weighted"],
         "parameters": {**data, **TINY, "models": MODELS, "cache_dir": "{runs_dir}/cache",
                        "failures_shown": 2}},
        {"name": "clustering", "notebook": "notebooks/04_clustering_study.ipynb",
         "depends_on": ["finetune_weighted"],
         "parameters": {**data, **TINY, "digits_dir": "{runs_dir}/data/digits",
                        "base_checkpoint": MODELS["before"], "digits_steps": 2, "batch_size": 8,
                        "projection": "pca",
                        "scenes_models": {"after weighting": MODELS["after weighting"]}}},
        {"name": "alpha_sweep", "notebook": "notebooks/05_alpha_sweep.ipynb",
         "depends_on": ["pretrain"],
         "parameters": {**data, **TINY, "base_checkpoint": MODELS["before"], "alphas": [0.0, 9.0],
                        "seeds": [0], "steps": 2, "batch_size": 4, "ladder_batch_size": 4, "pool_factor": 2}},
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


def test_summary_reports_the_metrics_the_notebooks_recorded(executed):
    pipeline, _ = executed
    summary = (pipeline.figures_dir / "summary.md").read_text()
    overlap = read_metrics(pipeline.runs_dir / "overlap.ipynb")
    gap = overlap["table1"]["after weighting"]["gap"]
    assert f"| table1.after weighting.gap | {gap:.4g} |" in summary
    sweep = read_metrics(pipeline.runs_dir / "alpha_sweep.ipynb")
    assert {"hardness weighting/alpha=0", "hardness weighting/alpha=9",
            "temperature-matched InfoNCE/alpha=9", "ladder"} <= set(sweep)
    pretrain = read_metrics(pipeline.runs_dir / "pretrain.ipynb")
    assert pretrain["steps"] == 2 and 0.0 <= pretrain["p@1"]["hard"] <= 1.0
    for figure in ("overlap/similarity_overlap.png", "retrieval/p_at_1_hard.png",
                   "alpha_sweep/alpha_sweep.png", "clustering/projections.png",
                   "basics/gradient_share.png", "pretrain/training_curves.png"):
        assert (pipeline.figures_dir / figure).stat().st_size > 0, figure
        assert f"]({figure})" in summary


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


def test_gpu_pipeline_file_runs_on_tiny_stand_ins(executed):
    """pipelines/mmeb_gpu.yaml as shipped, with the hub checkpoint and MMEB folder swapped for tiny
    stand-ins through --set style overrides: every parameter it names is declared and used."""
    studies_pipeline, _ = executed
    root = studies_pipeline.root
    scenes = str(studies_pipeline.runs_dir / "data" / "scenes")
    finetuned = {"after InfoNCE": "{runs_dir}/finetune_info_nce/final",
                 "after weighting": "{runs_dir}/finetune_weighted/final"}
    overrides = {
        "model": "tiny-dual", "data": scenes, "data_dir": scenes, **TINY, "device": "cpu",
        "precision": "fp32", "steps": 2, "batch_size": 4, "gradcache_chunk_size": 2, "lr": 1e-3,
        "level": "hard", "levels": ["hard"], "eval_levels": ["hard"], "failure_task": "cls_object",
        "failure_level": "hard",
        "before_checkpoint": "tiny-dual", "base_checkpoint": "tiny-dual",
        "models": {"before": "tiny-dual", **finetuned}, "scenes_models": finetuned,
        "digits_steps": 2, "projection": "pca", "alphas": [0.0, 9.0], "seeds": [0], "ladder": False,
    }
    pipeline = load_pipeline(REPO / "pipelines" / "mmeb_gpu.yaml", root=root, overrides=overrides)
    outcomes = run_pipeline(pipeline, log=lambda message: None)
    assert {o.run.name: o.error for o in outcomes if o.status != "ran"} == {}
    overlap = read_metrics(pipeline.runs_dir / "overlap.ipynb")
    assert set(overlap["table1"]) == {"before", "after InfoNCE", "after weighting"}


def test_shipped_pipelines_only_name_declared_parameters():
    for name in ("cpu_demo", "mmeb_gpu"):
        check_parameters(load_pipeline(REPO / "pipelines" / f"{name}.yaml", root=REPO))
