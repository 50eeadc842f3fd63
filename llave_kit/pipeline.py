"""Run parameterised notebooks as a pipeline with papermill, then write a summary.

A pipeline file (YAML) names notebook runs:

    name: cpu_demo
    defaults: {device: cpu}                 # parameters given to every run that declares them
    runs:
      - name: pretrain
        notebook: notebooks/01_train.ipynb
        parameters: {loss: info_nce, steps: 200}
      - name: sweep
        notebook: notebooks/05_alpha_sweep.ipynb
        grid: {seed: [0, 1]}                # expands to sweep-seed0, sweep-seed1
        depends_on: [pretrain]
        parameters: {checkpoint: "{runs_dir}/pretrain/final"}

For each run, papermill executes the notebook into `runs/<pipeline>/<run>.ipynb`. Notebooks that
declare `output_dir` / `figures_dir` parameters receive `runs/<pipeline>/<run>/` and
`figures/<pipeline>/<run>/`; `{runs_dir}` and `{figures_dir}` in string parameters expand to the
pipeline's folders, so a run can read what an earlier one wrote. Notebooks report numbers with
`record_metrics({...})`, which shows them as tables and stores them in the executed notebook. At
the end the pipeline reads them back into `figures/<pipeline>/summary.json`, for programs, and
renders it (`llave_kit.report`) as summary.md and summary.html beside it, for people:

    {"pipeline": name, "finished": ISO time, "counts": {"ran": n, "cached": n, "failed": n,
     "blocked": n}, "runs": {run: {"status", "seconds", "notebook", "error" (or null),
     "metrics": {...} (as read_metrics returns them; {} unless the run succeeded)}}}

Non-finite floats among the metrics are written as null, so the file is strict JSON. (Jupyter's
messaging currently turns a recorded nan/inf into the string "nan"/"inf" before it reaches the
notebook; such strings stay as they are, in every summary.)

Guarantees:
- parameter names a notebook does not declare are rejected before anything runs;
- a run whose notebook and parameters are unchanged since it last succeeded is skipped (`force`
  redoes it);
- a failed run keeps its executed copy with the error, stops the runs that depend on it, and the
  summary says so;
- figures are written to a staging folder and moved into place only when their run succeeds, and
  the summaries are replaced atomically at the end, so a killed pipeline leaves nothing half-written
  presented as complete.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import nbformat
import yaml

from llave_kit.files import write_text
from llave_kit.report import duration, metrics_html, metrics_text, write_reports

METRICS_MIME = "application/vnd.llave-kit.metrics+json"
RUN_KEYS = {"name", "notebook", "parameters", "grid", "depends_on"}
PIPELINE_KEYS = {"name", "defaults", "runs"}
STATUSES = ("ran", "cached", "failed", "blocked")
SUMMARY_FILES = ("summary.json", "summary.md", "summary.html")


def record_metrics(metrics: dict) -> None:
    """Call in a notebook's last cell: shows `metrics` as tables and stores them for the summary.

    The frontend shows the HTML tables (or their plain-text twin); the pipeline reads back only
    the METRICS_MIME entry of the same output.
    """
    from IPython.display import display

    payload = json.loads(json.dumps(metrics, default=float))  # fail early on non-JSON values
    display({METRICS_MIME: payload, "text/html": metrics_html(payload), "text/plain": metrics_text(payload)},
            raw=True)


def read_metrics(notebook_path: str | Path) -> dict:
    """Metrics recorded by `record_metrics` in an executed notebook (later calls override)."""
    metrics: dict = {}
    notebook = nbformat.read(str(notebook_path), as_version=4)
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if METRICS_MIME in output.get("data", {}):
                metrics.update(output["data"][METRICS_MIME])
    return metrics


# --------------------------------------------------------------------------------------------------
# Pipeline description


@dataclass
class Run:
    name: str
    notebook: Path
    parameters: dict
    group: str  # the run's name in the pipeline file; grid runs share it
    depends_on: list[str] = field(default_factory=list)  # groups that must succeed first


@dataclass
class Pipeline:
    name: str
    runs: list[Run]
    root: Path  # folder that relative notebook paths and output folders are resolved against
    defaults: dict = field(default_factory=dict)  # for every run whose notebook declares them
    overrides: dict = field(default_factory=dict)  # like defaults, but win over run parameters

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs" / self.name

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures" / self.name

    def group(self, name: str) -> list[Run]:
        return [run for run in self.runs if run.group == name]


class PipelineError(ValueError):
    """The pipeline file or a run's parameters are invalid."""


