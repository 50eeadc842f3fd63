"""Figures for the LLaVE study, in one consistent style.

- `plot_similarity_distributions`: positive vs hard vs easy negative similarities, one panel per
  model or condition (InfoNCE vs weighted, before vs after), annotated with overlap and AUROC.
- `plot_similarity_bars`: LLaVE's Table 1 as grouped bars (positive / hard / easy per model).
- `plot_gradient_share`: each negative's share of the gradient against its similarity.
- `plot_intervals`: means with 95 % CIs per arm or per alpha (bootstrap over seeds and queries).
- `plot_effects`: a forest plot of the paper's readings, each difference with its CI and verdict.
- `plot_metric_bars`: grouped bars, e.g. P@1 per meta-task and model, or clustering scores.
- `plot_projection`: 2-D projections (`evaluation.project_2d`) coloured by label.

Every function takes plain data (mappings, DataFrames, arrays) and returns a matplotlib Figure
built without pyplot: nothing needs a display (PNG and SVG are rendered by the Agg and SVG
backends whatever backend is configured), pyplot keeps no reference to it, and a notebook shows
the returned figure once. `save_figure(fig, "figures/name")` writes name.png and name.svg
atomically; `set_style()` gives the user's own pyplot figures the same look.

Example:
    >>> fig = plot_similarity_distributions({"InfoNCE": stats_nce.distributions(),
    ...                                      "LLaVE a=9": stats_llave.distributions()})
    >>> save_figure(fig, "figures/similarity_distributions")
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from cycler import cycler
from matplotlib.figure import Figure

from llave_kit.analysis import as_float_array, overlap_metrics
from llave_kit.data import IMAGE_PLACEHOLDER, atomic_path

PALETTE = sns.color_palette("colorblind")
ROLE_COLORS = {"positive": PALETTE[2], "hard": PALETTE[3], "easy": PALETTE[0],
               "negative": PALETTE[7]}
ROLE_LABELS = {"positive": "positive", "hard": "hard negatives (top-k)",
               "easy": "easy negatives (bottom-k)", "negative": "all negatives"}
FORMATS = ("png", "svg")
SVG_SALT = "llave-kit"  # fixed SVG ids: redrawing the same figure gives the same file


# --------------------------------------------------------------------------------------------------
# Style and saving


def style_rc() -> dict:
    """The kit's matplotlib settings: seaborn whitegrid, colorblind palette, reproducible SVG."""
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.9)}
    rc.update({
        "axes.prop_cycle": cycler(color=PALETTE),
        "axes.titlesize": "medium",
        "legend.frameon": False,
        "figure.dpi": 100,
        "svg.hashsalt": SVG_SALT,
    })
    return rc


def set_style() -> None:
    """Apply `style_rc()` globally, for the user's own plots (this module's functions use it)."""
    matplotlib.rcParams.update(style_rc())


def save_figure(
    fig: Figure, path_without_suffix: str | os.PathLike, formats: Sequence[str] = FORMATS,
    dpi: int = 150,
) -> list[Path]:
    """Write fig to <path>.png and <path>.svg (or other `formats`), each atomically.

    Returns the written paths. Dates are left out of SVG/PDF metadata and SVG ids are salted
    with a constant, so an unchanged figure gives unchanged files.
    """
    base = Path(path_without_suffix)
    if base.suffix.lstrip(".").lower() in {"png", "svg", "pdf", "jpg", "jpeg"}:
        raise ValueError(f"give the path without a suffix, got {base} (formats: {formats})")
    written = []
    for fmt in formats:
        path = base.with_name(f"{base.name}.{fmt}")
        metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
        with matplotlib.rc_context({"svg.hashsalt": SVG_SALT}), atomic_path(path) as temporary:
            fig.savefig(temporary, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
        written.append(path)
    return written


def _panel_grid(n_panels: int, ncols: int = 3, size=(4.2, 3.2), **subplot_kw):
    """A constrained-layout Figure with `n_panels` axes in rows of `ncols` (spare cells removed)."""
    if n_panels < 1:
        raise ValueError("nothing to plot: no panels given")
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw).ravel()
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, list(axes[:n_panels])


