"""The papermill pipeline: parameter checks, skip/force, failures, and a summary read from outputs."""
import json
import re
import signal
import subprocess
import sys
import time
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


# --------------------------------------------------------------------------------------------------
# Nothing lost, nothing silently wrong

HOLD = [  # marks that it started, then waits while the `hold` file exists
    ("hold = 'unset'\nstarted = 'unset'\noutput_dir = 'unset'", ["parameters"]),
    ("import os, time\n"
     "os.makedirs(output_dir)\n"
     "open(os.path.join(output_dir, 'alive.txt'), 'w').close()\n"
     "open(started, 'w').close()\n"
     "deadline = time.time() + 120  # a test that crashed must not leave a kernel behind for long\n"
     "while os.path.exists(hold) and time.time() < deadline:\n"
     "    time.sleep(0.05)\n"
     "assert os.path.exists(os.path.join(output_dir, 'alive.txt')), 'my folder was deleted'", []),
]
WHOLE_CONSUMER = [  # records all of what it read, the producer's nonce included
    ("source = 'unset'", ["parameters"]),
    ("from llave_kit.pipeline import record_metrics\nrecord_metrics({'read': open(source).read()})", []),
]
TYPED = [
    ("steps = 100\nlr = 1e-3\noverwrite = False\nlabel = 'x'\nlevels = ['hard']\noptions = {}\n"
     "anything = None\ncomputed = len('abc')\nfinetune = {'max_steps': 10}\n"
     "arms = {'a': {'loss': 'info_nce'}}", ["parameters"]),
    ("from llave_kit.pipeline import record_metrics\nrecord_metrics({'steps': steps})", []),
]


def commit_files(root: Path) -> dict[str, bytes]:
    """Write files a repository holds besides the pipeline's outputs; returns them as
    `files_outside` sees them, for comparing after the pipeline ran."""
    (root / "figures" / "committed").mkdir(parents=True, exist_ok=True)
    (root / "figures" / "committed" / "figure.png").write_bytes(b"\x89PNG committed")
    (root / "README.md").write_text("committed\n")
    return files_outside(root)


def files_outside(root: Path, pipeline="demo") -> dict[str, bytes]:
    """Every file of `root` outside runs/, figures/<pipeline>/ and the tests' signals/, with its bytes."""
    owned = (root / "runs", root / "figures" / pipeline, root / "signals")
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*")
            if path.is_file() and not any(folder in path.parents for folder in owned)}


def write_spec(root: Path, spec: dict, name="demo.yaml") -> Path:
    path = root / name
    path.write_text(json.dumps(spec))
    return path


def cli(root: Path, *arguments: str) -> subprocess.Popen:
    """`llave-kit run-pipeline` in a process of its own, as a user starts it."""
    return subprocess.Popen([sys.executable, "-m", "llave_kit", "run-pipeline", *arguments,
                             "--root", str(root)], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, seconds=120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"exited early: {process.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("name", ["..", "../../x", "../../../escaped", ".", ".staging", ".lock",
                                  "a/b", "with space", "make.ipynb", "summary.json", ""])
def test_run_names_must_be_safe_file_names(tmp_path, name):
    path = write_spec(tmp_path, {"name": "demo", "runs": [{"name": name, "notebook": "n.ipynb"}]})
    with pytest.raises(PipelineError, match=re.escape(f"run {name!r}")):
        load_pipeline(path, root=tmp_path)


def test_grid_values_and_the_pipeline_name_make_safe_names_too(tmp_path):
    path = write_spec(tmp_path, {"name": "demo", "runs": [
        {"name": "sweep", "notebook": "n.ipynb", "grid": {"data": ["ok", "../up"]}}]})
    with pytest.raises(PipelineError, match=re.escape("run 'sweep-data../up' (from the grid of 'sweep')")):
        load_pipeline(path, root=tmp_path)
    path = write_spec(tmp_path, {"name": "..", "runs": [{"name": "a", "notebook": "n.ipynb"}]})
    with pytest.raises(PipelineError, match=re.escape("pipeline name '..'")):
        load_pipeline(path, root=tmp_path)


