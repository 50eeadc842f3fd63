"""The papermill pipeline: parameter checks, skip/force, failures, and a summary read from outputs."""
import json
import re
from pathlib import Path

import nbformat
import pytest

from llave_kit.pipeline import (
    METRICS_MIME,
    Outcome,
    Pipeline,
    PipelineError,
    Run,
    load_pipeline,
    read_metrics,
    run_pipeline,
    summary_record,
)

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
MIXED_METRICS = [  # nested and non-float values, as a notebook may record them
    ("from llave_kit.pipeline import record_metrics\n"
     "record_metrics({'p_at_1': {'hard': 0.25, 'random': 0.75}, 'curve': [1.5, 0.5], 'steps': 3,\n"
     "                'loss_name': 'weighted', 'done': True, 'best': None})", []),
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


def summary_json(root: Path, pipeline="demo") -> dict:
    return json.loads((root / "figures" / pipeline / "summary.json").read_text())


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
    assert "| value | 3 |" in summary and "| read | 3 |" in summary
    assert "|  | squared |\n|---|---|\n| of_value | 9.500 |" in summary
    assert "![line](make/line.png)" in summary
    page = (project / "figures" / "demo" / "summary.html").read_text()
    assert '<img src="make/line.png"' in page and "runs/demo/make.ipynb" in page
    shown = [output["data"] for cell in nbformat.read(str(executed), as_version=4).cells
             for output in cell.get("outputs", []) if METRICS_MIME in output.get("data", {})]
    assert shown[0][METRICS_MIME] == {"value": 3, "squared": {"of_value": 9.5}}
    assert "<table>" in shown[0]["text/html"] and "of_value" in shown[0]["text/plain"]
    record = summary_json(project)
    assert record["pipeline"] == "demo" and record["counts"] == {
        "ran": 4, "cached": 0, "failed": 0, "blocked": 0}
    assert {name: run["status"] for name, run in record["runs"].items()} == statuses(first)
    for name, run in record["runs"].items():
        assert run["metrics"] == read_metrics(project / "runs" / "demo" / f"{name}.ipynb")
        assert run["error"] is None and run["seconds"] > 0
    assert record["runs"]["make"]["notebook"] == "notebooks/producer.ipynb"

    second = run_pipeline(pipeline, log=lambda message: None)
    assert set(statuses(second).values()) == {"cached"}
    record = summary_json(project)  # rewritten: cached runs keep their recorded metrics
    assert record["counts"]["cached"] == 4 and record["runs"]["make"]["status"] == "cached"
    assert record["runs"]["make"]["metrics"] == {"value": 3, "squared": {"of_value": 9.5}}
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
    assert "| make | notebooks/producer.ipynb | ✗ failed |" in summary
    assert "**Not finished: make (failed), use (blocked)" in summary
    assert '<tr class="failed">' in (project / "figures" / "demo" / "summary.html").read_text()
    # A failed run is retried next time even though nothing changed.
    again = run_pipeline(load_pipeline(write_pipeline(project, fail=True), root=project),
                         log=lambda m: None)
    assert statuses(again)["make"] == "failed"


def test_the_log_says_which_run_of_how_many_and_the_time_elapsed(project, monkeypatch):
    import llave_kit.pipeline

    printed = []
    monkeypatch.setattr(llave_kit.pipeline, "print",
                        lambda message, **kwargs: printed.append((message, kwargs)), raising=False)
    run_pipeline(load_pipeline(write_pipeline(project, fail=True), root=project))
    lines = [message for message, _ in printed]
    assert all(kwargs == {"flush": True} for _, kwargs in printed)  # readable in a log file as it runs
    assert lines[0] == "[demo] 1/4 make: running notebooks/producer.ipynb (elapsed 0s)"
    assert re.fullmatch(r"\[demo\] 1/4 make: failed after \d+s \(RuntimeError: asked to fail\)", lines[1])
    assert lines[2] == "[demo] 2/4 use: blocked (not run: make did not succeed)"
    assert re.fullmatch(r"\[demo\] 3/4 sweep-value1: running notebooks/producer.ipynb \(elapsed \d+s\)", lines[3])
    assert re.fullmatch(r"\[demo\] 3/4 sweep-value1: ran in \d+s", lines[4])
    assert re.fullmatch(r"\[demo\] done in \d+s \(2 ran, 0 cached, 1 failed, 1 blocked\): .*summary\.html "
                        r"\(summary\.md and summary\.json beside it\)", lines[-1])
    printed.clear()
    run_pipeline(load_pipeline(write_pipeline(project, fail=True), root=project))
    assert "[demo] 3/4 sweep-value1: cached (unchanged since it last succeeded)" in [m for m, _ in printed]


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
    assert (figures / "make" / "line.png").exists()
    assert all((figures / name).exists() for name in ("summary.md", "summary.html", "summary.json"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a Ctrl-C or kill during a notebook looks like here

    monkeypatch.setattr(papermill, "execute_notebook", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_pipeline(path, root=project), force=True, log=lambda message: None)
    assert not any((figures / name).exists() for name in ("summary.md", "summary.html", "summary.json"))
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


def test_summary_json_holds_the_recorded_metrics_statuses_and_errors(project):
    from datetime import datetime

    write_notebook(project / "notebooks" / "mixed.ipynb", MIXED_METRICS)
    spec = {"name": "mixed",
            "runs": [{"name": "mixed", "notebook": "notebooks/mixed.ipynb"},
                     {"name": "broken", "notebook": "notebooks/producer.ipynb",
                      "parameters": {"fail": True}},
                     {"name": "after", "notebook": "notebooks/consumer.ipynb",
                      "depends_on": ["broken"], "parameters": {"source": "x"}}]}
    path = project / "mixed.yaml"
    path.write_text(json.dumps(spec))
    outcomes = run_pipeline(load_pipeline(path, root=project), log=lambda message: None)
    assert statuses(outcomes) == {"mixed": "ran", "broken": "failed", "after": "blocked"}

    record = summary_json(project, "mixed")
    assert record["pipeline"] == "mixed"
    assert datetime.fromisoformat(record["finished"]).tzinfo is not None
    assert record["counts"] == {"ran": 1, "cached": 0, "failed": 1, "blocked": 1}
    mixed = record["runs"]["mixed"]
    assert mixed["metrics"] == read_metrics(project / "runs" / "mixed" / "mixed.ipynb") == {
        "p_at_1": {"hard": 0.25, "random": 0.75}, "curve": [1.5, 0.5], "steps": 3,
        "loss_name": "weighted", "done": True, "best": None}
    assert (mixed["status"], mixed["notebook"], mixed["error"]) == (
        "ran", "notebooks/mixed.ipynb", None)
    assert record["runs"]["broken"] == {
        "status": "failed", "seconds": record["runs"]["broken"]["seconds"],
        "notebook": "notebooks/producer.ipynb", "error": "RuntimeError: asked to fail",
        "metrics": {}}
    assert record["runs"]["after"] == {"status": "blocked", "seconds": 0.0,
                                       "notebook": "notebooks/consumer.ipynb",
                                       "error": "not run: broken did not succeed", "metrics": {}}


def test_summary_json_writes_non_finite_metrics_as_null(tmp_path):
    # Jupyter's transport currently turns nan/inf into strings; a notebook written by other
    # means can still hold real non-finite floats, and summary.json must stay strict JSON.
    run = Run("r", Path("nb.ipynb"), {}, "r")
    pipeline = Pipeline("p", [run], tmp_path)
    notebook = nbformat.v4.new_notebook()
    notebook.cells.append(nbformat.v4.new_code_cell("", outputs=[nbformat.v4.new_output(
        "display_data", data={METRICS_MIME: {"loss": float("nan"), "ok": 0.5,
                                             "by_level": {"hard": float("inf")},
                                             "curve": [1.0, float("-inf")]}})]))
    pipeline.runs_dir.mkdir(parents=True)
    nbformat.write(notebook, str(pipeline.runs_dir / "r.ipynb"))
    record = summary_record(pipeline, [Outcome(run, "ran", 1.234)])
    text = json.dumps(record, allow_nan=False)  # raises on a nan left behind
    assert json.loads(text)["runs"]["r"] == {
        "status": "ran", "seconds": 1.23, "notebook": "nb.ipynb", "error": None,
        "metrics": {"loss": None, "ok": 0.5, "by_level": {"hard": None}, "curve": [1.0, None]}}
