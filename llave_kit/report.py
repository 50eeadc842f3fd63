"""Readable reports of a pipeline's numbers: summary.md, summary.html, and the tables a notebook
shows when it records its metrics.

Everything here renders plain data: the summary record (`pipeline.summary_record`, the content of
summary.json) and the figures folder it sits in. A committed report can therefore be re-rendered
without the runs that made it:

    folder = Path("figures/cpu_demo")
    write_reports(folder, json.loads((folder / "summary.json").read_text()))

How recorded metrics become tables (`metric_tables`):
- {"mean", "ci_low", "ci_high"} is one value, an interval, shown as "0.682 [0.657, 0.706]";
- nested mappings become models x metrics tables: the innermost key names the row (an arm or a
  model), the keys above it the column, as `studies.intervals_record` writes them:
  {"table1": {"gap": {"weighted": interval}}}. A record whose every entry holds the same fields,
  {"digits · info_nce": {"nmi": ..., "ari": ...}, ...}, has one row per entry instead;
- columns with the same rows share a table; a table wider than MAX_COLUMNS is split by the
  leading keys of its columns;
- a list of records (e.g. "effects": reading, estimate, ci_low, ci_high, verdict) is a table of
  its own with every reading in full; lists of readings also make the report's opening section;
- the other top-level values (seeds, steps, a checkpoint's path) form one small table.
Keys are sorted naturally (alpha=3 before alpha=27): an executed notebook stores its outputs with
alphabetically sorted keys, so the order a notebook recorded them in is lost anyway.

Links point only at files inside the figures folder: executed notebooks live under runs/, which
a clone of the repository does not have, so the report names them as plain paths.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from llave_kit.files import write_text
from llave_kit.statistics import VERDICTS

MAX_COLUMNS = 6  # six "0.682 [0.657, 0.706]" cells still fit a page's width
STATUS_MARKS = {"ran": "✓ ran", "cached": "↺ cached", "failed": "✗ failed", "blocked": "⊘ blocked"}
VERDICT_COLOURS = {"reproduced": "#1a7f37", "contradicted": "#c62828", "inconclusive": "#6e7781"}
VERDICT_RULE = ("Each reading is a paired difference between arms with its 95 % bootstrap interval: "
                "reproduced when the interval excludes 0 in the paper's direction, contradicted when "
                "it excludes 0 the other way, inconclusive when it contains 0.")
NO_READINGS = "No run recorded readings with verdicts."
# Names as the kit's code spells them, and how a reader knows them.
WORDS = {"auroc": "AUROC", "ari": "ARI", "nmi": "NMI", "lmm": "LMM", "vqa": "VQA", "p@1": "P@1",
         "table1": "Table 1"}


# --------------------------------------------------------------------------------------------------
# Values as text


def number(value, signed: bool = False) -> str:
    """3 decimals in the usual range, 3 significant digits outside it, a true minus sign."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        text = f"{value:+d}" if signed else str(value)
    elif not math.isfinite(value):
        text = str(value)
    elif value == 0 or 1e-3 <= abs(value) < 1e4:
        text = f"{value:+.3f}" if signed else f"{value:.3f}"
    else:
        text = f"{value:+.3g}" if signed else f"{value:.3g}"
    return text.replace("-", "−")


def interval_text(centre, low, high, signed: bool = False) -> str:
    """'0.682 [0.657, 0.706]'; `signed` for differences: '+0.006 [−0.015, +0.026]'."""
    return f"{number(centre, signed)} [{number(low, signed)}, {number(high, signed)}]"


def cell(value) -> str:
    if _is_interval(value):
        return interval_text(value["mean"], value["ci_low"], value["ci_high"])
    if isinstance(value, list):
        return ", ".join(cell(item) for item in value)
    return number(value)


def readable(name: str) -> str:
    """'p_at_1_hard' -> 'P@1 hard', 'table1' -> 'Table 1': for metric names, not arm names."""
    words = re.sub(r"p_at_(\d+)", r"P@\1", str(name)).replace("_", " ").split(" ")
    return " ".join(WORDS.get(word.lower(), word) for word in words)