def _expand_grid(spec: dict) -> list[Run]:
    grid = spec.get("grid") or {}
    base = spec.get("parameters") or {}
    runs = []
    for combination in itertools.product(*grid.values()):
        suffix = "".join(f"-{name}{value}" for name, value in zip(grid, combination))
        runs.append(Run(
            name=spec["name"] + suffix,
            notebook=Path(spec["notebook"]),
            parameters={**base, **dict(zip(grid, combination))},
            group=spec["name"],
            depends_on=list(spec.get("depends_on") or []),
        ))
    return runs


def load_pipeline(path: str | Path, root: str | Path = ".", overrides: dict | None = None) -> Pipeline:
    """Read and check a pipeline file; grids are expanded into one run per combination.

    `overrides` (e.g. from the command line's --set) replace a parameter in every run whose
    notebook declares it.
    """
    path = Path(path)
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("runs"), list):
        raise PipelineError(f"{path}: expected a mapping with a 'runs' list")
    if unknown := set(spec) - PIPELINE_KEYS:
        raise PipelineError(f"{path}: unknown keys {sorted(unknown)}; allowed {sorted(PIPELINE_KEYS)}")
    runs: list[Run] = []
    for index, run_spec in enumerate(spec["runs"]):
        if not isinstance(run_spec, dict) or not {"name", "notebook"} <= set(run_spec):
            raise PipelineError(f"{path}: run #{index} needs 'name' and 'notebook'")
        if unknown := set(run_spec) - RUN_KEYS:
            raise PipelineError(f"{path}: run {run_spec['name']!r} has unknown keys {sorted(unknown)}")
        name = run_spec["name"]
        if any(run.group == name for run in runs):
            raise PipelineError(f"{path}: duplicate run name {name!r}")
        for dependency in run_spec.get("depends_on") or []:
            if not any(run.group == dependency for run in runs):
                raise PipelineError(
                    f"{path}: run {name!r} depends on {dependency!r}, which is not an earlier run"
                )
        runs.extend(_expand_grid(run_spec))
    return Pipeline(spec.get("name") or path.stem, runs, Path(root), spec.get("defaults") or {},
                    dict(overrides or {}))


def declared_parameters(notebook: Path) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def check_parameters(pipeline: Pipeline) -> None:
    """Reject parameters a notebook does not declare (papermill would silently ignore them)."""
    problems = []
    for run in pipeline.runs:
        notebook = pipeline.root / run.notebook
        if not notebook.exists():
            problems.append(f"run {run.name!r}: notebook {run.notebook} does not exist")
            continue
        declared = declared_parameters(notebook)
        if unknown := set(run.parameters) - declared:
            problems.append(
                f"run {run.name!r}: {run.notebook} has no parameter(s) {sorted(unknown)}; "
                f"it declares {sorted(declared)}"
            )
    declared_anywhere = set().union(*(declared_parameters(pipeline.root / run.notebook)
                                      for run in pipeline.runs
                                      if (pipeline.root / run.notebook).exists()))
    for kind, values in (("defaults", pipeline.defaults), ("overrides", pipeline.overrides)):
        if unused := set(values) - declared_anywhere:
            problems.append(f"{kind} {sorted(unused)} are declared by no notebook of the pipeline")
    if problems:
        raise PipelineError("; ".join(problems))


# --------------------------------------------------------------------------------------------------
# Execution


@dataclass
class Outcome:
    run: Run
    status: str  # "ran", "cached", "failed" or "blocked"
    seconds: float = 0.0
    error: str | None = None
    fingerprint: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status in ("ran", "cached")


