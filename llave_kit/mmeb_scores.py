"""MMEB's score table for one embedder: P@1 per data set, per meta-task, in and out of
distribution and overall, with LLaVE's Table-1 similarities per data set, from one pass.

    python -m llave_kit evaluate --model checkpoints/tiny-dual-scenes --data data/mmeb \
        --out runs/scores.json                  # also writes runs/scores.md

or from Python:

    data = open_mmeb_folder("data/mmeb")
    report = score_mmeb(load_embedder("checkpoints/tiny-dual-scenes"), data, model="tiny")
    print(report_markdown(report))

What the numbers are (as VLM2Vec and LLaVE report them):

- per data set: P@1 over its candidate lists (candidate 0 is the positive), the number of queries
  and of candidates per list, and LLaVE's Table-1 statistics: the mean cosine similarity of the
  positive, of the top-5 ("hard") and of the bottom-5 ("easy") wrong candidates, the gap
  positive - hard, and the AUROC of positive vs hard similarities pooled over queries
  (P(positive > a top-5 negative); 1 means the two never overlap).
- Classification, VQA, Retrieval, Grounding: the mean P@1 of the meta-task's data sets, each data
  set counting once whatever its size.
- IND / OOD: the mean over MMEB's 20 in-distribution data sets (those MMEB-train covers,
  `data.MMEB_IN_DISTRIBUTION`) / over the other 16 of MMEB's 36. A data set outside MMEB's 36
  names is in neither: it is reported, and counts in its meta-task (when the folder gives it one
  of the four) and in Overall.
- Overall: the mean over all scored data sets (MMEB's overall is the mean over its 36).

The report is a dict (written as JSON; P@1 and similarities as fractions) and two Markdown
tables: the paper's columns (P@1 x 100, one decimal, as the papers print) and one row per data set.

Tie rule (`evaluation` module doc). Default "positive-first": MMEB's and LLaVE's evaluator takes
`argmax == 0`, which credits a tie to the positive, so these numbers compare with published
tables. That rule would score a collapsed embedder (every candidate equal) at 1, so each data set
also records `tied_queries`, the queries whose positive ties its hardest wrong candidate -- exactly
those where the rules differ -- and the tables flag them; `ties="pessimistic"` (the kit's rule
elsewhere) counts them as misses.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from llave_kit.data import MMEB_META_TASKS, DatasetInfo, mmeb_in_distribution
from llave_kit.evaluation import check_tie_rule, model_fingerprint, score_eval_set
from llave_kit.files import write_text
from llave_kit.progress import progress_bar

META_TASK_COLUMNS = {"classification": "Classification", "vqa": "VQA", "retrieval": "Retrieval",
                     "grounding": "Grounding"}
COLUMNS = (*META_TASK_COLUMNS.values(), "IND", "OOD", "Overall")  # the papers' order
DEFAULT_TIES = "positive-first"
TIE_MEANINGS = {
    "positive-first": "a wrong candidate that ties the positive ranks below it, as in MMEB's and "
                      "LLaVE's argmax == 0",
    "pessimistic": "a wrong candidate that ties the positive ranks above it, so a collapsed "
                   "embedder scores 0",
}
TABLE_ONE_K = 5  # LLaVE's Table 1: top-5 hard and bottom-5 easy negatives


def eval_sets(data: DatasetInfo, datasets: Sequence[str] | None = None,
              level: str | None = None) -> dict[str, str]:
    """{dataset: level} to score: `datasets` (default: every task with candidate lists), each at
    `level` (default: its only level; MMEB folders have one, "test")."""
    with_lists = [task for task in data.tasks if data.levels(task)]
    if not with_lists:
        raise ValueError(f"{data.root}: no eval sets (candidate lists) to score")
    names = list(dict.fromkeys(datasets)) if datasets else with_lists
    unknown = [name for name in names if name not in with_lists]
    if unknown:
        raise ValueError(f"unknown data set(s) {unknown}; {data.root} has eval sets {with_lists}")
    chosen = {}
    for name in names:
        levels = data.levels(name)
        if level is None and len(levels) > 1:
            raise ValueError(f"data set {name!r} has levels {levels}: choose one (--level)")
        if level is not None and level not in levels:
            raise ValueError(f"data set {name!r} has no level {level!r}; levels: {levels}")
        chosen[name] = level or levels[0]
    return chosen


def score_mmeb(
    embedder, data: DatasetInfo, datasets: Sequence[str] | None = None, *,
    level: str | None = None, model: str = "model", ties: str = DEFAULT_TIES,
    batch_size: int = 32, cache_dir=None, progress: bool = True,
) -> dict:
    """Score every eval set of `data` (see `eval_sets`) and summarize; the report (module doc).

    model: the name the tables show. cache_dir: embeddings cached across runs
    (`evaluation.embed_in_batches`), keyed by the model's weights and settings. progress: one bar
    over the data sets (bars nested inside it, per embedding pass, would garble a log).
    """
    check_tie_rule(ties)
    chosen = eval_sets(data, datasets, level)
    model_key = model_fingerprint(embedder) if cache_dir is not None else None  # hash weights once
    rows = {}
    for name in progress_bar(chosen, desc="data sets", disable=not progress):
        started = time.perf_counter()
        dataset = data.eval_dataset(name, chosen[name], check_images=False)  # opened when embedded
        scores = score_eval_set(embedder, dataset, k=TABLE_ONE_K, ties=ties,
                                batch_size=batch_size, cache_dir=cache_dir, model_key=model_key,
                                progress=False)
        rows[name] = {"meta_task": data.meta_task(name), "level": chosen[name],
                      "in_distribution": mmeb_in_distribution(name),
                      "p@1": float(np.mean(scores.ranks == 1)), "queries": len(scores.ranks),
                      "candidates": scores.n_candidates, **_table_one(scores.stats),
                      "seconds": round(time.perf_counter() - started, 2)}
    means = summarize({name: row["p@1"] for name, row in rows.items()},
                      {name: row["meta_task"] for name, row in rows.items()})
    return {"model": model, "data": str(data.root), "ties": ties, "ties_meaning": TIE_MEANINGS[ties],
            "overall": means["Overall"]["p@1"], "means": means, "datasets": rows,
            "outside_mmeb": [name for name in rows if name not in MMEB_META_TASKS]}


def _table_one(stats) -> dict:
    """Table-1 means and the tie count of one data set; None where lists hold the positive alone."""
    if stats is None:
        return {"positive": None, "hard": None, "easy": None, "gap": None, "auroc": None,
                "tied_queries": 0}
    means = stats.as_dict()
    return {"positive": means["positive"], "hard": means["hard"], "easy": means["easy"],
            "gap": means["gap"], "auroc": stats.auroc,
            "tied_queries": int(np.sum(stats.hard[:, 0] == stats.positive))}


def summarize(p_at_1: Mapping[str, float], meta_tasks: Mapping[str, str]) -> dict[str, dict]:
    """{column: {"p@1": mean P@1 of its data sets or None, "datasets": how many}} for `COLUMNS`.

    p_at_1 and meta_tasks are keyed by data set name; membership as in the module doc.
    """
    members: dict[str, list[float]] = {column: [] for column in COLUMNS}
    for name, value in p_at_1.items():
        if meta_tasks[name] in META_TASK_COLUMNS:
            members[META_TASK_COLUMNS[meta_tasks[name]]].append(value)
        if (in_distribution := mmeb_in_distribution(name)) is not None:
            members["IND" if in_distribution else "OOD"].append(value)
        members["Overall"].append(value)
    return {column: {"p@1": float(np.mean(values)) if values else None, "datasets": len(values)}
            for column, values in members.items()}


# --------------------------------------------------------------------------------------------------
# Markdown


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _fraction(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def score_table(report: dict) -> str:
    """The papers' table: P@1 x 100 per column, and how many data sets each column averages."""
    means = report["means"]
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|",
             f"| {report['model']} | " + " | ".join(_percent(means[c]["p@1"]) for c in COLUMNS)
             + " |",
             "| data sets | " + " | ".join(str(means[c]["datasets"]) for c in COLUMNS) + " |"]
    return "\n".join(lines)


