"""Study recipes: the steps the notebooks share, so a notebook is parameters, calls and plots.

    data = load_data("scenes", "runs/data/scenes")                   # built-in, or an MMEB folder
    model, result = train_embedder("tiny-qwen2-vl", data, "runs/train",
                                   loss="info_nce", temperature=0.05, max_steps=300)
    table = evaluate_embedder(model, data, levels=("hard", "random"))  # one row per task and level

Comparisons run every arm over several training seeds from one shared start and judge them with
intervals, never with single numbers:

    runs = train_arms({"info_nce": {...}, "weighted": {...}}, before, data, "runs/finetunes",
                      seeds=[0, 1, 2], max_steps=300)                  # stored by recipe, reused
    samples = stack_scores(score_arms({"before": [before], **runs}, data))  # per query and seed
    arm_intervals(samples)                 # mean and 95 % CI of P@1, similarities, gap, AUROC
    paper_readings(samples, "before", "info_nce", "weighted")   # differences, CIs, verdicts

The alpha sweep, the ablation ladder and the temperature-matched control are lists of *variants*
(TrainConfig fields plus a "label"), trained and scored by `run_variants`. `pretrain` makes the
kit's shipped starting checkpoints from configs/pretrain_*.yaml.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from llave_kit.data import DatasetInfo, check_on_error, load_image, open_mmeb_folder
from llave_kit.digits import make_digits_dataset
from llave_kit.encoders import CPU_MODELS, Embedder, load_embedder
from llave_kit.evaluation import (
    ListScores,
    embed_eval_dataset,
    embed_in_batches,
    hardest_negatives,
    model_fingerprint,
    score_eval_set,
)
from llave_kit.files import staged_directory, write_text
from llave_kit.scenes import make_scenes_dataset
from llave_kit.statistics import (
    Interval,
    Statistic,
    auroc_of,
    bootstrap_ci,
    compound_verdict,
    difference,
    mean_of,
    verdict,
)
from llave_kit.train import TrainConfig, TrainResult, train

BUILT_IN_DATA = ("scenes", "digits")
TRAIN_FIELDS = frozenset(TrainConfig.__dataclass_fields__)
_EMBEDDING = {"batch_size": 128, "progress": False}  # how studies embed: large batches, no bars


def load_data(data: str, data_dir: str | Path | None = None, *, n_train: int | None = None,
              n_eval: int | None = None, on_error: str = "raise", **generator_parameters
              ) -> DatasetInfo:
    """A built-in data set ("scenes", "digits"; generated once into `data_dir`) or an MMEB folder
    (`open_mmeb_folder`: its manifest.json, else the files as published).

    n_train / n_eval size the scenes data (pairs and eval queries per task); the digits set and
    a folder are read as they are, so notebooks pass the same parameters whatever `data` is.
    on_error ("raise" or "skip" bad records) is the default of every dataset built from it.
    """
    check_on_error(on_error)
    if data == "scenes":
        sizes = {k: v for k, v in (("n_train", n_train), ("n_eval", n_eval)) if v is not None}
        info = make_scenes_dataset(_required(data_dir, data), **sizes, **generator_parameters)
        return replace(info, on_error=on_error)
    if data == "digits":
        info = make_digits_dataset(_required(data_dir, data), **generator_parameters)
        return replace(info, on_error=on_error)
    if generator_parameters:
        raise ValueError(f"generator parameters {sorted(generator_parameters)} only apply to "
                         f"built-in data {BUILT_IN_DATA}, not to the folder {data!r}")
    if n_train is not None or n_eval is not None:
        warnings.warn(f"n_train / n_eval size the built-in scenes data; the folder {data!r} is "
                      "read as it is", stacklevel=2)
    return open_mmeb_folder(data, on_error=on_error)


def _required(data_dir, data: str) -> str | Path:
    if data_dir is None:
        raise ValueError(f"built-in data {data!r} needs a data_dir to be generated into")
    return data_dir


def load_model(model: str, data: DatasetInfo | None = None, **kwargs) -> Embedder:
    """A default CPU model (tokenizer built from the data's vocabulary), a checkpoint or a hub id."""
    vocabulary = data.vocabulary() if data is not None and model in CPU_MODELS else None
    return load_embedder(model, vocabulary=vocabulary, **kwargs)


def train_embedder(
    model: str | Embedder, data: DatasetInfo, output_dir: str | Path, *,
    tasks: Sequence[str] | None = None, **train_parameters,
) -> tuple[Embedder, TrainResult]:
    """Train `model` (a name/path to load, or an embedder) on `data`'s training pairs."""
    embedder = load_model(model, data) if isinstance(model, str) else model
    config = TrainConfig.from_dict({**train_parameters, "output_dir": str(output_dir)})
    result = train(config, embedder, data.train_dataset(tasks))
    return embedder, result


def pretrain(recipe_file: str | Path, out_dir: str | Path, work_dir: str | Path = "runs/pretrain",
             ) -> dict:
    """Make a starting checkpoint by a recipe file (configs/pretrain_*.yaml) and ship it.

    The recipe names a scenes draw (`data`: generator parameters) and TrainConfig fields
    (`train`, with `model`). The trained model lands in `out_dir` in one rename, with
    pretraining.json beside it: the recipe, the training time, the torch build and thread count
    (CPU results are reproducible for a fixed pair), and P@1 per task on hard and random lists.
    """
    recipe = yaml.safe_load(Path(recipe_file).read_text())
    unknown = sorted(set(recipe) - {"name", "data", "train"})
    if unknown or "model" not in recipe.get("train", {}):
        raise ValueError(f"{recipe_file}: expected keys name, data, train (with train.model); "
                         f"unexpected {unknown}")
    work = Path(work_dir)
    data = load_data("scenes", work / f"data-seed{recipe['data'].get('seed', 0)}", **recipe["data"])
    train_parameters = dict(recipe["train"])
    model_name = train_parameters.pop("model")
    started = time.perf_counter()
    model, result = train_embedder(model_name, data, work / recipe["name"], overwrite=True,
                                   **train_parameters)
    seconds = time.perf_counter() - started
    table = evaluate_embedder(model, data, levels=("hard", "random"))
    card = {"recipe": recipe, "recipe_file": Path(recipe_file).as_posix(),
            "train_seconds": round(seconds, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "final_loss": result.history[-1]["loss"],
            "p@1": table.groupby("level")["p@1"].mean().round(4).to_dict(),
            "p@1_by_task": {level: rows.set_index("task")["p@1"].round(4).to_dict()
                            for level, rows in table.groupby("level")}}
    with staged_directory(out_dir, overwrite=True) as stage:
        shutil.copytree(result.final_model_path, stage, dirs_exist_ok=True)
        write_text(stage / "pretraining.json", json.dumps(card, indent=1) + "\n")
    return card


# --------------------------------------------------------------------------------------------------
# Evaluation


def _scored_tasks(model: Embedder, data: DatasetInfo, levels: Iterable[str], tasks, cache_dir,
                  k: int) -> Iterator[tuple[str, str, ListScores]]:
    """(task, level, `evaluation.score_eval_set` of its lists) for every eval file present."""
    model_key = model_fingerprint(model) if cache_dir is not None else None  # hash weights once
    for task in tasks or data.tasks:
        for level in levels:
            if level in data.levels(task):
                lists = data.eval_dataset(task, level, check_images=False)  # opened as embedded
                yield task, level, score_eval_set(model, lists, k=k, cache_dir=cache_dir,
                                                  model_key=model_key, **_EMBEDDING)


def evaluate_tasks(
    model: Embedder, data: DatasetInfo, levels: Iterable[str] = ("hard",),
    tasks: Sequence[str] | None = None, cache_dir: str | Path | None = None, k: int = 5,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """One embedding pass per (task, level) that has an eval file; returns both
    `evaluate_embedder`'s table and `similarity_pools`' samples (pooled over every row)."""
    levels = list(levels)
    rows, pools = [], {"positive": [], "hard": [], "easy": []}
    for task, level, scores in _scored_tasks(model, data, levels, tasks, cache_dir, k):
        rows.append({"task": task, "meta_task": data.meta_task(task), "level": level,
                     **scores.metrics()})
        if scores.stats is not None:
            for role, values in scores.stats.distributions().items():
                pools[role].append(values)
    if not rows:
        raise ValueError(f"{data.root}: no eval files for levels {levels} in tasks "
                         f"{list(tasks or data.tasks)}")
    return pd.DataFrame(rows), {role: np.concatenate(v) if v else np.empty(0)
                                for role, v in pools.items()}


def evaluate_embedder(model, data: DatasetInfo, levels: Iterable[str] = ("hard",),
                      tasks: Sequence[str] | None = None, cache_dir=None, k: int = 5) -> pd.DataFrame:
    """P@1, MRR, Recall@k and the Table-1 similarity means, one row per (task, level)."""
    return evaluate_tasks(model, data, levels, tasks, cache_dir, k)[0]


def similarity_pools(model, data: DatasetInfo, level: str = "hard",
                     tasks: Sequence[str] | None = None, cache_dir=None,
                     k: int = 5) -> dict[str, np.ndarray]:
    """Positive, top-k hard and bottom-k easy similarities pooled over tasks (Table-1 samples)."""
    return evaluate_tasks(model, data, (level,), tasks, cache_dir, k)[1]


def pooled_distributions(scores: Sequence[QueryScores]) -> dict[str, np.ndarray]:
    """{positive, hard, easy} similarities of every seed's runs, flat (for histograms)."""
    return {role: np.concatenate([getattr(run, role).ravel() for run in scores])
            for role in ("positive", "hard", "easy")}


def hardest_failures(model: Embedder, data: DatasetInfo, task: str, level: str = "hard",
                     n: int = 6, cache_dir=None) -> list[dict]:
    """The `n` queries whose best wrong candidate beats the positive by the widest margin."""
    dataset = data.eval_dataset(task, level)
    queries, candidates = embed_eval_dataset(model, dataset, cache_dir=cache_dir, **_EMBEDDING)
    if candidates.shape[1] < 2:
        raise ValueError(f"task {task!r} ({level}) has a single candidate: nothing can beat it")
    best_wrong, margins = hardest_negatives(queries, candidates)
    failures = []
    for q in np.argsort(-margins)[:n]:
        if margins[q] < 0:
            break
        item = dataset[int(q)]
        failures.append({"query_text": item["query_text"], "query_image": item["query_image"],
                         "chosen_text": item["candidate_texts"][best_wrong[q]],
                         "chosen_image": item["candidate_images"][best_wrong[q]],
                         "positive_text": item["candidate_texts"][0],
                         "positive_image": item["candidate_images"][0],
                         "margin": float(margins[q])})
    return failures


def embed_images(model: Embedder, images: Sequence, cache_dir=None) -> np.ndarray:
    """Image-only query embeddings (N, D), e.g. for clustering."""
    return embed_in_batches(model.encode_queries, [""] * len(images), list(images),
                            cache_dir=cache_dir, **_EMBEDDING,
                            cache_key=None if cache_dir is None else model_fingerprint(model))


def labelled_images(data: DatasetInfo, label: str, **conditions) -> tuple[list, np.ndarray]:
    """Images of `data` whose labels.jsonl row matches `conditions`, with their `label` values."""
    rows = [row for row in data.labels()
            if all(row.get(key) == value for key, value in conditions.items())
            and row.get(label) is not None]
    if not rows:
        raise ValueError(f"{data.root}: no labelled images match {conditions} with a {label!r}")
    images = [load_image(data.image_root / row["image_path"]) for row in rows]
    return images, np.array([row[label] for row in rows])


# --------------------------------------------------------------------------------------------------
# Comparing training recipes


def matched_temperature(temperature: float, alpha: float) -> float:
    """tau' with 1/tau' = 1/tau + alpha: InfoNCE whose negatives' logits s/tau' equal the
    weighted loss's s/tau + alpha*s (but with a sharper positive and no stop-gradient)."""
    return 1.0 / (1.0 / temperature + alpha)


def alpha_sweep_variants(alphas: Iterable[float], temperature: float,
                         matched_alphas: Iterable[float] = ()) -> list[dict]:
    """Hardness weighting at each alpha (alpha 0 is InfoNCE), and InfoNCE at the matched
    temperature (`matched_temperature`) beside each alpha of `matched_alphas`."""
    matched_alphas = {float(a) for a in matched_alphas}
    variants = []
    for alpha in alphas:
        loss = {"loss": "hardness_weighted", "alpha": float(alpha)} if alpha else {"loss": "info_nce"}
        variants.append({"label": f"weighted a={alpha:g}", "group": "hardness weighting",
                         "alpha_value": float(alpha), "temperature": temperature, **loss})
        if alpha and float(alpha) in matched_alphas:
            variants.append({"label": f"InfoNCE tau'={matched_temperature(temperature, alpha):.4f}",
                             "group": "temperature-matched InfoNCE", "alpha_value": float(alpha),
                             "loss": "info_nce",
                             "temperature": matched_temperature(temperature, alpha)})
    return variants


def ablation_ladder_variants(batch_size: int, pool_factor: int, alpha: float,
                             temperature: float) -> list[dict]:
    """LLaVE's ablation order. One process sees `pool_factor` x more negatives exactly as
    cross-device gather over `pool_factor` devices would (the loss contract makes them equal); like
    such a run, it also sees `pool_factor` x more pairs in the same number of steps."""
    pooled = batch_size * pool_factor
    rungs = [
        {"label": "1 InfoNCE", "loss": "info_nce", "batch_size": batch_size},
        {"label": f"2 + gather (x{pool_factor} negatives)", "loss": "info_nce", "batch_size": pooled},
        {"label": "3 + focal", "loss": "focal_info_nce", "batch_size": pooled},
        {"label": "4 + hardness weighting", "loss": "hardness_weighted", "alpha": alpha,
         "batch_size": pooled},
    ]
    return [{**rung, "temperature": temperature} for rung in rungs]


# --------------------------------------------------------------------------------------------------
# Arms over seeds: train once, score per query, bootstrap the comparison


def train_arms(
    arms: Mapping[str, dict], base: str, data: DatasetInfo, output_root: str | Path, *,
    seeds: Sequence[int] = (0, 1, 2), tasks: Sequence[str] | None = None, **common_parameters,
) -> dict[str, list[Path]]:
    """Fine-tune `base` once per (arm, seed); the final models, per arm in seed order.

    arms: {name: TrainConfig fields} (e.g. {"info_nce": {"loss": "info_nce"}, "weighted":
    {"loss": "hardness_weighted", "alpha": 9}}); `common_parameters` are shared by every arm.
    Runs are stored by recipe (start weights, data, tasks, training fields) in
    output_root/<hash of the recipe>/, with recipe.json beside the model: a recipe that was
    trained before, by this study or another one sharing output_root, is loaded, not retrained.
    """
    start = model_fingerprint(load_model(base, data))
    checkpoints: dict[str, list[Path]] = {}
    for name, arm in arms.items():
        unknown = sorted(set(arm) - TRAIN_FIELDS)
        if unknown:
            raise ValueError(f"arm {name!r}: {unknown} are not TrainConfig fields")
        checkpoints[name] = []
        for seed in seeds:
            parameters = {**common_parameters, **arm, "seed": seed}
            recipe = {"base": start, "data": _data_identity(data),
                      "tasks": list(tasks) if tasks else None, "train": parameters}
            text = json.dumps(recipe, sort_keys=True, indent=1)
            run_dir = Path(output_root) / hashlib.sha256(text.encode()).hexdigest()[:16]
            stored = run_dir / "recipe.json"
            if not (stored.exists() and stored.read_text() == text and (run_dir / "final").exists()):
                stored.unlink(missing_ok=True)  # until training ends, the folder is not reusable
                train_embedder(base, data, run_dir, tasks=tasks, overwrite=True, **parameters)
                write_text(stored, text)
            checkpoints[name].append(run_dir / "final")
    return checkpoints


def _data_identity(data: DatasetInfo):
    """What decides a fine-tune's training data, for its recipe.

    A generated data set (its manifest records a seed) is its generator's parameters, the same
    wherever its folder lies; an MMEB folder is its training files (path, size, modification time)
    and how bad records are treated, so two folders sharing a train_dir never share a fine-tune.
    """
    if data.manifest["seed"] is not None:
        return data.manifest["parameters"]
    files = [(str(path.resolve()), (stat := path.stat()).st_size, stat.st_mtime_ns)
             for task in data.tasks if data.task(task)["train"] for path in data.train_paths(task)]
    return {"train_files": files, "on_error": data.on_error}


@dataclass(frozen=True)
class QueryScores:
    """One model's per-query results on one level, every task's queries in a row.

    hit (Q,): 1 when the positive ranks first (P@1's indicator, ties against the positive);
    positive (Q,); hard (Q, k): the k most similar wrong candidates; easy (Q, k): the k least.
    """

    hit: np.ndarray
    positive: np.ndarray
    hard: np.ndarray
    easy: np.ndarray
    task: np.ndarray

    FIELDS = ("hit", "positive", "hard", "easy")

    def subset(self, keep: np.ndarray) -> QueryScores:
        """The queries where `keep` (a (Q,) bool mask) is true."""
        return QueryScores(*(getattr(self, name)[keep] for name in (*self.FIELDS, "task")))


def query_scores(model: Embedder, data: DatasetInfo, level: str = "hard",
                 tasks: Sequence[str] | None = None, k: int = 5, cache_dir=None) -> QueryScores:
    """Per-query P@1 hits and Table-1 similarities of `model` on every task's `level` lists."""
    parts = []
    for task, _, scores in _scored_tasks(model, data, (level,), tasks, cache_dir, k):
        if scores.stats is None:
            raise ValueError(f"task {task!r} ({level}) has single-candidate lists: nothing to rank")
        hit = (scores.ranks == 1).astype(np.float64)
        stats = scores.stats
        parts.append((hit, stats.positive, stats.hard, stats.easy, np.full(len(hit), task)))
    if not parts:
        raise ValueError(f"{data.root}: no {level!r} eval files in tasks {list(tasks or data.tasks)}")
    return QueryScores(*(np.concatenate(column) for column in zip(*parts)))


def score_arms(checkpoints: Mapping[str, Sequence], data: DatasetInfo, *, level: str = "hard",
               tasks: Sequence[str] | None = None, k: int = 5, cache_dir=None,
               device=None) -> dict[str, list[QueryScores]]:
    """`query_scores` of every checkpoint (a path or an embedder), per arm in seed order."""
    def scores(model):
        embedder = load_model(str(model), data, device=device) if isinstance(model, (str, Path)) \
            else model
        return query_scores(embedder, data, level, tasks, k, cache_dir)

    return {arm: [scores(model) for model in models] for arm, models in checkpoints.items()}


def stack_scores(scores: Mapping[str, Sequence[QueryScores]]) -> dict[str, np.ndarray]:
    """{"<arm>|<field>": (S, Q, ...)} for `statistics.bootstrap_ci`; seed s of every arm is row s.

    An arm with one model (the shared "before") is repeated S times: it has no seed noise.
    """
    n_seeds = max(len(runs) for runs in scores.values())
    samples = {}
    for arm, runs in scores.items():
        if "|" in arm:
            raise ValueError(f"arm name {arm!r}: '|' separates arm and field in the samples")
        if len(runs) not in (1, n_seeds):
            raise ValueError(f"arm {arm!r} has {len(runs)} seeds; others have {n_seeds}")
        tasks = [run.task for run in runs]
        if any(not np.array_equal(t, tasks[0]) for t in tasks):
            raise ValueError(f"arm {arm!r}: seeds were scored on different queries")
        for name in QueryScores.FIELDS:
            rows = [getattr(run, name) for run in runs] * (n_seeds // len(runs))
            samples[f"{arm}|{name}"] = np.stack(rows)
    return samples


METRICS = ("p@1", "positive", "hard", "easy", "gap", "auroc")


def arm_statistic(arm: str, metric: str) -> Statistic:
    """A statistic of one arm's samples: P@1, a Table-1 mean, the gap or AUROC (pos vs hard)."""
    column = lambda name: f"{arm}|{name}"  # noqa: E731
    if metric == "p@1":
        return mean_of(column("hit"))
    if metric in ("positive", "hard", "easy"):
        return mean_of(column(metric))
    if metric == "gap":
        return difference(mean_of(column("positive")), mean_of(column("hard")))
    if metric == "auroc":
        return auroc_of(column("positive"), column("hard"))
    raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")


def _interval(samples, statistic: Statistic, arms: Sequence[str], n_resamples: int) -> Interval:
    # Resample only the arrays the statistic reads: every array costs time in every resample.
    needed = {key: value for key, value in samples.items() if key.split("|")[0] in arms}
    return bootstrap_ci(needed, statistic, n_resamples=n_resamples)


def arm_intervals(samples: Mapping[str, np.ndarray], metrics: Sequence[str] = METRICS,
                  n_resamples: int = 2000) -> pd.DataFrame:
    """Mean and 95 % CI of each metric for each arm: rows (arm, metric, mean, ci_low, ci_high)."""
    arms = list(dict.fromkeys(key.split("|")[0] for key in samples))
    return pd.DataFrame([
        {"arm": arm, "metric": metric,
         **_interval(samples, arm_statistic(arm, metric), [arm], n_resamples).as_dict()}
        for arm in arms for metric in metrics])


def effect(samples, reading: str, statistic: Statistic, arms: Sequence[str], direction: int,
           n_resamples: int = 2000) -> dict:
    """{reading, estimate, ci_low, ci_high, verdict}: the paper expects sign `direction`."""
    interval = _interval(samples, statistic, arms, n_resamples)
    return {"reading": reading, "estimate": interval.estimate, "ci_low": interval.ci_low,
            "ci_high": interval.ci_high, "verdict": verdict(interval, direction)}


def arm_difference(samples, a: str, b: str, metric: str, reading: str, direction: int = +1,
                   n_resamples: int = 2000) -> dict:
    """`effect` of metric(a) - metric(b), paired over shared seeds and queries."""
    statistic = difference(arm_statistic(a, metric), arm_statistic(b, metric))
    return effect(samples, reading, statistic, [a, b], direction, n_resamples)


def paper_readings(samples: Mapping[str, np.ndarray], before: str, info_nce: str, weighted: str,
                   n_resamples: int = 2000) -> pd.DataFrame:
    """LLaVE's Table-1 readings, each an estimate with a 95 % CI and a verdict.

    "reproduced": the CI excludes 0 in the paper's direction; "contradicted": it excludes 0 the
    other way; "inconclusive": it contains 0. A reading that something *falls* also needs the
    fall itself to be backed (a compound verdict), not only a difference of two changes.
    """
    fall = lambda model, role: difference(arm_statistic(before, role),  # noqa: E731
                                          arm_statistic(model, role))
    both = [before, weighted]
    rows = [
        arm_difference(samples, weighted, info_nce, "p@1",
                       "weighting raises hard-list P@1 over InfoNCE", +1, n_resamples),
        arm_difference(samples, weighted, info_nce, "gap",
                       "weighting widens the positive-hard gap more than InfoNCE", +1, n_resamples),
        arm_difference(samples, weighted, info_nce, "auroc",
                       "weighting separates positives from hard negatives better (AUROC)", +1,
                       n_resamples),
    ]
    hard_falls = effect(samples, "", fall(weighted, "hard"), both, +1, n_resamples)
    falls_more = effect(samples, "under weighting, hard-negative similarity falls, and by more "
                        "than positive similarity",
                        difference(fall(weighted, "hard"), fall(weighted, "positive")), both, +1,
                        n_resamples)
    falls_more["verdict"] = compound_verdict([falls_more["verdict"], hard_falls["verdict"]])
    beats_info_nce = arm_difference(samples, info_nce, weighted, "hard",
                                    "weighting lowers hard-negative similarity more than InfoNCE "
                                    "does (and it falls)", +1, n_resamples)
    beats_info_nce["verdict"] = compound_verdict([beats_info_nce["verdict"], hard_falls["verdict"]])
    rows += [falls_more, beats_info_nce,
             arm_difference(samples, weighted, info_nce, "positive",
                            "weighting lowers positive similarity too (paper: .71 -> .66)", -1,
                            n_resamples),
             arm_difference(samples, weighted, info_nce, "easy",
                            "easy negatives fall further under weighting", -1, n_resamples)]
    return pd.DataFrame(rows)


def meta_task_intervals(scores: Mapping[str, Sequence[QueryScores]], data: DatasetInfo,
                        metric: str = "p@1", n_resamples: int = 2000) -> pd.DataFrame:
    """`arm_intervals` of one metric within each meta-task (rows gain a "meta_task" column)."""
    first = next(iter(scores.values()))[0]
    tables = []
    for meta_task in dict.fromkeys(data.meta_task(task) for task in dict.fromkeys(first.task)):
        keep = np.isin(first.task, data.tasks_of(meta_task))
        subset = {arm: [run.subset(keep) for run in runs] for arm, runs in scores.items()}
        table = arm_intervals(stack_scores(subset), (metric,), n_resamples)
        tables.append(table.assign(meta_task=meta_task))
    return pd.concat(tables, ignore_index=True)


def intervals_record(table: pd.DataFrame, key: str = "arm") -> dict:
    """{metric: {arm: {mean, ci_low, ci_high}}} from `arm_intervals`-shaped rows, for summaries."""
    record: dict = {}
    for row in table.to_dict("records"):
        record.setdefault(row["metric"], {})[row[key]] = {
            name: float(row[name]) for name in ("mean", "ci_low", "ci_high")}
    return record


def run_variants(
    variants: Sequence[dict], model: str, data: DatasetInfo, output_root: str | Path, *,
    seeds: Sequence[int] = (0, 1, 2), level: str = "hard", tasks: Sequence[str] | None = None,
    cache_dir=None, **common_parameters,
) -> dict[str, list[QueryScores]]:
    """Train every variant for every seed from `model` (`train_arms`) and score it per query.

    A variant is a dict of TrainConfig fields plus a "label" (its arm name); other keys
    ("group", "alpha_value", ...) describe it for tables and plots and are not trained on.
    """
    arms = {v["label"]: {k: value for k, value in v.items() if k in TRAIN_FIELDS} for v in variants}
    if len(arms) != len(variants):
        raise ValueError("variant labels must be unique")
    checkpoints = train_arms(arms, model, data, output_root, seeds=seeds, tasks=tasks,
                             **common_parameters)
    return score_arms(checkpoints, data, level=level, tasks=tasks, cache_dir=cache_dir,
                      device=common_parameters.get("device"))  # score where the runs trained


def variant_intervals(variants: Sequence[dict], samples: Mapping[str, np.ndarray],
                      metrics: Sequence[str] = ("p@1", "gap", "auroc"),
                      n_resamples: int = 2000) -> pd.DataFrame:
    """`arm_intervals` with each variant's descriptive keys ("group", "alpha_value", ...)."""
    table = arm_intervals(samples, metrics, n_resamples).rename(columns={"arm": "label"})
    described = pd.DataFrame([{k: v for k, v in variant.items() if k not in TRAIN_FIELDS}
                              for variant in variants])
    return table.merge(described, on="label", how="left")