def _resolve(value, pipeline: Pipeline):
    if isinstance(value, str):
        return value.replace("{runs_dir}", str(pipeline.runs_dir)).replace(
            "{figures_dir}", str(pipeline.figures_dir))
    if isinstance(value, list):
        return [_resolve(item, pipeline) for item in value]
    if isinstance(value, dict):
        return {key: _resolve(item, pipeline) for key, item in value.items()}
    return value


def _fingerprint(pipeline: Pipeline, run: Run, parameters: dict, upstream: list[str]) -> str:
    digest = hashlib.sha256((pipeline.root / run.notebook).read_bytes())
    digest.update(json.dumps(parameters, sort_keys=True, default=str).encode())
    digest.update("".join(upstream).encode())  # a changed input upstream invalidates this run
    return digest.hexdigest()


def _record_path(pipeline: Pipeline, run: Run) -> Path:
    return pipeline.runs_dir / f"{run.name}.record.json"


def _is_cached(pipeline: Pipeline, run: Run, fingerprint: str) -> bool:
    record_path = _record_path(pipeline, run)
    if not record_path.exists() or not (pipeline.runs_dir / f"{run.name}.ipynb").exists():
        return False
    record = json.loads(record_path.read_text())
    return record.get("status") == "ok" and record.get("fingerprint") == fingerprint


def _execute(pipeline: Pipeline, run: Run, parameters: dict, declared: set[str],
             fingerprint: str) -> Outcome:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    executed = pipeline.runs_dir / f"{run.name}.ipynb"
    partial = pipeline.runs_dir / f".{run.name}.partial.ipynb"
    staging = pipeline.figures_dir / ".staging" / run.name
    final_figures = pipeline.figures_dir / run.name
    # Until this run finishes, nothing of its earlier results may pass for current: a pipeline
    # killed here must neither skip it next time nor show its old figures.
    _record_path(pipeline, run).unlink(missing_ok=True)
    for folder in (staging, final_figures):
        shutil.rmtree(folder, ignore_errors=True)
    automatic = {"output_dir": str(pipeline.runs_dir / run.name), "figures_dir": str(staging)}
    parameters = {**{k: v for k, v in automatic.items() if k in declared}, **parameters}
    if parameters.get("output_dir") == automatic["output_dir"]:
        # The run's folder belongs to the pipeline: a re-run starts from an empty one.
        shutil.rmtree(automatic["output_dir"], ignore_errors=True)
    started, error = time.perf_counter(), None
    try:
        papermill.execute_notebook(
            str(pipeline.root / run.notebook), str(partial), parameters=parameters,
            kernel_name="python3", cwd=str(pipeline.root), progress_bar=False,
        )
    except PapermillExecutionError as failure:
        error = f"{failure.ename}: {failure.evalue}"
    except Exception as failure:  # e.g. the kernel died (out of memory): this run failed, not all
        error = f"{type(failure).__name__}: {failure}"
    seconds = time.perf_counter() - started
    executed.unlink(missing_ok=True)
    if partial.exists():
        os.replace(partial, executed)  # a failed run keeps its executed copy, error included
    if error is None and staging.exists():
        os.replace(staging, final_figures)
    shutil.rmtree(staging, ignore_errors=True)
    record = {"status": "ok" if error is None else "failed", "fingerprint": fingerprint,
              "seconds": round(seconds, 2), "error": error, "parameters": parameters}
    write_text(_record_path(pipeline, run), json.dumps(record, indent=1, default=str))
    return Outcome(run, "ran" if error is None else "failed", seconds, error, fingerprint)


def _print_now(message: str) -> None:
    print(message, flush=True)  # a `make reproduce > log` shows each run as it starts and ends


def _describe(outcome: Outcome) -> str:
    if outcome.status == "ran":
        return f"ran in {duration(outcome.seconds)}"
    if outcome.status == "failed":
        return f"failed after {duration(outcome.seconds)} ({outcome.error})"
    if outcome.status == "cached":
        return "cached (unchanged since it last succeeded)"
    return f"blocked ({outcome.error})"