def _shared_legend(fig: Figure, axes) -> None:
    """One legend under all panels, each label once (panels may show different subsets)."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="outside lower center",
               ncols=min(4, len(entries)), fontsize="small")


def _as_frame(table, required: Sequence[str]) -> pd.DataFrame:
    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; it has {list(frame.columns)}")
    return frame


# --------------------------------------------------------------------------------------------------
# Similarity distributions and Table 1


def _overlap_note(values: Mapping[str, np.ndarray]) -> str:
    """'overlap .. / AUROC .. / gap ..' of positives vs hard (else all) negatives, or ''."""
    negative = "hard" if "hard" in values else "negative"
    if "positive" not in values or negative not in values:
        return ""
    pos, neg = values["positive"], values[negative]
    method = "kde" if np.ptp(pos) > 0 and np.ptp(neg) > 0 else "histogram"
    m = overlap_metrics(pos, neg, method=method)
    return f"overlap {m.overlap:.2f}\nAUROC {m.auroc:.3f}\ngap {m.margin:.3f}"


def plot_similarity_distributions(
    panels: Mapping[str, Mapping[str, object]], bins: int = 40, ncols: int = 3,
    annotate: bool = True,
) -> Figure:
    """Histograms (density) with KDE curves of similarities by role, one panel per model.

    panels: {panel title: {role: similarities}} with roles "positive", "hard", "easy" and/or
    "negative" (e.g. `SimilarityStats.distributions()`). All panels share the x axis and bins, so
    shifts between models read directly. With `annotate`, each panel states the overlap
    coefficient, AUROC and mean gap of positives vs hard negatives (`analysis.overlap_metrics`).
    """
    values = {title: {role: as_float_array(v, f"{title}/{role}").ravel()
                      for role, v in roles.items()} for title, roles in panels.items()}
    everything = np.concatenate([v for roles in values.values() for v in roles.values()])
    edges = np.histogram_bin_edges(everything, bins=bins)
    with matplotlib.rc_context(style_rc()):
        fig, axes = _panel_grid(len(values), ncols, sharex=True)
        for ax, (title, roles) in zip(axes, values.items()):
            for role, v in roles.items():
                sns.histplot(x=v, bins=edges, stat="density", kde=np.ptp(v) > 0, element="step",
                             alpha=0.3, color=ROLE_COLORS.get(role),
                             label=ROLE_LABELS.get(role, role), ax=ax)
            note = _overlap_note(roles) if annotate else ""
            ax.text(0.02, 0.97, note, transform=ax.transAxes, va="top", fontsize="small")
            ax.set(title=title, xlabel="cosine similarity", ylabel="density")
        _shared_legend(fig, axes)
    return fig


def plot_similarity_bars(
    table, group: str = "model", panel: str | None = None,
    roles: Sequence[str] = ("positive", "hard", "easy"),
) -> Figure:
    """LLaVE's Table 1 as grouped bars: mean similarity of each role for each model.

    table: DataFrame or records with columns `group`, the `roles` (e.g. rows of
    `SimilarityStats.as_dict()` plus a "model" key) and optionally `panel` (e.g. "dataset", one
    panel per value). Bars are labelled with their values; the widening positive-hard gap is
    LLaVE's reading.
    """
    frame = _as_frame(table, [group, *roles] + ([panel] if panel else []))
    groups = list(dict.fromkeys(frame[panel])) if panel else [None]
    width = 0.8 / len(roles)
    with matplotlib.rc_context(style_rc()):
        fig, axes = _panel_grid(len(groups), sharey=True)
        for ax, name in zip(axes, groups):
            rows = frame if name is None else frame[frame[panel] == name]
            x = np.arange(len(rows))
            for i, role in enumerate(roles):
                bars = ax.bar(x + (i - (len(roles) - 1) / 2) * width, rows[role], width,
                              color=ROLE_COLORS.get(role), label=ROLE_LABELS.get(role, role))
                ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=1)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xticks(x, rows[group].astype(str))
            ax.set(title=name or "", ylabel="mean cosine similarity")
        _shared_legend(fig, axes)
    return fig


# --------------------------------------------------------------------------------------------------
# Gradient view and alpha sweep


def plot_gradient_share(
    curves: Mapping[str, tuple[object, object]], log_scale: bool = True
) -> Figure:
    """Each negative's share of its row's gradient against its similarity, one series per loss.

    curves: {label: (similarities, shares)} of the negatives only, e.g. from
    `analysis.gradient_share` at alpha = 0 (InfoNCE) and alpha = 9 (LLaVE). A single row draws a
    curve; a batch of rows draws a cloud. Log y shows how steeply each loss favours hard negatives.
    """
    if not curves:
        raise ValueError("nothing to plot: no curves given")
    with matplotlib.rc_context(style_rc()):
        fig, (ax,) = _panel_grid(1, size=(5.0, 3.6))
        for label, (sims, shares) in curves.items():
            sims = as_float_array(sims, f"{label} similarities").ravel()
            shares = as_float_array(shares, f"{label} shares").ravel()
            order = np.argsort(sims)
            ax.plot(sims[order], shares[order], marker="o", markersize=3, linewidth=1, label=label)
        if log_scale:
            ax.set_yscale("log")
        ax.set(xlabel="similarity of the negative $s_{ij}$", ylabel="share of negative gradient",
               title="Where the push on negatives goes")
        ax.legend(fontsize="small")
    return fig


CI_NOTE = "bars: 95 % CI, bootstrap over seeds and queries"
VERDICT_COLORS = {"reproduced": PALETTE[2], "contradicted": PALETTE[3],
                  "inconclusive": PALETTE[7]}


def plot_intervals(
    table, x: str, hue: str | None = None, panel: str = "metric", connect: bool = False,
    title: str = "",
) -> Figure:
    """Means with 95 % confidence intervals, one panel per `panel` value (e.g. per metric).

    table: rows with columns `x`, "mean", "ci_low", "ci_high", `panel` and optionally `hue`
    (e.g. `studies.arm_intervals`). `connect` joins points along a numeric x (an alpha sweep).
    Each panel's y range fits its intervals, so small differences stay visible: read the axis.
    """
    frame = _as_frame(table, [x, panel, "mean", "ci_low", "ci_high"] + ([hue] if hue else []))
    panels = list(dict.fromkeys(frame[panel]))
    categories = list(dict.fromkeys(frame[x]))  # x positions when x is not numeric
    series = list(frame.groupby(hue, sort=False)) if hue else [(None, frame)]
    offsets = np.linspace(-0.15, 0.15, len(series)) if len(series) > 1 and not connect else \
        np.zeros(len(series))
    with matplotlib.rc_context(style_rc()):
        fig, axes = _panel_grid(len(panels), ncols=min(3, len(panels)))
        for ax, name in zip(axes, panels):
            for offset, (label, rows) in zip(offsets, series):
                rows = rows[rows[panel] == name]
                positions = rows[x].to_numpy(dtype=float) if connect else \
                    np.array([categories.index(v) for v in rows[x]], float)
                mean, low, high = (rows[c].to_numpy(dtype=float) for c in ("mean", "ci_low", "ci_high"))
                ax.errorbar(positions + offset, mean, yerr=np.stack([mean - low, high - mean]),
                            marker="o", capsize=4, linestyle="-" if connect else "none",
                            label=label)
            if not connect:
                ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
            ax.set(title=str(name), xlabel=x if connect else "")
        fig.suptitle(f"{title}\n{CI_NOTE}" if title else CI_NOTE, fontsize="medium")
        if hue:
            _shared_legend(fig, axes)
    return fig


def plot_effects(effects, title: str = "") -> Figure:
    """A forest plot: each reading's estimate and 95 % CI against 0, coloured by its verdict.

    effects: rows with "reading", "estimate", "ci_low", "ci_high", "verdict"
    (`studies.paper_readings`). Readings measure different things (P@1, similarity, AUROC), so
    each row is read against 0, not against the others.
    """
    frame = _as_frame(effects, ["reading", "estimate", "ci_low", "ci_high", "verdict"])
    with matplotlib.rc_context(style_rc()):
        fig, (ax,) = _panel_grid(1, size=(7.5, 0.55 * len(frame) + 1.4))
        y = np.arange(len(frame))[::-1]
        for yi, row in zip(y, frame.to_dict("records")):
            color = VERDICT_COLORS.get(row["verdict"], PALETTE[7])
            ax.plot([row["ci_low"], row["ci_high"]], [yi, yi], color=color, linewidth=3)
            ax.plot(row["estimate"], yi, "o", color=color)
            ax.annotate(row["verdict"], (1.01, yi), xycoords=("axes fraction", "data"),
                        va="center", fontsize="small", color=color)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, [textwrap.fill(r, 48) for r in frame["reading"]], fontsize="small")
        ax.set(xlabel="estimate (difference), 95 % CI", title=title or "The paper's readings")
    return fig


# --------------------------------------------------------------------------------------------------
# Retrieval and clustering summaries


def plot_metric_bars(
    table, x: str = "meta_task", y: str = "p@1", hue: str | None = "model"
) -> Figure:
    """Grouped bars of `y` per `x` (and `hue`), averaging rows that share (x, hue).

    E.g. P@1 per MMEB meta-task per model (rows = tasks with a "meta_task" column), or clustering
    scores in long form (x="metric", y="value", hue="model").
    """
    frame = _as_frame(table, [x, y] + ([hue] if hue else []))
    with matplotlib.rc_context(style_rc()):
        fig, (ax,) = _panel_grid(1, size=(max(4.5, 1.2 * frame[x].nunique()), 3.4))
        sns.barplot(data=frame, x=x, y=y, hue=hue, errorbar=None, ax=ax)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.2f", fontsize="x-small", padding=1)
        if frame[y].between(0, 1).all():
            ax.set_ylim(0, 1.08)
        ax.set(xlabel=x, ylabel=y)
        if hue:
            ax.legend(fontsize="small", title=hue)
    return fig


def plot_projection(
    panels: Mapping[str, tuple[object, object]],
    scores: Mapping[str, Mapping[str, float]] | None = None, ncols: int = 3,
) -> Figure:
    """Scatter of 2-D projections coloured by label, one panel per model.

    panels: {title: (points (N, 2), labels (N,))}, e.g. from `evaluation.project_2d`. scores:
    optional {title: {"nmi": .., "ari": ..}} (e.g. `ClusteringResult.as_dict()`) shown in titles.
    """
    with matplotlib.rc_context(style_rc()):
        fig, axes = _panel_grid(len(panels), ncols, size=(3.6, 3.4))
        for ax, (title, (points, labels)) in zip(axes, panels.items()):
            points = as_float_array(points, f"{title} points")
            if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(labels):
                raise ValueError(f"{title}: points must be (N, 2) with N labels, got "
                                 f"{points.shape} and {len(labels)} labels")
            hue = np.asarray(labels).astype(str)
            sns.scatterplot(x=points[:, 0], y=points[:, 1], hue=hue, hue_order=sorted(set(hue)),
                            s=14, linewidth=0, ax=ax, legend=ax is axes[-1])
            detail = " · ".join(f"{k} {v:.3g}" for k, v in (scores or {}).get(title, {}).items())
            ax.set_title(f"{title}\n{detail}" if detail else title)
            ax.set(xticks=[], yticks=[])
        if axes[-1].get_legend():
            sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1, 1), fontsize="small")
    return fig


def plot_failure_cases(failures: Sequence[Mapping[str, object]], title: str = "") -> Figure:
    """One row per failed query: the query, the candidate the model chose, and the positive.

    failures: dicts with query_text/query_image, chosen_text/chosen_image, positive_text/
    positive_image (images may be None) and "margin" (chosen minus positive similarity), e.g.
    from `studies.hardest_failures`.
    """
    columns = (("query", "query"), ("chosen", "model's choice"), ("positive", "positive"))
    with matplotlib.rc_context(style_rc()):
        fig = Figure(figsize=(8.4, 1.9 * max(len(failures), 1)), layout="constrained")
        axes = fig.subplots(max(len(failures), 1), 3, squeeze=False)
        for row, failure in zip(axes, failures):
            for ax, (key, heading) in zip(row, columns):
                image, text = failure.get(f"{key}_image"), failure.get(f"{key}_text") or ""
                if image is not None:
                    ax.imshow(image)
                caption = text.replace(IMAGE_PLACEHOLDER, "").strip()
                if key == "chosen":
                    caption += f"\n(margin {failure['margin']:+.3f})"
                ax.set_title(f"{heading}\n{caption}", fontsize="x-small", wrap=True)
                ax.set(xticks=[], yticks=[])
                ax.set_frame_on(image is not None)
        if not failures:
            axes[0, 0].set_title("no failures")
        fig.suptitle(title)
    return fig


def plot_training_curves(history: Sequence[Mapping[str, float]], keys=("loss", "lr")) -> Figure:
    """Per-step training records (e.g. `TrainResult.history`) against step, one panel per key."""
    frame = _as_frame(history, ["step", *keys])
    with matplotlib.rc_context(style_rc()):
        fig, axes = _panel_grid(len(keys), size=(4.2, 3.0))
        for ax, key in zip(axes, keys):
            ax.plot(frame["step"], frame[key], linewidth=1)
            ax.set(xlabel="step", ylabel=key, title=key)
    return fig
