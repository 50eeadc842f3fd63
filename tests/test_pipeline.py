"""The papermill pipeline: parameter checks, skip/force, failures, and a summary read from outputs."""
import json
from pathlib import Path

import nbformat
import pytest

from llave_kit.pipeline import PipelineError, load_pipeline, read_metrics, run_pipeline

PRODUCER = [
    ("value = 1\nfail = False\noutput_dir = 'unset'\nfigures_dir = 'unset'", ["parameters"]),
    ("import os, random\n"
     "if fail:\n    raise RuntimeError('asked to fail')\n"
     "if os.path.exists(output_dir):  # like train(): refuses to mix with an earlier run\n"
     "    raise RuntimeError('output_dir holds an earlier run')\n"
     "os.makedirs(output_dir)\n"
     "nonce = random.random()\n"
     "open(os.path.join(output_dir, 'value.txt'), 'w').write(f'{value} {nonce}')", []),
    ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
     "os.makedirs(figures_dir, exist_ok=True)\n"
     "plt.plot([0, value]); plt.savefig(os.path.join(figures_dir, 'line.png'))", []),
    ("from llave_kit.pipeline import record_metrics\n"
     "record_metrics({'value': value, 'squared': {'of_value': value ** 2 + 0.5}})", []),
]
CONSUMER = [
    ("source = 'unset'", ["parameters"]),
    ("from llave_kit.pipeline import record_metrics\n"
     "record_metrics({'read': open(source).read().split()[0]})", []),
]


def write_notebook(path: Path, cells) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for source, tags in cells:
        notebook.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": tags}))
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, str(path))


@pytest.fixture
def project(tmp_path):
    write_notebook(tmp_path / "notebooks" / "producer.ipynb", PRODUCER)
    write_notebook(tmp_path / "notebooks" / "consumer.ipynb", CONSUMER)
    return tmp_path


def write_pipeline(root: Path, value=3, fail=False, extra_parameter=None) -> Path:
    producer_parameters = {"value": value, "fail": fail, **(extra_parameter or {})}
    spec = {
        "name": "demo",
        "runs": [
            {"name": "make", "notebook": "notebooks/producer.ipynb", "parameters": producer_parameters},
            {"name": "use", "notebook": "notebooks/consumer.ipynb", "depends_on": ["make"],
             "parameters": {"source": "{runs_dir}/make/value.txt"}},
            {"name": "sweep", "notebook": "notebooks/producer.ipynb", "grid": {"value": [1, 2]}},
        ],
    }
    path = root / "demo.yaml"
    path.write_text(json.dumps(spec))  # JSON is valid YAML
    return path


def statuses(outcomes):
    return {outcome.run.name: outcome.status for outcome in outcomes}


def test_runs_skip_when_unchanged_and_summary_holds_metrics_from_the_notebooks(project):
    pipeline = load_pipeline(write_pipeline(project), root=project)
    first = run_pipeline(pipeline, log=lambda message: None)
    assert statuses(first) == {"make": "ran", "use": "ran", "sweep-value1": "ran", "sweep-value2": "ran"}

    executed = project / "runs" / "demo" / "make.ipynb"
    assert read_metrics(executed) == {"value": 3, "squared": {"of_value": 9.5}}
    assert read_metrics(project / "runs" / "demo" / "use.ipynb") == {"read": "3"}
    assert (project / "figures" / "demo" / "make" / "line.png").stat().st_size > 0
    assert not (project / "figures" / "demo" / ".staging").exists() or not any(
        (project / "figures" / "demo" / ".staging").iterdir())
    summary = (project / "figures" / "demo" / "summary.md").read_text()
    assert "| squared.of_value | 9.5 |" in summary and "| read | 3 |" in summary
    assert "![line](make/line.png)" in summary

    second = run_pipeline(pipeline, log=lambda message: None)
    assert set(statuses(second).values()) == {"cached"}
    forced = run_pipeline(pipeline, force=True, log=lambda message: None)
    assert set(statuses(forced).values()) == {"ran"}


def test_changed_parameter_reruns_that_run_and_its_dependents_only(project):
    run_pipeline(load_pipeline(write_pipeline(project, value=3), root=project), log=lambda m: None)
    changed = run_pipeline(load_pipeline(write_pipeline(project, value=4), root=project),
                           log=lambda m: None)
    assert statuses(changed) == {"make": "ran", "use": "ran", "sweep-value1": "cached",
                                 "sweep-value2": "cached"}
    assert read_metrics(project / "runs" / "demo" / "use.ipynb") == {"read": "4"}