def test_a_run_named_dot_dot_deletes_nothing_outside_its_folders(project):
    """Built without load_pipeline, the run still never reaches a delete: figures/ stays."""
    committed = commit_files(project)
    pipeline = Pipeline("demo", [Run("..", Path("notebooks/producer.ipynb"), {}, "..")], project)
    for _ in range(2):
        with pytest.raises(PipelineError, match=re.escape("run '..'")):
            run_pipeline(pipeline, log=lambda message: None)
    assert files_outside(project) == committed


def test_the_pipeline_deletes_only_inside_its_own_folders(tmp_path):
    pipeline = Pipeline("demo", [], tmp_path)
    committed = commit_files(tmp_path)
    for outside in (tmp_path / "figures" / "committed", tmp_path / "README.md", tmp_path / "runs",
                    pipeline.runs_dir, pipeline.figures_dir, pipeline.runs_dir / ".." / "other",
                    pipeline.figures_dir / ".." / "committed" / "figure.png"):
        with pytest.raises(PipelineError, match="refusing to delete"):
            pipeline.delete(outside)
    assert files_outside(tmp_path) == committed
    inside = pipeline.figures_dir / "run" / "figure.png"
    inside.parent.mkdir(parents=True)
    inside.write_text("old")
    pipeline.delete(inside.parent)
    pipeline.delete(inside.parent)  # already gone: nothing to do
    assert not inside.parent.exists() and pipeline.figures_dir.exists()


@pytest.mark.parametrize("runs, twice", [
    ([{"name": "sw", "grid": {"seed": [0]}}, {"name": "sw-seed0"}], "sw-seed0"),
    ([{"name": "sw-seed0"}, {"name": "sw", "grid": {"seed": [0]}}], "sw-seed0"),
    ([{"name": "sw", "grid": {"seed": [0, 0]}}], "sw-seed0"),
    ([{"name": "Make"}, {"name": "make"}], "make"),  # one folder on macOS and Windows
])
def test_names_that_collide_after_grid_expansion_are_rejected(tmp_path, runs, twice):
    path = write_spec(tmp_path, {"name": "demo", "runs": [{**run, "notebook": "n.ipynb"} for run in runs]})
    with pytest.raises(PipelineError, match=re.escape(f"run name {twice!r} is used twice")):
        load_pipeline(path, root=tmp_path)


def test_depends_on_takes_one_name_or_a_list(tmp_path):
    runs = [{"name": "pretrain", "notebook": "n.ipynb"},
            {"name": "one", "notebook": "n.ipynb", "depends_on": "pretrain"},
            {"name": "grid", "notebook": "n.ipynb", "depends_on": ["pretrain", "one"], "grid": {"s": [0, 1]}}]
    pipeline = load_pipeline(write_spec(tmp_path, {"runs": runs}), root=tmp_path)
    assert {run.name: run.depends_on for run in pipeline.runs} == {
        "pretrain": [], "one": ["pretrain"], "grid-s0": ["pretrain", "one"], "grid-s1": ["pretrain", "one"]}


@pytest.mark.parametrize("run, message", [
    ({"depends_on": 3}, "'depends_on' must be a run name or a list of run names"),
    ({"depends_on": [["pretrain"]]}, "'depends_on' must be a run name or a list of run names"),
    ({"grid": {"seed": []}}, "'grid' must map parameter names to non-empty lists"),
    ({"grid": {"seed": 0}}, "'grid' must map parameter names to non-empty lists"),
    ({"parameters": ["seed"]}, "'parameters' must be a mapping"),
    ({"name": 7}, "run name 7 is not a string"),
])
def test_malformed_runs_are_rejected_in_one_sentence(tmp_path, run, message):
    runs = [{"name": "pretrain", "notebook": "n.ipynb"}, {"name": "b", "notebook": "n.ipynb", **run}]
    with pytest.raises(PipelineError, match=re.escape(message)):
        load_pipeline(write_spec(tmp_path, {"runs": runs}), root=tmp_path)


