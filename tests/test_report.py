"""The readable reports: tables from recorded metrics, the opening verdicts, links that resolve."""
import html
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from llave_kit.report import (
    interval_text,
    metric_tables,
    metrics_html,
    metrics_text,
    natural_key,
    number,
    render_html,
    render_markdown,
    verdict_summary,
    write_reports,
)

REPO = Path(__file__).resolve().parent.parent
LONG_READING = ("weighting lowers hard-negative similarity more than InfoNCE does, and by more than it lowers "
                "positive similarity, on every one of the six tasks (paper: .71 -> .66)")
EFFECTS = [
    {"reading": "weighting raises hard-list P@1 over InfoNCE", "estimate": 0.0064, "ci_low": -0.0147,
     "ci_high": 0.0264, "verdict": "inconclusive"},
    {"reading": LONG_READING, "estimate": 0.0664, "ci_low": 0.0636, "ci_high": 0.0692, "verdict": "reproduced"},
    {"reading": "weighting separates positives from hard negatives better (AUROC)", "estimate": -0.0146,
     "ci_low": -0.0257, "ci_high": -0.0033, "verdict": "contradicted"},
]


def interval(mean, low, high):
    return {"ci_high": high, "ci_low": low, "mean": mean}


OVERLAP = {  # as 02_similarity_overlap records it, keys sorted as an executed notebook stores them
    "effects": EFFECTS,
    "p_at_1_hard": {"before": interval(0.5433, 0.5158, 0.57), "info_nce": interval(0.6825, 0.6567, 0.7058),
                    "weighted": interval(0.6889, 0.6617, 0.7147)},
    "seeds": 3,
    "table1": {"gap": {"before": interval(0.1339, 0.1286, 0.1397), "info_nce": interval(0.1256, 0.1207, 0.1309),
                       "weighted": interval(0.1920, 0.1850, 0.1992)}},
}


def record(runs: dict, pipeline="demo") -> dict:
    counts = {status: sum(run["status"] == status for run in runs.values())
              for status in ("ran", "cached", "failed", "blocked")}
    return {"pipeline": pipeline, "finished": "2026-01-02T03:04:05+00:00", "counts": counts, "runs": runs}


def run(status="ran", metrics=None, error=None, seconds=12.5, notebook="notebooks/study.ipynb"):
    return {"status": status, "seconds": seconds, "notebook": notebook, "error": error, "metrics": metrics or {}}


def test_numbers_and_intervals_read_like_the_readme():
    assert interval_text(0.68249, 0.65666, 0.70584) == "0.682 [0.657, 0.706]"
    assert interval_text(0.0064, -0.0147, 0.0264, signed=True) == "+0.006 [−0.015, +0.026]"
    assert number(15.77783) == "15.778" and number(1.1102e-16) == "1.11e−16" and number(3) == "3"
    assert number(None) == "n/a" and number("nan") == "nan" and number(float("inf")) == "inf"


def test_keys_sort_naturally():
    keys = ["alpha=27", "alpha=3", "alpha=0", "weighted a=9", "alpha=1", "InfoNCE tau'=0.0169", "alpha=9"]
    assert sorted(keys, key=natural_key) == [
        "alpha=0", "alpha=1", "alpha=3", "alpha=9", "alpha=27", "InfoNCE tau'=0.0169", "weighted a=9"]
    table, = metric_tables({"share": {"alpha=27": 0.9, "alpha=3": 0.8, "alpha=10": 0.85}})
    assert [row[0] for row in table.rows] == ["alpha=3", "alpha=10", "alpha=27"]


def test_nested_intervals_become_one_models_by_metrics_table():
    values, matrix, effects = metric_tables(OVERLAP)
    assert values.rows == [["seeds", "3"]]
    assert matrix.header == ["", "P@1 hard", "Table 1 · gap"]
    assert matrix.rows[2] == ["weighted", "0.689 [0.662, 0.715]", "0.192 [0.185, 0.199]"]
    assert effects.caption == "effects" and effects.header == ["reading", "estimate [95 % CI]", "verdict"]
    assert effects.rows[1] == [LONG_READING, "+0.066 [+0.064, +0.069]", "reproduced"]


def test_entries_with_the_same_fields_are_rows_and_wide_tables_are_split():
    clustering, = metric_tables({"digits · info_nce": {"nmi": 0.97, "ari": 0.96},
                                 "scenes · weighted": {"nmi": 0.09, "ari": 0.05}})
    assert clustering.header == ["", "ARI", "NMI"]
    assert [row[0] for row in clustering.rows] == ["digits · info_nce", "scenes · weighted"]
    arms = {"info_nce": interval(0.5, 0.4, 0.6), "weighted": interval(0.6, 0.5, 0.7)}
    tasks = ["classification", "grounding", "retrieval", "vqa"]
    overall, hard, random_ = metric_tables({
        "p_at_1": {"hard": arms, "random": arms},
        "p_at_1_by_meta_task": {level: {task: arms for task in tasks} for level in ("hard", "random")}})
    assert (overall.caption, overall.header) == ("P@1", ["", "hard", "random"])
    assert (hard.caption, hard.header) == ("P@1 by meta task · hard", ["", "classification", "grounding",
                                                                       "retrieval", "VQA"])
    assert random_.caption == "P@1 by meta task · random"