def dataset_table(report: dict) -> str:
    """One row per data set: P@1 x 100, sizes, ties, and the Table-1 similarities."""
    lines = ["| data set | meta-task | IND/OOD | queries | candidates | P@1 | tied | positive | "
             "hard | easy | gap | AUROC |", "|---" * 12 + "|"]
    for name, row in report["datasets"].items():
        split = {True: "IND", False: "OOD", None: "–"}[row["in_distribution"]]
        similarities = " | ".join(_fraction(row[key])
                                  for key in ("positive", "hard", "easy", "gap", "auroc"))
        lines.append(f"| {name} | {row['meta_task']} | {split} | {row['queries']} | "
                     f"{row['candidates']} | {_percent(row['p@1'])} | {row['tied_queries']} | "
                     f"{similarities} |")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    """Both tables with the notes a reader needs: tie rule, ties seen, data sets outside MMEB."""
    notes = [f"P@1 x 100, mean over data sets. Ties: {report['ties']}, {report['ties_meaning']}."]
    tied = {name: row["tied_queries"] for name, row in report["datasets"].items()
            if row["tied_queries"]}
    if tied:
        counted = "hits" if report["ties"] == "positive-first" else "misses"
        notes.append(f"Tied: {sum(tied.values())} queries in {len(tied)} data set(s) have a wrong "
                     f"candidate scoring exactly like the positive, counted as {counted} "
                     f"(a collapsed embedder?).")
    if report["outside_mmeb"]:
        notes.append(f"Not among MMEB's 36 (in neither IND nor OOD): "
                     f"{', '.join(report['outside_mmeb'])}.")
    similarities = (f"Similarities (cosine): positive, mean of the top-{TABLE_ONE_K} (hard) and "
                    f"bottom-{TABLE_ONE_K} (easy) wrong candidates, gap = positive - hard, AUROC "
                    f"positive vs hard (LLaVE's Table 1).")
    return "\n\n".join(["## MMEB scores", score_table(report), " ".join(notes),
                        "## Per data set", dataset_table(report), similarities]) + "\n"


def report_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """The JSON path `out` (it must end in .json) and the Markdown path beside it (.md)."""
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"{out}: the report path must end in .json (the tables go beside it, .md)")
    return out, out.with_suffix(".md")


def write_report(report: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the report as JSON to `out` (a .json path) and its Markdown beside it (.md)."""
    out, markdown = report_paths(out)
    write_text(out, json.dumps(report, indent=1) + "\n")
    write_text(markdown, report_markdown(report))
    return out, markdown