def typed_pipeline(root: Path, parameters: dict, overrides=None):
    write_notebook(root / "notebooks" / "typed.ipynb", TYPED)
    write_notebook(root / "notebooks" / "producer.ipynb", PRODUCER)
    path = write_spec(root, {"name": "demo", "runs": [
        {"name": "first", "notebook": "notebooks/producer.ipynb"},
        {"name": "bad", "notebook": "notebooks/typed.ipynb", "parameters": parameters}]})
    return load_pipeline(path, root=root, overrides=overrides)


@pytest.mark.parametrize("name, value, expected", [
    ("steps", "abc", "(str), expected an int"),
    ("steps", True, "(bool), expected an int"),
    ("steps", 2.5, "(float), expected an int"),
    ("lr", "1e-3", "(str), expected a number (int or float) (YAML reads 1e-3 as a string: write 1.0e-3)"),
    ("lr", False, "(bool), expected a number (int or float)"),
    ("overwrite", "false", "(str), expected a bool"),
    ("overwrite", 0, "(int), expected a bool"),
    ("label", 3, "(int), expected a string"),
    ("levels", "hard", "(str), expected a list"),
    ("options", [], "(list), expected a mapping"),
])
def test_a_value_of_another_type_than_the_default_is_rejected_before_anything_runs(
        tmp_path, name, value, expected):
    pipeline = typed_pipeline(tmp_path, {name: value})
    with pytest.raises(PipelineError) as raised:
        run_pipeline(pipeline, log=lambda message: None)
    assert str(raised.value) == f"run 'bad': parameter {name!r} = {value!r} {expected}"
    assert not (tmp_path / "runs").exists()  # not even the run before it


def test_values_of_the_defaults_type_and_overrides_are_checked_too(tmp_path):
    from llave_kit.pipeline import check_parameters

    good = {"steps": 5, "lr": 1, "overwrite": True, "label": "y", "levels": [], "options": {"k": 1},
            "anything": ["any", "thing"], "computed": "not a literal default: anything goes"}
    parameters, declared = check_parameters(typed_pipeline(tmp_path, good))["bad"]
    assert parameters == good and set(good) <= declared
    with pytest.raises(PipelineError, match=re.escape(
            "run 'bad': parameter 'lr' = 'fast' (str), expected a number (int or float); "
            "run 'bad': parameter 'steps' = 'abc' (str), expected an int")):
        check_parameters(typed_pipeline(tmp_path, {"lr": "fast"}, overrides={"steps": "abc"}))


def test_train_config_fields_of_finetune_and_arms_are_type_checked(tmp_path):
    with pytest.raises(PipelineError) as raised:
        run_pipeline(typed_pipeline(tmp_path, {"finetune": {"max_steps": "ten"},
                                               "arms": {"ok": {"loss": "info_nce"}, "a": {"lr": "fast"},
                                                        "b": 3}}), log=lambda message: None)
    message = str(raised.value)  # TrainConfig's own messages name the field, value and type
    assert message.count("run 'bad': ") == 3 and "\n" not in message
    assert "run 'bad': parameter 'arms', arm 'b' = 3, expected a mapping of TrainConfig fields" in message
    assert re.search(r"run 'bad': parameter 'finetune': .*max_steps.*'ten'", message)
    assert re.search(r"run 'bad': parameter 'arms', arm 'a': .*lr.*'fast'", message)
    assert not (tmp_path / "runs").exists()