def run_pipeline(pipeline: Pipeline, force: bool = False, log=None) -> list[Outcome]:
    """Execute every run in order (skipping unchanged successes unless `force`), then summarise.

    `log` receives one line as each run starts and ends, saying which run of how many and the
    time elapsed; by default they are printed at once.
    """
    log = log or _print_now
    check_parameters(pipeline)
    pipeline.runs_dir.mkdir(parents=True, exist_ok=True)
    for name in SUMMARY_FILES:  # until this invocation finishes, none claims to be current
        (pipeline.figures_dir / name).unlink(missing_ok=True)
    started = time.perf_counter()
    outcomes: dict[str, Outcome] = {}
    for number, run in enumerate(pipeline.runs, 1):
        prefix = f"[{pipeline.name}] {number}/{len(pipeline.runs)} {run.name}"
        upstream = [outcomes[dep.name] for group in run.depends_on for dep in pipeline.group(group)]
        declared = declared_parameters(pipeline.root / run.notebook)
        defaults = {k: v for k, v in pipeline.defaults.items() if k in declared}
        overrides = {k: v for k, v in pipeline.overrides.items() if k in declared}
        parameters = _resolve({**defaults, **run.parameters, **overrides}, pipeline)
        fingerprint = _fingerprint(pipeline, run, parameters, [o.fingerprint for o in upstream])
        if any(not o.succeeded for o in upstream):
            failed = sorted({o.run.name for o in upstream if not o.succeeded})
            outcome = Outcome(run, "blocked", error=f"not run: {', '.join(failed)} did not succeed")
        elif not force and not any(o.status == "ran" for o in upstream) and _is_cached(
            pipeline, run, fingerprint
        ):
            outcome = Outcome(run, "cached", fingerprint=fingerprint)
        else:
            log(f"{prefix}: running {run.notebook.as_posix()} "
                f"(elapsed {duration(time.perf_counter() - started)})")
            outcome = _execute(pipeline, run, parameters, declared, fingerprint)
        outcomes[run.name] = outcome
        log(f"{prefix}: {_describe(outcome)}")
    finished = datetime.now().astimezone()
    record = summary_record(pipeline, list(outcomes.values()), finished)
    write_text(pipeline.figures_dir / "summary.json", json.dumps(record, indent=1, allow_nan=False) + "\n")
    markdown, page = write_reports(pipeline.figures_dir, record)
    counts = ", ".join(f"{n} {status}" for status, n in record["counts"].items())
    log(f"[{pipeline.name}] done in {duration(time.perf_counter() - started)} ({counts}): "
        f"{page} ({markdown.name} and summary.json beside it)")
    return list(outcomes.values())


# --------------------------------------------------------------------------------------------------
# Summary


def _counts(outcomes: list[Outcome]) -> dict[str, int]:
    return {s: sum(o.status == s for o in outcomes) for s in STATUSES}


def _metrics(pipeline: Pipeline, outcome: Outcome) -> dict:
    """A run's recorded metrics; {} unless it succeeded (a blocked run's notebook is an old one)."""
    executed = pipeline.runs_dir / f"{outcome.run.name}.ipynb"
    return read_metrics(executed) if outcome.succeeded and executed.exists() else {}


def _strict_json(value):
    """`value` with every non-finite float (nan, inf) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strict_json(item) for item in value]
    return value


def summary_record(pipeline: Pipeline, outcomes: list[Outcome],
                   finished: datetime | None = None) -> dict:
    """What summary.json holds (layout in the module docstring)."""
    finished = finished or datetime.now().astimezone()
    runs = {o.run.name: {"status": o.status, "seconds": round(o.seconds, 2),
                         "notebook": o.run.notebook.as_posix(), "error": o.error,
                         "metrics": _strict_json(_metrics(pipeline, o))} for o in outcomes}
    return {"pipeline": pipeline.name, "finished": finished.isoformat(timespec="seconds"),
            "counts": _counts(outcomes), "runs": runs}