def test_failure_keeps_executed_copy_blocks_dependents_and_is_reported(project):
    run_pipeline(load_pipeline(write_pipeline(project, value=3), root=project), log=lambda m: None)
    outcomes = run_pipeline(load_pipeline(write_pipeline(project, fail=True), root=project),
                            log=lambda m: None)
    assert statuses(outcomes)["make"] == "failed"
    assert statuses(outcomes)["use"] == "blocked"
    executed = nbformat.read(str(project / "runs" / "demo" / "make.ipynb"), as_version=4)
    errors = [o for cell in executed.cells for o in cell.get("outputs", []) if o["output_type"] == "error"]
    assert errors and errors[0]["evalue"] == "asked to fail"
    assert not (project / "figures" / "demo" / "make").exists()  # the old figure is not presented
    summary = (project / "figures" / "demo" / "summary.md").read_text()
    assert "Status: **failed** — RuntimeError: asked to fail" in summary
    assert "Status: **blocked** — not run: make did not succeed" in summary
    # A failed run is retried next time even though nothing changed.
    again = run_pipeline(load_pipeline(write_pipeline(project, fail=True), root=project),
                         log=lambda m: None)
    assert statuses(again)["make"] == "failed"


def test_unknown_parameters_are_rejected_before_anything_runs(project):
    pipeline = load_pipeline(write_pipeline(project, extra_parameter={"alhpa": 9}), root=project)
    with pytest.raises(PipelineError, match=r"no parameter\(s\) \['alhpa'\]"):
        run_pipeline(pipeline, log=lambda message: None)
    assert not (project / "runs").exists()


@pytest.mark.parametrize("spec, message", [
    ({"runs": [{"name": "a"}]}, "needs 'name' and 'notebook'"),
    ({"runs": [{"name": "a", "notebook": "n.ipynb", "depends_on": ["b"]}]}, "not an earlier run"),
    ({"runs": [{"name": "a", "notebook": "n.ipynb"}] * 2}, "duplicate run name"),
    ({"runs": [{"name": "a", "notebook": "n.ipynb", "param": {}}]}, "unknown keys"),
    ({"stages": []}, "expected a mapping with a 'runs' list"),
])
def test_malformed_pipeline_files_are_rejected(tmp_path, spec, message):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(spec))
    with pytest.raises(PipelineError, match=message):
        load_pipeline(path, root=tmp_path)


def test_defaults_reach_only_the_notebooks_that_declare_them(project):
    spec = {"name": "demo", "defaults": {"value": 7},
            "runs": [{"name": "make", "notebook": "notebooks/producer.ipynb"},
                     {"name": "use", "notebook": "notebooks/consumer.ipynb", "depends_on": ["make"],
                      "parameters": {"source": "{runs_dir}/make/value.txt"}}]}
    path = project / "defaults.yaml"
    path.write_text(json.dumps(spec))
    outcomes = run_pipeline(load_pipeline(path, root=project), log=lambda message: None)
    assert statuses(outcomes) == {"make": "ran", "use": "ran"}
    assert read_metrics(project / "runs" / "demo" / "use.ipynb") == {"read": "7"}
    path.write_text(json.dumps({**spec, "defaults": {"valeu": 7}}))
    with pytest.raises(PipelineError, match=r"defaults \['valeu'\] are declared by no notebook"):
        run_pipeline(load_pipeline(path, root=project), log=lambda message: None)


def test_an_interrupted_run_leaves_nothing_that_passes_for_current(project, monkeypatch):
    import papermill

    path = write_pipeline(project)
    run_pipeline(load_pipeline(path, root=project), log=lambda message: None)
    figures = project / "figures" / "demo"
    assert (figures / "make" / "line.png").exists() and (figures / "summary.md").exists()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a Ctrl-C or kill during a notebook looks like here

    monkeypatch.setattr(papermill, "execute_notebook", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_pipeline(path, root=project), force=True, log=lambda message: None)
    assert not (figures / "summary.md").exists()
    assert not (figures / "make").exists()
    monkeypatch.undo()
    again = run_pipeline(load_pipeline(path, root=project), log=lambda message: None)
    assert statuses(again)["make"] == "ran"  # not skipped as if it had finished
    assert statuses(again)["sweep-value1"] == "cached"


def test_a_dead_kernel_fails_its_run_and_the_pipeline_goes_on(project, monkeypatch):
    import papermill

    real = papermill.execute_notebook

    def dies_on_producer(input_path, *args, **kwargs):
        if input_path.endswith("producer.ipynb"):
            raise RuntimeError("Kernel died before replying to kernel_info")
        return real(input_path, *args, **kwargs)

    monkeypatch.setattr(papermill, "execute_notebook", dies_on_producer)
    outcomes = run_pipeline(load_pipeline(write_pipeline(project), root=project),
                            log=lambda message: None)
    assert statuses(outcomes) == {"make": "failed", "use": "blocked", "sweep-value1": "failed",
                                  "sweep-value2": "failed"}
    summary = (project / "figures" / "demo" / "summary.md").read_text()
    assert "Status: **failed** — RuntimeError: Kernel died before replying" in summary