def test_a_second_process_stops_at_once_and_the_first_one_finishes_intact(project):
    """Two real `run-pipeline` processes on one pipeline: the second exits with status 2 naming
    the first's PID, and deletes none of its live folders."""
    write_notebook(project / "notebooks" / "hold.ipynb", HOLD)
    signals = project / "signals"
    signals.mkdir()
    (signals / "hold").touch()
    path = write_spec(project, {"name": "demo", "runs": [{"name": "slow", "notebook": "notebooks/hold.ipynb",
                                                          "parameters": {"hold": str(signals / "hold"),
                                                                         "started": str(signals / "started")}}]})
    committed = commit_files(project)
    first = cli(project, str(path))
    try:
        wait_for(signals / "started", first)
        second = cli(project, str(path))
        try:
            _, error = second.communicate(timeout=90)
        finally:
            second.kill()
        assert second.returncode == 2
        assert f"is being run by process {first.pid}" in error and error.startswith("error: ")
        assert (project / "runs" / "demo" / "slow" / "alive.txt").exists()
    finally:
        (signals / "hold").unlink()
        output, error = first.communicate(timeout=120)
    assert first.returncode == 0, error
    assert "1 ran, 0 cached, 0 failed, 0 blocked" in output
    assert summary_json(project)["runs"]["slow"]["status"] == "ran"
    assert not (project / "runs" / "demo" / ".lock").exists()  # released on exit
    assert files_outside(project) == committed


def test_a_lock_held_by_a_live_process_stops_the_run_and_a_dead_ones_is_taken_over(project):
    path = write_spec(project, {"name": "demo", "runs": [
        {"name": "make", "notebook": "notebooks/producer.ipynb"}]})
    lock = project / "runs" / "demo" / ".lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(f"{holder.pid}\n")
        with pytest.raises(PipelineError, match=f"is being run by process {holder.pid} "):
            run_pipeline(load_pipeline(path, root=project), log=lambda message: None)
        assert lock.read_text() == f"{holder.pid}\n"
        assert not (project / "runs" / "demo" / "make.record.json").exists()
    finally:
        holder.kill()
        holder.wait()
    outcomes = run_pipeline(load_pipeline(path, root=project), log=lambda message: None)
    assert statuses(outcomes) == {"make": "ran"}
    assert not lock.exists()
    lock.write_text("")  # its writer was killed before it wrote its PID
    assert statuses(run_pipeline(load_pipeline(path, root=project), log=lambda message: None)) == {
        "make": "cached"}


def test_a_forced_pipeline_killed_downstream_reruns_every_run_made_from_the_old_upstream(project):
    """--force re-runs `make`, then the process is SIGKILLed during `slow` (downstream of it):
    `use` still holds what it read from the old `make`, and a plain re-run must redo it."""
    write_notebook(project / "notebooks" / "hold.ipynb", HOLD)
    write_notebook(project / "notebooks" / "whole.ipynb", WHOLE_CONSUMER)
    signals = project / "signals"
    signals.mkdir()
    path = write_spec(project, {"name": "demo", "runs": [
        {"name": "make", "notebook": "notebooks/producer.ipynb"},
        {"name": "slow", "notebook": "notebooks/hold.ipynb", "depends_on": ["make"],
         "parameters": {"hold": str(signals / "hold"), "started": str(signals / "started")}},
        {"name": "use", "notebook": "notebooks/whole.ipynb", "depends_on": ["make"],
         "parameters": {"source": "{runs_dir}/make/value.txt"}}]})
    committed = commit_files(project)
    assert set(statuses(run_pipeline(load_pipeline(path, root=project), log=lambda m: None)).values()) == {"ran"}
    old_value = (project / "runs" / "demo" / "make" / "value.txt").read_text()
    (signals / "started").unlink()

    (signals / "hold").touch()
    forced = cli(project, str(path), "--force")
    try:
        wait_for(signals / "started", forced)
        forced.send_signal(signal.SIGKILL)
        forced.communicate(timeout=60)
    finally:
        (signals / "hold").unlink()
    new_value = (project / "runs" / "demo" / "make" / "value.txt").read_text()
    assert new_value != old_value  # make ran again before the kill
    lock = project / "runs" / "demo" / ".lock"
    left_lock = lock.read_text().strip() if lock.exists() else None

    again = run_pipeline(load_pipeline(path, root=project), log=lambda message: None)
    assert statuses(again) == {"make": "cached", "slow": "ran", "use": "ran"}
    assert read_metrics(project / "runs" / "demo" / "use.ipynb") == {"read": new_value}
    assert summary_json(project)["counts"] == {"ran": 2, "cached": 1, "failed": 0, "blocked": 0}
    assert left_lock == str(forced.pid)  # the killed process's lock, taken over
    assert files_outside(project) == committed
