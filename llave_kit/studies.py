"""Study recipes: the steps the notebooks share, so a notebook is parameters, calls and plots.

    data = load_data("scenes", "runs/data/scenes")                   # built-in, or an MMEB folder
    model, result = train_embedder("tiny-qwen2-vl", data, "runs/pretrain",
                                   loss="info_nce", temperature=0.05, max_steps=300)
    table = evaluate_embedder(model, data, levels=("hard", "random"))  # one row per task and level
    pools = similarity_pools(model, data, level="hard")               # Table-1 similarity samples

Comparisons of training recipes (the alpha sweep, the ablation ladder, the temperature-matched
control) are lists of *variants*: dicts of TrainConfig fields plus a "label", run by `run_variants`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from llave_kit.analysis import overlap_metrics, similarity_stats
from llave_kit.data import DatasetInfo, load_image, load_manifest, make_digits_dataset
from llave_kit.encoders import CPU_MODELS, LmmEmbedder, load_embedder
from llave_kit.evaluation import (
    candidate_list_metrics, embed_eval_dataset, embed_in_batches, model_fingerprint,
)
from llave_kit.scenes import make_scenes_dataset
from llave_kit.train import TrainConfig, TrainResult, train

BUILT_IN_DATA = ("scenes", "digits")


def load_data(data: str, data_dir: str | Path | None = None, **generator_parameters) -> DatasetInfo:
    """A built-in data set ("scenes", "digits"; generated once into `data_dir`) or an MMEB folder."""
    if data == "scenes":
        return make_scenes_dataset(_required(data_dir, data), **generator_parameters)
    if data == "digits":
        return make_digits_dataset(_required(data_dir, data), **generator_parameters)
    if generator_parameters:
        raise ValueError(f"generator parameters {sorted(generator_parameters)} only apply to "
                         f"built-in data {BUILT_IN_DATA}, not to the folder {data!r}")
    return load_manifest(data)


def _required(data_dir, data: str) -> str | Path:
    if data_dir is None:
        raise ValueError(f"built-in data {data!r} needs a data_dir to be generated into")
    return data_dir


def load_model(model: str, data: DatasetInfo | None = None, **kwargs) -> LmmEmbedder:
    """A default CPU model (tokenizer built from the data's vocabulary), a checkpoint or a hub id."""
    vocabulary = data.vocabulary() if data is not None and model in CPU_MODELS else None
    return load_embedder(model, vocabulary=vocabulary, **kwargs)


def train_embedder(
    model: str | LmmEmbedder, data: DatasetInfo, output_dir: str | Path, *,
    tasks: Sequence[str] | None = None, **train_parameters,
) -> tuple[LmmEmbedder, TrainResult]:
    """Train `model` (a name/path to load, or an embedder) on `data`'s training pairs."""
    embedder = load_model(model, data) if isinstance(model, str) else model
    config = TrainConfig.from_dict({**train_parameters, "output_dir": str(output_dir)})
    result = train(config, embedder, data.train_dataset(tasks))
    return embedder, result


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_tasks(
    model, data: DatasetInfo, levels: Iterable[str] = ("hard",), tasks: Sequence[str] | None = None,
    cache_dir: str | Path | None = None, k: int = 5,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """One embedding pass per (task, level) that has an eval file; returns both
    `evaluate_embedder`'s table and `similarity_pools`' samples (pooled over every row)."""
    model_key = model_fingerprint(model) if cache_dir is not None else None  # hash weights once
    rows, pools = [], {"positive": [], "hard": [], "easy": []}
    for task in tasks or data.tasks:
        for level in levels:
            if level not in data.levels(task):
                continue
            queries, candidates = embed_eval_dataset(
                model, data.eval_dataset(task, level), batch_size=128, cache_dir=cache_dir,
                model_key=model_key, progress=False)
            row = {"task": task, "meta_task": data.meta_task(task), "level": level,
                   **candidate_list_metrics(queries, candidates)}
            if candidates.shape[1] > 1:  # Table-1 statistics need at least one wrong candidate
                stats = similarity_stats(queries, candidates, k=min(k, candidates.shape[1] - 1))
                row.update(stats.as_dict())
                for role, values in stats.distributions().items():
                    pools[role].append(values)
            rows.append(row)
    if not rows:
        raise ValueError(f"{data.root}: no eval files for levels {list(levels)} in tasks "
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


def separation_summary(pools: dict[str, np.ndarray]) -> dict[str, float]:
    """Table-1 means and the overlap of positives with hard negatives, for one model."""
    overlap = overlap_metrics(pools["positive"], pools["hard"]).as_dict()
    return {"positive": float(pools["positive"].mean()), "hard": float(pools["hard"].mean()),
            "easy": float(pools["easy"].mean()),
            "gap": float(pools["positive"].mean() - pools["hard"].mean()),
            "overlap": overlap["overlap"], "auroc": overlap["auroc"]}


def hardest_failures(model, data: DatasetInfo, task: str, level: str = "hard", n: int = 6,
                     cache_dir=None) -> list[dict]:
    """The `n` queries whose best wrong candidate beats the positive by the widest margin."""
    dataset = data.eval_dataset(task, level)
    queries, candidates = embed_eval_dataset(model, dataset, batch_size=128, cache_dir=cache_dir,
                                             progress=False)
    if candidates.shape[1] < 2:
        raise ValueError(f"task {task!r} ({level}) has a single candidate: nothing can beat it")
    scores = np.einsum("qd,qcd->qc", queries, candidates)  # encoders return unit vectors
    best_wrong = 1 + scores[:, 1:].argmax(axis=1)
    margins = scores[np.arange(len(scores)), best_wrong] - scores[:, 0]
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


def embed_images(model, images: Sequence, cache_dir=None) -> np.ndarray:
    """Image-only query embeddings (N, D), e.g. for clustering."""
    return embed_in_batches(getattr(model, "encode_queries", model.encode), [""] * len(images),
                            list(images), batch_size=128, progress=False, cache_dir=cache_dir,
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
                         temperature_matched: bool = True) -> list[dict]:
    variants = []
    for alpha in alphas:
        loss = {"loss": "hardness_weighted", "alpha": float(alpha)} if alpha else {"loss": "info_nce"}
        variants.append({"label": f"weighted a={alpha:g}", "group": "hardness weighting",
                         "alpha_value": float(alpha), "temperature": temperature, **loss})
        if temperature_matched and alpha:
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


def run_variants(
    variants: Sequence[dict], model: str, data: DatasetInfo, output_root: str | Path, *,
    seeds: Sequence[int] = (0,), level: str = "hard", tasks: Sequence[str] | None = None,
    **common_parameters,
) -> pd.DataFrame:
    """Train every variant for every seed from `model`; one row per run with hard-list metrics.

    Keys of a variant that are not TrainConfig fields ("label", "group", ...) are copied to the
    row as they are; `common_parameters` are TrainConfig fields shared by all runs.
    """
    fields = set(TrainConfig.__dataclass_fields__)
    rows = []
    for variant in variants:
        for seed in seeds:
            train_parameters = {**common_parameters, "seed": seed,
                                **{k: v for k, v in variant.items() if k in fields}}
            run_dir = Path(output_root) / f"{_slug(variant['label'])}-seed{seed}"
            embedder, _ = train_embedder(model, data, run_dir, tasks=tasks, **train_parameters)
            table, pools = evaluate_tasks(embedder, data, levels=(level,), tasks=tasks)
            rows.append({**{k: v for k, v in variant.items() if k not in fields}, "seed": seed,
                         "p@1": float(table["p@1"].mean()), **separation_summary(pools)})
    return pd.DataFrame(rows)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in label).strip("_")


def reproduction_verdict(summary: pd.DataFrame, before: str, info_nce: str, weighted: str) -> pd.DataFrame:
    """Which of LLaVE's Table-1 readings hold here, computed from `separation_summary` rows.

    summary: one row per model (index = model name) with positive/hard/easy/gap/auroc columns.
    """
    b, i, w = (summary.loc[name] for name in (before, info_nce, weighted))
    drop = lambda model, role: b[role] - model[role]  # noqa: E731  (fall since the shared start)
    checks = [
        ("weighting widens the positive-hard gap more than InfoNCE", w["gap"] > i["gap"],
         f"gap {i['gap']:.3f} (InfoNCE) vs {w['gap']:.3f} (weighted)"),
        ("weighting separates positives from hard negatives better (AUROC)",
         w["auroc"] > i["auroc"], f"AUROC {i['auroc']:.3f} vs {w['auroc']:.3f}"),
        ("under weighting, hard-negative similarity falls more than positive similarity",
         drop(w, "hard") > drop(w, "positive"),
         f"hard {drop(w, 'hard'):+.3f} vs positive {drop(w, 'positive'):+.3f} (fall since before)"),
        ("weighting lowers hard-negative similarity more than InfoNCE does",
         drop(w, "hard") > drop(i, "hard"),
         f"fall {drop(i, 'hard'):+.3f} (InfoNCE) vs {drop(w, 'hard'):+.3f} (weighted)"),
        ("weighting lowers positive similarity too (paper: .71 -> .66, .82 -> .62)",
         w["positive"] < i["positive"], f"positive {i['positive']:.3f} vs {w['positive']:.3f}"),
        ("easy negatives fall further under weighting", w["easy"] < i["easy"],
         f"easy {i['easy']:.3f} vs {w['easy']:.3f}"),
    ]
    return pd.DataFrame([{"reading": r, "reproduced": bool(ok), "numbers": n} for r, ok, n in checks])