def duration(seconds: float) -> str:
    """'45s', '4m12s', '1h03m'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def natural_key(text) -> tuple:
    """Sort key that compares the numbers inside a text as numbers: 'alpha=3' < 'alpha=27'."""
    parts = re.split(r"(\d+(?:\.\d+)?)", str(text))
    # re.split puts the captured numbers at the odd positions, so like always meets like.
    return tuple((0, float(part)) if index % 2 else (1, part.casefold())
                 for index, part in enumerate(parts))


def _path_key(path: tuple) -> tuple:
    return tuple(natural_key(key) for key in path)


def _is_interval(value) -> bool:
    return isinstance(value, dict) and set(value) == {"mean", "ci_low", "ci_high"}


def _is_records(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


# --------------------------------------------------------------------------------------------------
# Recorded metrics as tables


@dataclass
class Table:
    caption: str
    header: list[str]  # header[0] names the first column, the rows' labels; often empty
    rows: list[list[str]]


def _leaves(value, path: tuple = ()):
    """(key path, value) for every interval, list or plain value inside nested mappings."""
    if isinstance(value, dict) and not _is_interval(value):
        for key, item in value.items():
            yield from _leaves(item, path + (str(key),))
    else:
        yield path, value


def _one_row_per_entry(metrics: dict) -> bool:
    entries = list(metrics.values())
    return len(entries) > 1 and all(
        isinstance(entry, dict) and not _is_interval(entry) and set(entry) == set(entries[0])
        and all(not isinstance(field, (dict, list)) or _is_interval(field) for field in entry.values())
        for entry in entries)


def metric_tables(metrics: dict) -> list[Table]:
    """What a run recorded, as tables (the rules are in the module docstring)."""
    leaves = list(_leaves(metrics))
    if _one_row_per_entry(metrics):
        cells = [((field,), entry, value) for (entry, field), value in leaves]
    else:
        cells = [(path[:-1], path[-1], value) for path, value in leaves
                 if len(path) > 1 and not _is_records(value)]
    values = sorted((path[0], value) for path, value in leaves if len(path) == 1 and not _is_records(value))
    tables = []
    if values:
        tables.append(Table("", ["", "value"], [[readable(key), cell(value)] for key, value in values]))
    tables += _matrix_tables(cells)
    tables += [_records_table(path, rows) for path, rows in leaves if _is_records(rows)]
    return tables


def _matrix_tables(cells: list[tuple]) -> list[Table]:
    columns: dict[tuple, dict] = {}
    for column, row, value in cells:
        columns.setdefault(column, {})[row] = value
    by_rows: dict[frozenset, list[tuple]] = {}
    for column in sorted(columns, key=_path_key):
        by_rows.setdefault(frozenset(columns[column]), []).append(column)
    tables = []
    for rows, group in by_rows.items():
        rows = sorted(rows, key=natural_key)
        for part in _split(group):
            prefix = _common_prefix([column[:-1] for column in part])
            tables.append(Table(
                " · ".join(readable(key) for key in prefix),
                [""] + [" · ".join(readable(key) for key in column[len(prefix):]) for column in part],
                [[row] + [cell(columns[column][row]) for column in part] for row in rows]))
    return tables


def _split(columns: list[tuple], depth: int = 0) -> list[list[tuple]]:
    """Columns in tables of at most MAX_COLUMNS, split by their key at `depth`, then deeper."""
    if len(columns) <= MAX_COLUMNS or all(len(column) <= depth + 1 for column in columns):
        return [columns]
    parts: dict[tuple, list[tuple]] = {}
    for column in columns:
        parts.setdefault(column[:depth + 1], []).append(column)
    return [piece for part in parts.values() for piece in _split(part, depth + 1)]


def _common_prefix(paths: list[tuple]) -> tuple:
    prefix = paths[0]
    for path in paths[1:]:
        while path[:len(prefix)] != prefix:
            prefix = prefix[:-1]
    return prefix


def _records_table(path: tuple, records: list[dict]) -> Table:
    """Reading first, then its estimate and interval in one cell, other fields, verdict last."""
    keys = list(dict.fromkeys(key for record in records for key in record))
    centre = next((key for key in ("estimate", "mean")
                   if all({key, "ci_low", "ci_high"} <= set(record) for record in records)), None)
    first = [key for key in ("reading",) if key in keys]
    last = [key for key in ("verdict",) if key in keys]
    interval_keys = {centre, "ci_low", "ci_high"} if centre else set()
    middle = sorted(set(keys) - interval_keys - set(first) - set(last), key=natural_key)
    header = [readable(key) for key in first] + ([f"{centre} [95 % CI]"] if centre else [])
    header += [readable(key) for key in middle + last]
    rows = []
    for record in records:
        row = [cell(record[key]) for key in first]
        if centre:  # an estimate is a difference between arms: its sign is the point
            row.append(interval_text(record[centre], record["ci_low"], record["ci_high"],
                                     signed=centre == "estimate"))
        rows.append(row + [cell(record.get(key, "")) for key in middle + last])
    return Table(" · ".join(readable(key) for key in path), header, rows)


# --------------------------------------------------------------------------------------------------
# What the report says about a whole pipeline


def reading_sets(record: dict) -> list[tuple[str, list[dict]]]:
    """(title, readings) for every list of readings with verdicts a run recorded, in run order."""
    sets = []
    for name, run in record["runs"].items():
        for path, value in _leaves(run["metrics"]):
            if _is_records(value) and all({"reading", "verdict"} <= set(item) for item in value):
                title = name if path == ("effects",) else f"{name} · " + " · ".join(map(readable, path))
                sets.append((title, value))
    return sets


def verdict_summary(readings: list[dict]) -> tuple[str, list[tuple[str, list[tuple[str, str]]]]]:
    """'5 of 7 reproduced, 1 contradicted, 1 inconclusive', and per verdict its readings as
    (reading, 'estimate [low, high]')."""
    by_verdict: dict[str, list[dict]] = {}
    for reading in readings:
        by_verdict.setdefault(reading["verdict"], []).append(reading)
    order = [v for v in VERDICTS if v in by_verdict] + [v for v in by_verdict if v not in VERDICTS]
    headline = f"{len(by_verdict.get('reproduced', []))} of {len(readings)} reproduced" + "".join(
        f", {len(by_verdict[verdict])} {verdict}" for verdict in order if verdict != "reproduced")
    groups = [(verdict, [(r["reading"], interval_text(r.get("estimate"), r.get("ci_low"), r.get("ci_high"),
                                                      signed=True))
                         for r in by_verdict[verdict]])
              for verdict in order]
    return headline, groups


def overview(record: dict) -> str:
    counts = {status: n for status, n in record["counts"].items() if n}
    seconds = sum(run["seconds"] for run in record["runs"].values())
    return (f"Finished {record['finished'].replace('T', ' ')}. {len(record['runs'])} runs: "
            + ", ".join(f"{n} {status}" for status, n in counts.items())
            + f"; {duration(seconds)} of run time.")


def unfinished(record: dict) -> str:
    """A sentence naming the runs whose numbers are missing, or ''."""
    missing = [f"{name} ({run['status']})" for name, run in record["runs"].items()
               if run["status"] in ("failed", "blocked")]
    return f"Not finished: {', '.join(missing)}; their numbers are missing below." if missing else ""


def executed_notebook(record: dict, name: str) -> str:
    # The pipeline writes it to runs/<pipeline>/<run>.ipynb under the project's root.
    return f"runs/{record['pipeline']}/{name}.ipynb"


def status_table(record: dict) -> Table:
    rows = []
    for index, (name, run) in enumerate(record["runs"].items(), 1):
        took = duration(run["seconds"]) if run["status"] in ("ran", "failed") else "—"
        rows.append([str(index), name, run["notebook"], STATUS_MARKS.get(run["status"], run["status"]), took,
                     status_note(run)])
    return Table("", ["#", "run", "notebook", "status", "time", "note"], rows)


def status_note(run: dict) -> str:
    """Why a run has no fresh numbers: its error, or that it was cached; '' for a run that ran."""
    if run["status"] == "cached":
        return "unchanged since it last succeeded: its results are from then"
    return run["error"] or ""


def figure_files(figures_dir: Path, name: str) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """A run's figures as (PNG, caption, SVG or None) and its other files, relative to
    `figures_dir`."""
    folder = figures_dir / name
    files = sorted((path for path in folder.rglob("*") if path.is_file() and not path.name.startswith(".")),
                   key=lambda path: _path_key(path.relative_to(folder).parts)) if folder.is_dir() else []
    relative = {path: path.relative_to(figures_dir).as_posix() for path in files}
    figures, shown = [], set()
    for path in files:
        if path.suffix == ".png":
            svg = path.with_suffix(".svg")
            figures.append((relative[path], readable(path.stem), relative.get(svg)))
            shown |= {path, svg}
    return figures, [relative[path] for path in files if path not in shown]


# --------------------------------------------------------------------------------------------------
# Markdown


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> list[str]:
    lines = [f"**{table.caption}**", ""] if table.caption else []
    lines += ["| " + " | ".join(_md(h) for h in table.header) + " |", "|" + "---|" * len(table.header)]
    return lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in table.rows]


def render_markdown(record: dict, figures_dir: str | Path) -> str:
    figures_dir = Path(figures_dir)
    lines = [f"# Pipeline `{record['pipeline']}`", "", overview(record)]
    if note := unfinished(record):
        lines += ["", f"**{note}**"]
    lines += ["", "## What reproduces", "", VERDICT_RULE]
    for title, readings in reading_sets(record):
        headline, groups = verdict_summary(readings)
        lines += ["", f"**{title}**: {headline}.", ""]
        for verdict, pairs in groups:
            lines.append(f"- {verdict.capitalize()} ({len(pairs)}):")
            lines += [f"  - {reading} — {numbers}" for reading, numbers in pairs]
    if not reading_sets(record):
        lines += ["", NO_READINGS]
    lines += ["", "## Runs", "", *markdown_table(status_table(record)), "",
              f"Executed notebooks are kept where the pipeline ran, as `{executed_notebook(record, '<run>')}` "
              "(local only: runs/ is not part of the repository)."]
    for index, (name, run) in enumerate(record["runs"].items(), 1):
        lines += ["", f"## {index}. {name}", "", f"Notebook `{run['notebook']}`"
                  + (f"; executed copy `{executed_notebook(record, name)}` (local only)"
                     if run["status"] != "blocked" else "") + "."]
        if run["status"] != "ran":
            lines += ["", f"Status: **{run['status']}** — {status_note(run)}"]
        for table in metric_tables(run["metrics"]):
            lines += ["", *markdown_table(table)]
        if run["status"] in ("ran", "cached"):
            figures, others = figure_files(figures_dir, name)
            for png, caption, svg in figures:
                lines += ["", f"![{caption}]({quote(png)})", "",
                          f"*{caption}*" + (f" ([SVG]({quote(svg)}))" if svg else "")]
            if others:
                lines += ["", "Files: " + ", ".join(f"[{_md(path)}]({quote(path)})" for path in others)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# HTML

STYLE = """
body { margin: 0; color: #1f2328; background: #fff;
       font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", sans-serif; }
main { max-width: 72rem; margin: 0 auto; padding: 1.5rem 2rem 4rem; }
h1 { font-size: 1.9rem; margin-bottom: .3rem; }
h2 { font-size: 1.4rem; margin-top: 2.8rem; padding-bottom: .3rem; border-bottom: 1px solid #d0d7de; }
nav { font-size: .92rem; color: #57606a; }
nav a { margin-right: .9rem; white-space: nowrap; }
a { color: #0969da; }
code { font: .88em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f3f5f7;
       padding: .1em .3em; border-radius: 4px; }
.alert { background: #ffebe9; border-left: 4px solid #c62828; padding: .5rem .8rem; }
.readings li { margin: .35rem 0; }
.number { white-space: nowrap; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; margin: .8rem 0 1.4rem; font-size: .9rem; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .2rem 0 .4rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .65rem; vertical-align: top; }
thead th { background: #f6f8fa; }
td { font-variant-numeric: tabular-nums; }
tr.failed td { background: #ffebe9; } tr.blocked td { background: #fff8c5; } tr.cached td { background: #ddf4ff; }
figure { margin: 1.2rem 0 2rem; }
figure img { display: block; max-width: 100%; max-height: 80vh; width: auto; height: auto;
             border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: .9rem; margin-top: .3rem; }
"""


def _e(text) -> str:
    return html.escape(str(text))


def html_table(table: Table, row_classes: list[str] | None = None) -> str:
    # Inline styles: the same table is shown in notebooks, where JupyterLab right-aligns output
    # tables and a page's stylesheet does not reach.
    left = ' style="text-align:left"'
    head = "".join(f"<th{left}>{_e(h)}</th>" for h in table.header)
    body = []
    for index, row in enumerate(table.rows):
        cells = []
        for name, value in zip(table.header, row):
            colour = VERDICT_COLOURS.get(value) if name == "verdict" else None
            style = f' style="text-align:left;color:{colour};font-weight:600"' if colour else left
            cells.append(f"<td{style}>{_e(value)}</td>")
        row_class = f' class="{_e(row_classes[index])}"' if row_classes else ""
        body.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    caption = f"<caption>{_e(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _anchor(index: int) -> str:
    return f"run-{index}"


def render_html(record: dict, figures_dir: str | Path) -> str:
    """A self-contained page: inline style, no external resources, links only into the folder."""
    figures_dir = Path(figures_dir)
    runs = list(record["runs"].items())
    title = f"Pipeline {record['pipeline']}"
    parts = [f"<h1>{_e(title)}</h1>", f"<p>{_e(overview(record))}</p>"]
    if note := unfinished(record):
        parts.append(f'<p class="alert">{_e(note)}</p>')
    links = [("what-reproduces", "What reproduces"), ("runs", "Runs")]
    links += [(_anchor(index), name) for index, (name, _) in enumerate(runs, 1)]
    parts.append("<nav>" + "".join(f'<a href="#{a}">{_e(text)}</a>' for a, text in links) + "</nav>")

    parts += ['<h2 id="what-reproduces">What reproduces</h2>', f"<p>{_e(VERDICT_RULE)}</p>"]
    for set_title, readings in reading_sets(record):
        headline, groups = verdict_summary(readings)
        items = []
        for verdict, pairs in groups:
            colour = VERDICT_COLOURS.get(verdict, "inherit")
            texts = "".join(f'<li>{_e(reading)} — <span class="number">{_e(numbers)}</span></li>'
                            for reading, numbers in pairs)
            items.append(f'<li><strong style="color:{colour}">{_e(verdict.capitalize())} ({len(pairs)})</strong>'
                         f"<ul>{texts}</ul></li>")
        parts.append(f"<p><strong>{_e(set_title)}</strong>: {_e(headline)}.</p>"
                     f'<ul class="readings">{"".join(items)}</ul>')
    if not reading_sets(record):
        parts.append(f"<p>{_e(NO_READINGS)}</p>")

    statuses = [run["status"] for _, run in runs]
    parts += ['<h2 id="runs">Runs</h2>', html_table(status_table(record), statuses),
              f"<p>Executed notebooks are kept where the pipeline ran, as "
              f"<code>{_e(executed_notebook(record, '<run>'))}</code> (local only: runs/ is not part of "
              f"the repository).</p>"]
    for index, (name, run) in enumerate(runs, 1):
        parts.append(f'<h2 id="{_anchor(index)}">{index}. {_e(name)}</h2>')
        where = f"Notebook <code>{_e(run['notebook'])}</code>"
        if run["status"] != "blocked":
            where += f"; executed copy <code>{_e(executed_notebook(record, name))}</code> (local only)"
        parts.append(f"<p>{where}.</p>")
        if run["status"] != "ran":
            alert = ' class="alert"' if run["status"] in ("failed", "blocked") else ""
            parts.append(f"<p{alert}>Status: <strong>{_e(run['status'])}</strong> — "
                         f"{_e(status_note(run))}</p>")
        parts += [html_table(table) for table in metric_tables(run["metrics"])]
        if run["status"] in ("ran", "cached"):
            figures, others = figure_files(figures_dir, name)
            for png, caption, svg in figures:
                svg_link = f' (<a href="{_e(quote(svg))}">SVG</a>)' if svg else ""
                parts.append(f'<figure><img src="{_e(quote(png))}" alt="{_e(caption)}">'
                             f"<figcaption>{_e(caption)}{svg_link}</figcaption></figure>")
            if others:
                parts.append("<p>Files: " + ", ".join(f'<a href="{_e(quote(path))}">{_e(path)}</a>'
                                                      for path in others) + "</p>")
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")


# --------------------------------------------------------------------------------------------------
# Notebooks and files


def metrics_html(metrics: dict) -> str:
    """The tables `record_metrics` shows in a notebook."""
    return "<div>" + "".join(html_table(table) for table in metric_tables(metrics)) + "</div>"


def metrics_text(metrics: dict) -> str:
    """The same tables as aligned plain text, for frontends without HTML."""
    blocks = []
    for table in metric_tables(metrics):
        rows = [table.header] + table.rows
        widths = [max(len(row[i]) for row in rows) for i in range(len(table.header))]
        lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in rows]
        blocks.append("\n".join(([table.caption] if table.caption else []) + lines))
    return "\n\n".join(blocks)


def write_reports(figures_dir: str | Path, record: dict) -> tuple[Path, Path]:
    """Write summary.md and summary.html into `figures_dir` (each atomically) from a summary record."""
    figures_dir = Path(figures_dir)
    return (write_text(figures_dir / "summary.md", render_markdown(record, figures_dir)),
            write_text(figures_dir / "summary.html", render_html(record, figures_dir)))
