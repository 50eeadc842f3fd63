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
        depends_on: [pretrain]              # a list of earlier runs; one name may stand alone
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
- the pipeline's name and every run's name (grid runs included) are made of letters, digits, `_`,
  `-` and `.`, do not start with `.`, and are unique (also ignoring case), so each run owns its own
  files and folders; the pipeline deletes nothing outside `runs/<pipeline>/` and
  `figures/<pipeline>/` (`Pipeline.delete` refuses);
- before anything runs, every run is checked: a parameter its notebook does not declare, or whose
  value has another type than the notebook's default (an int default takes an int, a float
  default an int or float, a bool, str, list or dict default the same; a None default anything),
  is rejected, as are `finetune` and `arms` values that are not valid TrainConfig fields or that
  name what the studies set themselves (`model`: that is `base_checkpoint`, one parameter for
  every run's start; `data`, `seed`, `output_dir`, ...);
- one process at a time runs a pipeline: it holds `runs/<pipeline>/.lock` (its PID) while it
  works; a second one stops at once naming the first, and a lock whose process is dead is taken over;
- a run whose notebook, parameters and upstream results are unchanged since it last succeeded is
  skipped (`force` redoes it). Every successful execution records a fresh result id, and a run's
  fingerprint includes the result ids of the runs it depends on, so a run re-executed upstream
  (forced, or after an interruption) makes every run downstream of it run again;
- a failed run keeps its executed copy with the error, stops the runs that depend on it, and the
  summary says so;
- figures are written to a staging folder and moved into place only when their run succeeds, and
  the summaries are replaced atomically at the end, so a killed pipeline leaves nothing half-written
  presented as complete.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
# Names become file and folder names; hidden ones (.lock, .staging, .<run>.partial.ipynb) are the
# pipeline's own.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
# A run named "x.ipynb" would write its folder where run "x" keeps its executed notebook.
RESERVED_SUFFIXES = (".ipynb", ".record.json")
LOCK_FILE = ".lock"


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

    def delete(self, path: Path) -> None:
        """Remove a file or folder inside `runs_dir` or `figures_dir` (nothing if it is missing).

        Every delete of the pipeline goes through here, so that no name, however it was made, can
        point one at the project's committed files.
        """
        target = Path(os.path.abspath(path))  # ".." resolved as the file system will resolve it
        owned = [Path(os.path.abspath(folder)) for folder in (self.runs_dir, self.figures_dir)]
        if not any(folder in target.parents for folder in owned):
            raise PipelineError(f"refusing to delete {path}: it is not inside {self.runs_dir} "
                                f"or {self.figures_dir}")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


class PipelineError(ValueError):
    """The pipeline file or a run's parameters are invalid, or the pipeline cannot run now."""


class PipelineBusy(PipelineError):
    """Another live process holds the pipeline's lock."""


def _expand_grid(spec: dict) -> list[Run]:
    grid = spec.get("grid") or {}
    base = spec.get("parameters") or {}
    depends_on = spec.get("depends_on") or []
    runs = []
    for combination in itertools.product(*grid.values()):
        suffix = "".join(f"-{name}{value}" for name, value in zip(grid, combination))
        runs.append(Run(
            name=spec["name"] + suffix,
            notebook=Path(spec["notebook"]),
            parameters={**base, **dict(zip(grid, combination))},
            group=spec["name"],
            depends_on=[depends_on] if isinstance(depends_on, str) else list(depends_on),
        ))
    return runs


def _spec_problem(spec: dict) -> str | None:
    """What is wrong with the shape of one run's entry in a pipeline file, if anything."""
    name = spec["name"]
    if not isinstance(name, str):
        return f"run name {name!r} is not a string"
    if not isinstance(spec.get("parameters") or {}, dict):
        return f"run {name!r}: 'parameters' must be a mapping"
    grid = spec.get("grid") or {}
    # An empty list would expand to no run at all, and the runs depending on it would then run
    # as if they depended on nothing.
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        return f"run {name!r}: 'grid' must map parameter names to non-empty lists of values"
    depends_on = spec.get("depends_on") or []
    if not isinstance(depends_on, (str, list)) or not all(isinstance(d, str) for d in depends_on):
        return f"run {name!r}: 'depends_on' must be a run name or a list of run names"
    return None


def _name_problem(name) -> str | None:
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        return "names may hold only letters, digits, '_', '-' and '.', and may not start with '.'"
    if name.endswith(RESERVED_SUFFIXES) or name in SUMMARY_FILES:
        return (f"a name ending in {' or '.join(RESERVED_SUFFIXES)}, or named like a summary, "
                "would share a file with another run or the summary")
    return None


def name_problems(pipeline: Pipeline) -> list[str]:
    """Names that are not safe file names, or that two runs share (their folders would be one)."""
    problems = []
    if problem := _name_problem(pipeline.name):
        problems.append(f"pipeline name {pipeline.name!r}: {problem}")
    seen: dict[str, Run] = {}
    for run in pipeline.runs:
        if problem := _name_problem(run.name):
            problems.append(f"run {run.name!r}" + (f" (from the grid of {run.group!r})"
                                                   if run.group != run.name else "") + f": {problem}")
        # Lower-cased: on macOS and Windows file systems "Run" and "run" are one folder.
        if (other := seen.setdefault(run.name.lower(), run)) is not run:
            origins = [f"the grid of {r.group!r}" if r.group != r.name else f"run {r.name!r}"
                       for r in (other, run)]
            problems.append(f"run name {run.name!r} is used twice ({origins[0]} and {origins[1]}); "
                            "they would share their folders")
    return problems


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
        if problem := _spec_problem(run_spec):
            raise PipelineError(f"{path}: {problem}")
        name = run_spec["name"]
        if any(run.group == name for run in runs):
            raise PipelineError(f"{path}: duplicate run name {name!r}")
        expanded = _expand_grid(run_spec)
        for dependency in expanded[0].depends_on:
            if not any(run.group == dependency for run in runs):
                raise PipelineError(
                    f"{path}: run {name!r} depends on {dependency!r}, which is not an earlier run"
                )
        runs.extend(expanded)
    pipeline = Pipeline(spec.get("name") or path.stem, runs, Path(root), spec.get("defaults") or {},
                        dict(overrides or {}))
    if problems := name_problems(pipeline):
        raise PipelineError(f"{path}: " + "; ".join(problems))
    return pipeline


def notebook_parameters(notebook: Path) -> dict[str, str]:
    """{name: the default's source text} of the notebook's parameters cell."""
    import papermill

    return {name: info["default"] for name, info in papermill.inspect_notebook(str(notebook)).items()}


def _expected_type(default_source: str) -> tuple[tuple[type, ...], str] | None:
    """The types a parameter may take given its default, with their name; None: any value."""
    try:
        default = ast.literal_eval(default_source)
    except (ValueError, TypeError, SyntaxError):  # an expression: nothing to compare with
        return None
    if isinstance(default, bool):
        return (bool,), "a bool"
    if isinstance(default, int):
        return (int,), "an int"
    if isinstance(default, float):
        return (int, float), "a number (int or float)"
    if isinstance(default, str):
        return (str,), "a string"
    if isinstance(default, (list, tuple)):
        return (list, tuple), "a list"
    if isinstance(default, dict):
        return (dict,), "a mapping"
    return None


def _type_problem(value, default_source: str) -> str | None:
    expected = _expected_type(default_source)
    if expected is None:
        return None
    types, described = expected
    # bool is an int to Python; a YAML `true` where a count belongs is a mistake all the same.
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return None
    hint = (" (YAML reads 1e-3 as a string: write 1.0e-3)"
            if float in types and isinstance(value, str) and _is_number(value) else "")
    return f"= {value!r} ({type(value).__name__}), expected {described}{hint}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _resolve(value, pipeline: Pipeline):
    if isinstance(value, str):
        return value.replace("{runs_dir}", str(pipeline.runs_dir)).replace(
            "{figures_dir}", str(pipeline.figures_dir))
    if isinstance(value, list):
        return [_resolve(item, pipeline) for item in value]
    if isinstance(value, dict):
        return {key: _resolve(item, pipeline) for key, item in value.items()}
    return value


# TrainConfig fields the studies set themselves (`studies.train_arms`), with the parameter that
# does: in `finetune` or `arms` they would change a fine-tune's recipe, never what it trains.
STUDY_SET_FIELDS = {"model": "base_checkpoint", "data": "data",
                    "image_root": "the data's manifest (describe-mmeb --image-root)",
                    "on_error": "on_error", "seed": "seeds", "output_dir": "train_dir"}


def _train_config_problems(run: Run, parameters: dict) -> list[str]:
    finetune = parameters.get("finetune")
    arms = parameters.get("arms")
    if not isinstance(finetune, dict) and not isinstance(arms, dict):
        return []
    from llave_kit.train import TrainConfig  # imports torch: only for pipelines that train

    def problem(where: str, fields: dict) -> list[str]:
        if owned := sorted(set(fields) & set(STUDY_SET_FIELDS)):
            instead = "; ".join(f"{name} comes from {STUDY_SET_FIELDS[name]}" for name in owned)
            return [f"run {run.name!r}: {where}: the studies set {owned} themselves ({instead})"]
        try:
            TrainConfig.check_types(fields)
        except ValueError as error:
            return [f"run {run.name!r}: {where}: {error}"]
        return []

    problems = problem("parameter 'finetune'", finetune) if isinstance(finetune, dict) else []
    # An arm trains with the shared fields too (its loss_kwargs are checked against its own loss),
    # unless those are already reported.
    shared = finetune if isinstance(finetune, dict) and not problems else {}
    for arm, fields in (arms if isinstance(arms, dict) else {}).items():
        if isinstance(fields, dict):
            problems += problem(f"parameter 'arms', arm {arm!r}", {**shared, **fields})
        else:
            problems.append(f"run {run.name!r}: parameter 'arms', arm {arm!r} = {fields!r}, "
                            "expected a mapping of TrainConfig fields")
    return problems


def check_parameters(pipeline: Pipeline) -> dict[str, tuple[dict, set[str]]]:
    """Check every run before any starts; all problems are raised together, one per run and
    parameter, as a PipelineError.

    Checked: names (`name_problems`), that each notebook exists, that it declares each parameter
    given to it (papermill would silently ignore the others), that each value has the type of the
    notebook's default, and TrainConfig's types for `finetune` and each of `arms`. Returns, per
    run, the parameters its notebook will get (defaults it declares, then the run's own, then
    overrides it declares; `{runs_dir}`/`{figures_dir}` expanded) and the names it declares.
    """
    problems = name_problems(pipeline)
    signatures = {notebook: notebook_parameters(pipeline.root / notebook)
                  for notebook in {run.notebook for run in pipeline.runs}
                  if (pipeline.root / notebook).exists()}
    planned = {}
    for run in pipeline.runs:
        if run.notebook not in signatures:
            problems.append(f"run {run.name!r}: notebook {run.notebook} does not exist")
            continue
        declared = signatures[run.notebook]
        if unknown := set(run.parameters) - set(declared):
            problems.append(
                f"run {run.name!r}: {run.notebook} has no parameter(s) {sorted(unknown)}; "
                f"it declares {sorted(declared)}"
            )
        defaults = {k: v for k, v in pipeline.defaults.items() if k in declared}
        overrides = {k: v for k, v in pipeline.overrides.items() if k in declared}
        parameters = _resolve({**defaults, **run.parameters, **overrides}, pipeline)
        for name, value in parameters.items():
            if name in declared and (problem := _type_problem(value, declared[name])):
                problems.append(f"run {run.name!r}: parameter {name!r} {problem}")
        problems += _train_config_problems(run, parameters)
        planned[run.name] = (parameters, set(declared))
    declared_anywhere = set().union(*signatures.values())
    for kind, values in (("defaults", pipeline.defaults), ("overrides", pipeline.overrides)):
        if unused := set(values) - declared_anywhere:
            problems.append(f"{kind} {sorted(unused)} are declared by no notebook of the pipeline")
    if problems:
        raise PipelineError("; ".join(problems))
    return planned


# --------------------------------------------------------------------------------------------------
# Execution


@dataclass
class Outcome:
    run: Run
    status: str  # "ran", "cached", "failed" or "blocked"
    seconds: float = 0.0
    error: str | None = None
    fingerprint: str = ""
    result_id: str | None = None  # of the execution whose results a success stands for

    @property
    def succeeded(self) -> bool:
        return self.status in ("ran", "cached")


def _fingerprint(pipeline: Pipeline, run: Run, parameters: dict, upstream: list[str | None]) -> str:
    digest = hashlib.sha256((pipeline.root / run.notebook).read_bytes())
    digest.update(json.dumps(parameters, sort_keys=True, default=str).encode())
    # The results this run was made from: an upstream run executed again, even with unchanged
    # inputs, has a new result id. (None: a record written before result ids existed.)
    digest.update("".join(str(result_id) for result_id in upstream).encode())
    return digest.hexdigest()


def _record_path(pipeline: Pipeline, run: Run) -> Path:
    return pipeline.runs_dir / f"{run.name}.record.json"


def _cached_record(pipeline: Pipeline, run: Run, fingerprint: str) -> dict | None:
    """The run's record if it succeeded with this fingerprint and its executed copy is there."""
    record_path = _record_path(pipeline, run)
    if not record_path.exists() or not (pipeline.runs_dir / f"{run.name}.ipynb").exists():
        return None
    record = json.loads(record_path.read_text())
    return record if record.get("status") == "ok" and record.get("fingerprint") == fingerprint else None


def _execute(pipeline: Pipeline, run: Run, parameters: dict, declared: set[str],
             fingerprint: str) -> Outcome:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    executed = pipeline.runs_dir / f"{run.name}.ipynb"
    partial = pipeline.runs_dir / f".{run.name}.partial.ipynb"
    staging = pipeline.figures_dir / ".staging" / run.name
    final_figures = pipeline.figures_dir / run.name
    # Until this run finishes, nothing of its earlier results may pass for current: a pipeline
    # killed here must neither skip it next time nor show its old figures (nor, should the
    # kernel not start, present a killed run's partial copy as this one's).
    for path in (_record_path(pipeline, run), partial, staging, final_figures):
        pipeline.delete(path)
    automatic = {"output_dir": str(pipeline.runs_dir / run.name), "figures_dir": str(staging)}
    parameters = {**{k: v for k, v in automatic.items() if k in declared}, **parameters}
    if parameters.get("output_dir") == automatic["output_dir"]:
        # The run's folder belongs to the pipeline: a re-run starts from an empty one.
        pipeline.delete(Path(automatic["output_dir"]))
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
    pipeline.delete(executed)
    if partial.exists():
        os.replace(partial, executed)  # a failed run keeps its executed copy, error included
    if error is None and staging.exists():
        os.replace(staging, final_figures)
    pipeline.delete(staging)
    result_id = uuid.uuid4().hex if error is None else None
    record = {"status": "ok" if error is None else "failed", "fingerprint": fingerprint,
              "result_id": result_id, "seconds": round(seconds, 2), "error": error,
              "parameters": parameters}
    write_text(_record_path(pipeline, run), json.dumps(record, indent=1, default=str))
    return Outcome(run, "ran" if error is None else "failed", seconds, error, fingerprint, result_id)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _lock_holder(lock: Path) -> int | None:
    """The PID of the live process holding `lock`; None when it is free or its holder died."""
    try:
        text = lock.read_text().strip()
    except FileNotFoundError:
        return None
    # An empty or garbled file: its writer died between creating and writing it (both happen
    # under the guard in _lock, so no live process is half-way there).
    pid = int(text) if text.isdigit() else 0
    return pid if pid > 0 and _process_alive(pid) else None


@contextmanager
def _lock(pipeline: Pipeline) -> Iterator[None]:
    """Hold `runs/<pipeline>/.lock` while the body runs; PipelineBusy if a live process holds it."""
    import fcntl  # POSIX only; notebooks import this module (record_metrics) on any system

    lock = pipeline.runs_dir / LOCK_FILE
    pipeline.runs_dir.mkdir(parents=True, exist_ok=True)
    guard = os.open(pipeline.runs_dir, os.O_RDONLY)
    try:
        # Serialises looking at the lock with taking it, so two processes never both take over
        # one stale lock; the kernel drops it when its holder dies, and it is held for
        # microseconds.
        fcntl.flock(guard, fcntl.LOCK_EX)
        if (holder := _lock_holder(lock)) is not None:
            raise PipelineBusy(f"pipeline {pipeline.name!r} is being run by process {holder} "
                               f"(it holds {lock}); wait for it to finish, or delete the lock "
                               f"if process {holder} is not running this pipeline")
        pipeline.delete(lock)  # a dead process's
        descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(descriptor, "w") as file:
            file.write(f"{os.getpid()}\n")
    finally:
        os.close(guard)
    try:
        yield
    finally:
        pipeline.delete(lock)


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

    Every run is checked first (`check_parameters`), and the pipeline's lock is held throughout
    (PipelineBusy while another process runs it). `log` receives one line as each run starts and
    ends, saying which run of how many and the time elapsed; by default they are printed at once.
    """
    log = log or _print_now
    planned = check_parameters(pipeline)
    with _lock(pipeline):
        for name in SUMMARY_FILES:  # until this invocation finishes, none claims to be current
            pipeline.delete(pipeline.figures_dir / name)
        started = time.perf_counter()
        outcomes: dict[str, Outcome] = {}
        for number, run in enumerate(pipeline.runs, 1):
            prefix = f"[{pipeline.name}] {number}/{len(pipeline.runs)} {run.name}"
            upstream = [outcomes[dep.name] for group in run.depends_on for dep in pipeline.group(group)]
            parameters, declared = planned[run.name]
            fingerprint = _fingerprint(pipeline, run, parameters, [o.result_id for o in upstream])
            if any(not o.succeeded for o in upstream):
                failed = sorted({o.run.name for o in upstream if not o.succeeded})
                outcome = Outcome(run, "blocked", error=f"not run: {', '.join(failed)} did not succeed")
            elif not force and (record := _cached_record(pipeline, run, fingerprint)):
                outcome = Outcome(run, "cached", fingerprint=fingerprint, result_id=record.get("result_id"))
            else:
                log(f"{prefix}: running {run.notebook.as_posix()} "
                    f"(elapsed {duration(time.perf_counter() - started)})")
                outcome = _execute(pipeline, run, parameters, declared, fingerprint)
            outcomes[run.name] = outcome
            log(f"{prefix}: {_describe(outcome)}")
        pipeline.delete(pipeline.figures_dir / ".staging")  # each run's staging folder has gone
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