def test_notebook_display_keeps_the_machine_record_and_adds_readable_tables(monkeypatch):
    import IPython.display

    from llave_kit.pipeline import METRICS_MIME, record_metrics

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda bundle, raw: shown.append(bundle))
    record_metrics(OVERLAP)
    bundle, = shown
    assert bundle[METRICS_MIME] == OVERLAP
    assert bundle["text/html"] == metrics_html(OVERLAP) and bundle["text/plain"] == metrics_text(OVERLAP)
    assert "0.682 [0.657, 0.706]" in bundle["text/plain"] and LONG_READING in bundle["text/plain"]
    assert "<table>" in bundle["text/html"] and html.escape(LONG_READING) in bundle["text/html"]
    assert "{" not in bundle["text/plain"]  # no JSON dump


def test_verdicts_are_sentences_that_name_what_did_not_reproduce(tmp_path):
    headline, groups = verdict_summary(EFFECTS)
    assert headline == "1 of 3 reproduced, 1 contradicted, 1 inconclusive"
    assert [verdict for verdict, _ in groups] == ["reproduced", "contradicted", "inconclusive"]
    assert groups[1][1] == [("weighting separates positives from hard negatives better (AUROC)",
                             "−0.015 [−0.026, −0.003]")]
    summary = render_markdown(record({"overlap": run(metrics=OVERLAP)}), tmp_path)
    opening = summary.split("## What reproduces")[1].split("## Runs")[0]
    assert "**overlap**: 1 of 3 reproduced, 1 contradicted, 1 inconclusive." in opening
    assert "- Contradicted (1):\n  - weighting separates positives from hard negatives better (AUROC) — " \
           "−0.015 [−0.026, −0.003]" in opening
    assert f"  - {LONG_READING} — +0.066 [+0.064, +0.069]" in opening


def test_failed_blocked_and_cached_runs_are_marked_with_their_error(tmp_path):
    (tmp_path / "make").mkdir()  # an old figure folder must not be presented for a failed run
    (tmp_path / "make" / "old.png").write_bytes(b"png")
    runs = {"make": run("failed", error="RuntimeError: asked to fail"),
            "use": run("blocked", error="not run: make did not succeed", seconds=0.0),
            "sweep": run("cached", metrics={"value": 1}, seconds=0.0)}
    summary = render_markdown(record(runs), tmp_path)
    assert "**Not finished: make (failed), use (blocked); their numbers are missing below.**" in summary
    assert "| 1 | make | notebooks/study.ipynb | ✗ failed | 12s | RuntimeError: asked to fail |" in summary
    assert "| 2 | use | notebooks/study.ipynb | ⊘ blocked | — | not run: make did not succeed |" in summary
    assert "| 3 | sweep | notebooks/study.ipynb | ↺ cached | — | unchanged since it last succeeded" in summary
    assert "Status: **failed** — RuntimeError: asked to fail" in summary
    assert "old.png" not in summary
    page = render_html(record(runs), tmp_path)
    assert '<tr class="failed">' in page and '<tr class="blocked">' in page and '<tr class="cached">' in page
    assert "old.png" not in page


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets, self.ids, self.external = [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.add(attrs.get("id"))
        if tag in ("img", "a", "script", "link", "iframe") and (attrs.get("src") or attrs.get("href")):
            self.targets.append(attrs.get("src") or attrs.get("href"))


def check_links(folder: Path) -> list[str]:
    """Every link of summary.html and summary.md names a file in `folder` or an anchor of the page."""
    parser = Links()
    parser.feed((folder / "summary.html").read_text())
    markdown = re.findall(r"\]\(([^)]+)\)", (folder / "summary.md").read_text())
    for target in parser.targets + markdown:
        assert "runs/" not in target and "://" not in target and not target.startswith("/"), target
        if target.startswith("#"):
            assert target[1:] in parser.ids, target
        else:
            assert (folder / unquote(target)).is_file(), target
    return parser.targets + markdown


def test_every_link_resolves_inside_the_figures_folder_and_none_goes_to_runs(tmp_path):
    folder = tmp_path / "figures" / "demo"
    (folder / "overlap").mkdir(parents=True)
    for name in ("similarity overlap.png", "similarity overlap.svg", "scores.csv"):
        (folder / "overlap" / name).write_bytes(b"x")
    write_reports(folder, record({"overlap": run(metrics=OVERLAP)}))
    targets = check_links(folder)
    assert {"overlap/similarity%20overlap.png", "overlap/similarity%20overlap.svg", "overlap/scores.csv"} <= set(
        targets)
    page = (folder / "summary.html").read_text()
    assert "<code>runs/demo/overlap.ipynb</code> (local only)" in page
    assert "<link" not in page and "<script" not in page and "http" not in page


def test_the_committed_demo_renders_again_from_its_summary_json(tmp_path):
    """The report is made from summary.json and the figures alone, no runs/ needed."""
    folder = tmp_path / "cpu_demo"
    shutil.copytree(REPO / "figures" / "cpu_demo", folder)
    summary = json.loads((folder / "summary.json").read_text())
    write_reports(folder, summary)
    targets = check_links(folder)
    page = (folder / "summary.html").read_text()
    for name, run_ in summary["runs"].items():
        assert f"{name}.ipynb" in page
        for effect in run_["metrics"].get("effects", []):
            assert page.count(html.escape(effect["reading"])) >= 2  # opening and table, in full
    pngs = {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}
    assert pngs <= set(targets)


@pytest.mark.parametrize("seconds, text", [(9.4, "9s"), (95, "1m35s"), (252, "4m12s"), (3725, "1h02m")])
def test_durations(seconds, text):
    from llave_kit.report import duration

    assert duration(seconds) == text
