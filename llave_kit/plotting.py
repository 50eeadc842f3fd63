"""Figures for the LLaVE study, in one consistent style, readable without the code behind them.

- `plot_similarity_distributions`: positive vs hard vs easy negative similarities, one panel per
  model or condition (InfoNCE vs weighted, before vs after), annotated with overlap and AUROC.
- `plot_similarity_bars`: LLaVE's Table 1 as grouped bars (positive / hard / easy per model).
- `plot_gradient_share`: each negative's share of the gradient against its similarity.
- `plot_intervals`: means with 95 % CIs per arm or per alpha (bootstrap over seeds and queries).
- `plot_effects`: a forest plot of the paper's readings, each difference with its CI and verdict.
- `plot_metric_bars`: grouped bars, e.g. P@1 per meta-task and model, or clustering scores.
- `plot_projection`: 2-D projections (`evaluation.project_2d`) coloured by label.
- `plot_failure_cases`: the hardest failures, query / model's choice / positive, differences marked.

Every function takes plain data (mappings, DataFrames, arrays) and returns a `KitFigure`: a
matplotlib Figure built without pyplot that IPython displays by itself as a PNG (in JupyterLab,
papermill and nbconvert, no `%matplotlib inline` needed; where the inline backend is active, its
renderer takes over and the figure still shows once). pyplot keeps no reference to it, and PNG
and SVG are rendered by the Agg and SVG backends whatever backend is configured. Titles, axis
labels and legends are in words and symbols (`METRIC_TITLES`, `COLUMN_NAMES`), and figures whose
marks need a definition carry a caption under them. `save_figure(fig, "figures/name")` writes
name.png and name.svg atomically; `set_style()` gives the user's own pyplot figures the same look.

Example (similarities drawn at random in place of two models'):
    >>> import tempfile
    >>> rng = np.random.default_rng(0)
    >>> fig = plot_similarity_distributions({
    ...     "InfoNCE": {"positive": rng.normal(0.90, 0.03, 300), "hard": rng.normal(0.80, 0.04, 300)},
    ...     "LLaVE α=9": {"positive": rng.normal(0.85, 0.03, 300), "hard": rng.normal(0.65, 0.05, 300)},
    ... })
    >>> [path.name for path in save_figure(fig, f"{tempfile.mkdtemp()}/similarity_distributions")]
    ['similarity_distributions.png', 'similarity_distributions.svg']
"""
from __future__ import annotations

import difflib
import io
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from cycler import cycler
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch
from matplotlib.text import Annotation
from matplotlib.textpath import TextToPath
from scipy.stats import gaussian_kde

from llave_kit.analysis import as_float_array, overlap_metrics
from llave_kit.data import IMAGE_PLACEHOLDER
from llave_kit.files import atomic_path

PALETTE = sns.color_palette("colorblind")
ROLE_COLORS = {"positive": PALETTE[2], "hard": PALETTE[3], "easy": PALETTE[0],
               "negative": PALETTE[7]}
ROLE_LABELS = {"positive": "positive", "hard": "hard negatives (top-k)",
               "easy": "easy negatives (bottom-k)", "negative": "all negatives"}
FORMATS = ("png", "svg")
SVG_SALT = "llave-kit"  # fixed SVG ids: redrawing the same figure gives the same file

# Short names of metric values, for ticks and legends.
SHORT_NAMES = {"p@1": "P@1", "mrr": "MRR", "auroc": "AUROC", "nmi": "NMI", "ari": "ARI",
               "purity": "purity"}
# Axis and legend names of the kit's table columns; "" where the values name themselves.
COLUMN_NAMES = {
    "alpha_value": "α", "alpha": "α", "temperature": "τ", "p@1": "P@1", "mrr": "MRR",
    "meta_task": "meta-task", "level": "candidate list", "value": "score", "lr": "learning rate",
    "metric": "", "model": "", "arm": "", "label": "", "group": "", "panel": "",
}
SCORE_DEFINITIONS = {
    "nmi": "NMI: normalised mutual information between the k-means clusters of the embeddings "
           "and the true labels (0 = unrelated, 1 = the same partition)",
    "ari": "ARI: adjusted Rand index of the clusters against the labels (0 = chance agreement, "
           "1 = the same partition)",
    "purity": "purity: share of points whose cluster's majority label is their own",
}
PROJECTION_NAMES = {"tsne": "t-SNE", "pca": "PCA", "umap": "UMAP"}


def _readable(column: str) -> str:
    return COLUMN_NAMES.get(column, str(column).replace("_", " "))


def metric_titles(k: int = 5, level: str | None = None) -> dict[str, str]:
    """Panel titles for the metrics of `studies.METRICS`, measured with the top-/bottom-`k`
    negatives of each query, on `level` candidate lists if given (for `plot_intervals`)."""
    lists = f" on {level} lists" if level else ""
    return {
        "p@1": f"P@1{lists} (positive ranked first)",
        "positive": "positive similarity",
        "hard": f"hard negatives: mean top-{k} similarity",
        "easy": f"easy negatives: mean bottom-{k} similarity",
        "gap": f"gap: positive − mean top-{k} hard",
        "auroc": "AUROC positive vs hard",
    }


METRIC_TITLES = metric_titles()  # the kit's default k = 5, as in the paper


# --------------------------------------------------------------------------------------------------
# Figures that display themselves, style and saving


class KitFigure(Figure):
    """A Figure that IPython shows as a PNG without pyplot.

    IPython renders figures only once pyplot has switched its matplotlib integration on, and
    this module never makes a pyplot figure, so a cell ending in a figure would print its repr.
    `_repr_png_` renders through Agg with a tight bounding box, like the inline backend. Where
    the inline backend is active its printer, registered for Figure, is found first and used
    instead: the figure is still shown once.
    """

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=self.dpi, bbox_inches="tight")
        return buffer.getvalue()


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


# --------------------------------------------------------------------------------------------------
# Text that fits: measured wrapping, captions


_TEXT_PATHS = TextToPath()
# Hinting at screen resolutions draws text a few per cent wider than its outline measures.
_WIDTH_SLACK = 0.94


def _text_width(text: str, prop: FontProperties) -> float:
    """Width of `text` in points, from the font's outlines (no renderer needed)."""
    return _TEXT_PATHS.get_text_width_height_descent(text, prop, ismath=False)[0]


def _wrap_words(words: Sequence[str], width: float, props: Sequence[FontProperties]) -> list[list[int]]:
    """Greedy lines (lists of word indices) no wider than `width` points; a longer word stands
    alone on its line."""
    space = _text_width(" ", props[0]) if props else 0.0
    lines: list[list[int]] = []
    used = 0.0
    for i, (word, prop) in enumerate(zip(words, props)):
        size = _text_width(word, prop)
        if lines and used + space + size <= width * _WIDTH_SLACK:
            lines[-1].append(i)
            used += space + size
        else:
            lines.append([i])
            used = size
    return lines


def _wrap(text: str, width: float, prop: FontProperties) -> str:
    """`text` with newlines so no line is wider than `width` points (paragraphs kept)."""
    paragraphs = []
    for paragraph in str(text).split("\n"):
        words = paragraph.split()
        lines = _wrap_words(words, width, [prop] * len(words))
        paragraphs.append("\n".join(" ".join(words[i] for i in line) for line in lines))
    return "\n".join(paragraphs)


def _caption_figure(width: float, height: float, caption: str):
    """A constrained-layout KitFigure and the (sub)figure to draw in: with a caption, the
    drawing sits above a strip holding the wrapped text (a strip, because constrained layout
    would put a bottom legend and a bottom label on top of each other)."""
    if not caption:
        fig = KitFigure(figsize=(width, height), layout="constrained")
        return fig, fig
    prop = FontProperties(size="small")
    text = _wrap(caption, width * 72 * 0.96, prop)
    strip = (text.count("\n") + 1) * 1.3 * prop.get_size_in_points() / 72 + 0.12
    fig = KitFigure(figsize=(width, height + strip), layout="constrained")
    body, foot = fig.subfigures(2, 1, height_ratios=[height, strip])
    foot.text(0.01, 0.92, text, fontproperties=prop, va="top", ha="left", color="0.25")
    return fig, body


def _panel_grid(n_panels: int, ncols: int = 3, size=(4.2, 3.2), caption: str = "", **subplot_kw):
    """A KitFigure with `n_panels` axes in rows of `ncols` (spare cells removed) and an optional
    caption under them. Returns (figure, axes); legends go in `axes[0].figure`."""
    if n_panels < 1:
        raise ValueError("nothing to plot: no panels given")
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, body = _caption_figure(size[0] * ncols, size[1] * nrows, caption)
    axes = body.subplots(nrows, ncols, squeeze=False, **subplot_kw).ravel()
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, list(axes[:n_panels])


def _shared_legend(axes, title: str | None = None) -> None:
    """One legend under all panels, each label once (panels may show different subsets), in as
    many columns as fit the figure's width."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig = axes[0].figure
    fig.legend(list(entries.values()), list(entries), loc="outside lower center",
               ncols=_legend_columns(entries, fig.bbox.width / fig.dpi), fontsize="small",
               title=title or None, title_fontsize="small")


def _legend_columns(labels: Sequence[str], width: float) -> int:
    """How many legend columns of these labels fit side by side in `width` inches."""
    prop = FontProperties(size="small")
    column = 40 + max(_text_width(line, prop) for label in labels for line in label.split("\n"))
    return max(1, min(len(labels), int(width * 72 // column)))


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
    versus = "" if negative == "hard" else "\n(vs all negatives)"
    return f"overlap {m.overlap:.2f}\nAUROC {m.auroc:.3f}\ngap {m.margin:.3f}{versus}"


def _overlap_caption(k: int | None) -> str:
    top = f"top-{k}" if k else "top-k"
    return ("overlap: the area under both the positive and the hard-negative density curves "
            "(hatched; 0 = disjoint, 1 = identical). "
            f"gap: mean positive − mean {top} hard-negative similarity. "
            "AUROC: the probability that a positive outscores a hard negative. "
            "Curves: Gaussian kernel density estimates; thin steps: histograms.")


def plot_similarity_distributions(
    panels: Mapping[str, Mapping[str, object]], bins: int = 40, ncols: int = 3,
    annotate: bool = True, k: int | None = None, caption: str | None = None,
) -> Figure:
    """Density curves and histogram outlines of similarities by role, one panel per model.

    panels: {panel title: {role: similarities}} with roles "positive", "hard", "easy" and/or
    "negative" (e.g. `SimilarityStats.distributions()`). All panels share the x axis and bins, so
    shifts between models read directly. Roles are drawn as lines (nothing is filled, so colours
    never mix); the area shared by the positive and hard-negative curves is hatched. With
    `annotate`, each panel states the overlap coefficient, AUROC and mean gap of positives vs
    hard negatives (`analysis.overlap_metrics`), and the caption (None: the default definitions,
    "": none) defines them; `k` is the number of hard / easy negatives per query, for the labels.
    """
    values = {title: {role: as_float_array(v, f"{title}/{role}").ravel()
                      for role, v in roles.items()} for title, roles in panels.items()}
    everything = np.concatenate([v for roles in values.values() for v in roles.values()])
    edges = np.histogram_bin_edges(everything, bins=bins)
    grid = np.linspace(edges[0], edges[-1], 512)
    labels = dict(ROLE_LABELS)
    if k:
        labels.update(hard=f"hard negatives (top-{k})", easy=f"easy negatives (bottom-{k})")
    if caption is None:
        caption = _overlap_caption(k) if annotate else ""
    with matplotlib.rc_context(style_rc()):
        fig, axes = _panel_grid(len(values), ncols, caption=caption, sharex=True)
        for ax, (title, roles) in zip(axes, values.items()):
            note = _overlap_note(roles) if annotate else ""
            ax.text(0.02, 0.97, note, transform=ax.transAxes, va="top", fontsize="small")
            densities = {}
            for role, v in roles.items():
                color = ROLE_COLORS.get(role)
                ax.hist(v, bins=edges, density=True, histtype="step", color=color, alpha=0.45,
                        linewidth=0.8)
                if np.ptp(v) > 0:
                    densities[role] = gaussian_kde(v)(grid)  # Scott's rule, as overlap_metrics
                    ax.plot(grid, densities[role], color=color, linewidth=2,
                            label=labels.get(role, role))
                else:  # a constant sample has no density curve: its histogram carries the label
                    ax.plot([], [], color=color, linewidth=2, label=labels.get(role, role))
            negative = "hard" if "hard" in densities else "negative"
            if annotate and "positive" in densities and negative in densities:
                ax.fill_between(grid, np.minimum(densities["positive"], densities[negative]),
                                facecolor="none", edgecolor="0.35", hatch="////", linewidth=0,
                                label="overlap (area under both curves)")
            ax.set(title=title, xlabel="cosine similarity", ylabel="density")
        _shared_legend(axes)
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
        _shared_legend(axes)
    return fig


# --------------------------------------------------------------------------------------------------
# Gradient view and alpha sweep


def _power_of_ten(x: float) -> str:
    """1e-06 as '10⁻⁶' (other numbers as %g), for text on figures."""
    exponent = round(math.log10(x))
    if not math.isclose(x, 10.0 ** exponent):
        return f"{x:g}"
    return "10" + str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


def plot_gradient_share(
    curves: Mapping[str, tuple[object, object]], log_scale: bool = True,
    temperature: float | None = None, floor: float = 1e-6, caption: str | None = None,
) -> Figure:
    """Each negative's share of its row's gradient against its similarity, one series per loss.

    curves: {label: (similarities, shares)} of the negatives only, e.g. from
    `analysis.gradient_share` at alpha = 0 (InfoNCE) and alpha = 9 (LLaVE). A single row draws a
    curve; a batch of rows draws a cloud. A curve equal to an earlier one (np.allclose) is drawn
    dashed with open markers over it and its label says so. Log y shows how steeply each loss
    favours hard negatives; it stops at `floor` times the largest share, where shares stop
    mattering (the caption says so; None: that default, "": none). `temperature` goes in the
    title.
    """
    if not curves:
        raise ValueError("nothing to plot: no curves given")
    series = []
    for label, (sims, shares) in curves.items():
        sims = as_float_array(sims, f"{label} similarities").ravel()
        shares = as_float_array(shares, f"{label} shares").ravel()
        order = np.argsort(sims, kind="stable")
        series.append((label, sims[order], shares[order]))
    top = max(shares.max() for _, _, shares in series)
    lowest = min(sims.min() for _, sims, _ in series)
    visible = np.concatenate([sims[shares >= top * floor] for _, sims, shares in series])
    cut = log_scale and visible.min() > lowest  # some negatives fall below the floor
    if caption is None:
        caption = (f"Log scale from {_power_of_ten(floor)} × the largest share up: negatives less "
                   f"similar than {visible.min():.2f} get less than that under every loss shown."
                   if cut else "")
    labels = []
    for i, (label, sims, shares) in enumerate(series):
        same = next((other for other, other_sims, other_shares in series[:i]
                     if other_sims.shape == sims.shape and np.allclose(other_sims, sims)
                     and np.allclose(other_shares, shares)), None)
        labels.append((label, False) if same is None else (f"{label}\n(coincides with {same})", True))
    with matplotlib.rc_context(style_rc()):
        ncols = _legend_columns([label for label, _ in labels], 5.0)
        legend_lines = math.ceil(len(labels) / ncols) + sum(label.count("\n") for label, _ in labels)
        fig, (ax,) = _panel_grid(1, size=(5.0, 3.4 + 0.2 * legend_lines), caption=caption)
        for (label, coincides), (_, sims, shares) in zip(labels, series):
            if coincides:  # dashed over the curve it equals, open markers, so both show
                ax.plot(sims, shares, marker="o", markersize=6, markerfacecolor="none",
                        linestyle="--", linewidth=1.5, label=label)
            else:
                ax.plot(sims, shares, marker="o", markersize=3, linewidth=1, label=label)
        if log_scale:
            ax.set_yscale("log")
            ax.set_ylim(top * floor, top * 2)
        if cut:
            high = max(sims.max() for _, sims, _ in series)
            ax.set_xlim(visible.min() - 0.04 * (high - visible.min()),
                        high + 0.04 * (high - visible.min()))
        where = "Where the push on negatives goes"
        ax.set(xlabel="similarity of the negative $s_{ij}$", ylabel="share of negative gradient",
               title=f"{where} (τ = {temperature:.3g})" if temperature is not None else where)
        _shared_legend([ax])
    return fig


CI_NOTE = "bars: 95 % CI, bootstrap over seeds and queries"
VERDICT_COLORS = {"reproduced": PALETTE[2], "contradicted": PALETTE[3],
                  "inconclusive": PALETTE[7]}
# A y axis spanning less than this fraction of its largest value, 0 out of view, gets a note.
NARROW_SPAN = 0.1


def _category_labels(categories: Sequence) -> tuple[list[str], float]:
    """Tick labels wrapped to one slot each, and the slot width in points: wide enough for the
    longest word, so labels never run into each other."""
    prop = FontProperties(size=matplotlib.rcParams["xtick.labelsize"])
    words = [word for category in categories for word in str(category).split()]
    slot = max([64.0] + [_text_width(word, prop) / _WIDTH_SLACK for word in words]) + 10
    return [_wrap(category, slot - 8, prop) for category in categories], slot


def _note_narrow_axis(ax) -> None:
    """State a panel's y range when the axis is zoomed far in, so a small spread is not read as
    a large one; the note gets headroom above the data."""
    low, high = ax.get_ylim()
    if low <= 0 <= high or high - low >= NARROW_SPAN * max(abs(low), abs(high)):
        return
    high += 0.15 * (high - low)
    ax.set_ylim(low, high)
    decimals = max(2, math.ceil(-math.log10(high - low)))
    ax.text(0.02, 0.97, f"y axis: {low:.{decimals}f}–{high:.{decimals}f} (zoomed in)",
            transform=ax.transAxes, va="top", fontsize="x-small", color="0.3")


def plot_intervals(
    table, x: str, hue: str | None = None, panel: str = "metric", connect: bool = False,
    title: str = "", xlabel: str | None = None, legend_title: str | None = None,
    caption: str = "", panel_titles: Mapping[str, str] | None = None,
) -> Figure:
    """Means with 95 % confidence intervals, one panel per `panel` value (e.g. per metric).

    table: rows with columns `x`, "mean", "ci_low", "ci_high", `panel` and optionally `hue`
    (e.g. `studies.arm_intervals`). `connect` joins points along a numeric x (an alpha sweep);
    series sharing an x are drawn side by side. Each panel's y range fits its intervals, so small
    differences stay visible; a panel zoomed far in states its range.

    Panels are titled by `METRIC_TITLES` (updated by `panel_titles`, e.g. `metric_titles(k,
    level)`), other values as they are.
    xlabel: None names a numeric x by `COLUMN_NAMES` (e.g. "alpha_value" -> "α") and leaves
    categories unlabelled; legend_title: None for none. caption: text under the figure, e.g. how
    a control is placed. Category labels are wrapped to fit their slot and the panels widen to
    fit them.
    """
    frame = _as_frame(table, [x, panel, "mean", "ci_low", "ci_high"] + ([hue] if hue else []))
    panels = list(dict.fromkeys(frame[panel]))
    titles = {**METRIC_TITLES, **(panel_titles or {})}
    categories = list(dict.fromkeys(frame[x]))  # x positions when x is not numeric
    series = list(frame.groupby(hue, sort=False)) if hue else [(None, frame)]
    if connect:
        span = float(np.ptp(frame[x].to_numpy(dtype=float))) or 1.0
        offsets = np.linspace(-0.012, 0.012, len(series)) * span
    else:
        offsets = np.linspace(-0.15, 0.15, len(series)) if len(series) > 1 else np.zeros(1)
    if xlabel is None:
        xlabel = _readable(x) if connect else ""
    with matplotlib.rc_context(style_rc()):
        size = (4.2, 3.2)
        if not connect:
            ticks, slot = _category_labels(categories)
            size = (max(size[0], len(categories) * slot / 72 + 0.9), size[1])
        fig, axes = _panel_grid(len(panels), ncols=min(3, len(panels)), size=size,
                                caption=caption)
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
                ax.set_xticks(range(len(categories)), ticks)
                ax.set_xlim(-0.5, len(categories) - 0.5)
            ax.set(title=titles.get(name, str(name)), xlabel=xlabel)
            _note_narrow_axis(ax)
        fig.suptitle(f"{title}\n{CI_NOTE}" if title else CI_NOTE, fontsize="medium")
        if hue:
            _shared_legend(axes, legend_title)
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
    table, x: str = "meta_task", y: str = "p@1", hue: str | None = "model",
    xlabel: str | None = None, ylabel: str | None = None, legend_title: str | None = None,
) -> Figure:
    """Grouped bars of `y` per `x` (and `hue`), averaging rows that share (x, hue).

    E.g. P@1 per MMEB meta-task per model (rows = tasks with a "meta_task" column), or clustering
    scores in long form (x="metric", y="value", hue="model"). Labels default to `COLUMN_NAMES`
    (None) and metric values are written as `SHORT_NAMES` ("nmi" -> "NMI"); "" hides a label.
    The axes widen with the number of bars, so value labels and category labels fit.
    """
    frame = _as_frame(table, [x, y] + ([hue] if hue else []))
    frame = frame.assign(**{x: frame[x].map(lambda v: SHORT_NAMES.get(v, v))})
    categories = list(dict.fromkeys(frame[x]))
    bars_per_group = frame[hue].nunique() if hue else 1
    with matplotlib.rc_context(style_rc()):
        ticks, slot = _category_labels(categories)
        slot = max(slot, 24 * bars_per_group / 0.8)  # 24 pt per bar holds its "0.97" label
        width = max(4.5, len(categories) * slot / 72 + 1.0 + (2.2 if hue else 0))
        fig, (ax,) = _panel_grid(1, size=(width, 3.4))
        sns.barplot(data=frame, x=x, y=y, hue=hue, order=categories, errorbar=None, ax=ax)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.2f", fontsize="x-small", padding=1)
        ax.set_xticks(range(len(categories)), ticks)
        if frame[y].between(0, 1).all():
            ax.set_ylim(0, 1.08)
        ax.set(xlabel=_readable(x) if xlabel is None else xlabel,
               ylabel=_readable(y) if ylabel is None else ylabel)
        if hue:
            title = _readable(hue) if legend_title is None else legend_title
            ax.legend(fontsize="small", title=title or None, title_fontsize="small",
                      loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _label_groups(panels: Mapping[str, tuple[object, object]]) -> dict[tuple, list[str]]:
    """Panel titles grouped by their set of labels (in sorted label order), in input order."""
    groups: dict[tuple, list[str]] = {}
    for title, (_, labels) in panels.items():
        groups.setdefault(tuple(np.unique(np.asarray(labels)).astype(str)), []).append(title)
    return groups


def plot_projection(
    panels: Mapping[str, tuple[object, object]],
    scores: Mapping[str, Mapping[str, float]] | None = None, ncols: int = 3,
    method: str | None = None, caption: str | None = None,
) -> Figure:
    """Scatter of 2-D projections coloured by label, one panel per model.

    panels: {title: (points (N, 2), labels (N,))}, e.g. from `evaluation.project_2d`. Panels with
    the same set of labels form a group: it starts a new row and gets its own legend, right of its
    first row. scores: optional {title: {"nmi": .., "ari": ..}} (e.g.
    `ClusteringResult.as_dict()`) written under the titles ("NMI 0.52 · ARI 0.31"). method: the
    projection ("tsne", "pca", "umap" or any name), stated in the title. caption: None defines the
    scores shown, "" for none.
    """
    groups = _label_groups(panels)
    ncols = min(ncols, max(len(titles) for titles in groups.values()))
    rows = [(order, titles[i:i + ncols], i == 0) for order, titles in groups.items()
            for i in range(0, len(titles), ncols)]
    shown = list(dict.fromkeys(key for s in (scores or {}).values() for key in s))
    if caption is None:
        caption = ". ".join(SCORE_DEFINITIONS[key] for key in shown if key in SCORE_DEFINITIONS)
        caption = f"{caption}." if caption else ""
    with matplotlib.rc_context(style_rc()):
        fig, body = _caption_figure(3.6 * ncols + 1.2, 3.4 * len(rows), caption)
        grid = body.subplots(len(rows), ncols, squeeze=False)
        for row_axes, (order, titles, first_row) in zip(grid, rows):
            for ax in row_axes[len(titles):]:
                ax.remove()
            for ax, title in zip(row_axes, titles):
                with_legend = first_row and title == titles[-1]
                points, labels = panels[title]
                points = as_float_array(points, f"{title} points")
                if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(labels):
                    raise ValueError(f"{title}: points must be (N, 2) with N labels, got "
                                     f"{points.shape} and {len(labels)} labels")
                sns.scatterplot(x=points[:, 0], y=points[:, 1],
                                hue=np.asarray(labels).astype(str), hue_order=list(order), s=14,
                                linewidth=0, ax=ax, legend=with_legend)
                detail = " · ".join(f"{SHORT_NAMES.get(k, k)} {v:.2f}"
                                    for k, v in (scores or {}).get(title, {}).items())
                ax.set_title(f"{title}\n{detail}" if detail else title)
                ax.set(xticks=[], yticks=[])
                if with_legend:
                    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), fontsize="small",
                                    ncols=1 + len(order) // 13, markerscale=1.5)
        name = PROJECTION_NAMES.get(str(method).lower(), method) if method else "2-D projection"
        fig.suptitle(f"{name} of the embeddings, coloured by true label", fontsize="medium")
    return fig


# --------------------------------------------------------------------------------------------------
# Failure cases: laid out in inches, so captions are sized to their text and never overlap

CARD_WIDTH = 2.55  # inches per column
CARD_GAP = 0.3
FIGURE_MARGIN = 0.15
IMAGE_SIZE = 1.2
TEXT_POINTS = 9.0
LINE = 1.4 * TEXT_POINTS / 72  # inches between caption lines
HEADING = 1.7 * TEXT_POINTS / 72
CARD_PADDING = 0.08  # around the text of a text-only candidate
ROW_GAP = 0.24
FAILURE_COLUMNS = (("query", "query"), ("chosen", "model's choice"), ("positive", "positive"))
FAILURE_GUIDE = ("Each row: a query the model got wrong. margin: the similarity of the model's "
                 "choice to the query minus that of the positive. Bold colour: the words where "
                 "the model's choice and the positive differ.")


def _caption_words(text) -> list[str]:
    return str(text or "").replace(IMAGE_PLACEHOLDER, " ").split()


def _differing_words(a: Sequence[str], b: Sequence[str]) -> tuple[set[int], set[int]]:
    """Indices of the words of `a` and of `b` outside their longest common word runs (case and
    punctuation ignored): where two captions say different things."""
    def key(words):
        return [word.lower().strip(".,;:!?\"'()") for word in words]
    in_a, in_b = set(), set()
    matcher = difflib.SequenceMatcher(None, key(a), key(b), autojunk=False)
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag != "equal":
            in_a.update(range(a0, a1))
            in_b.update(range(b0, b1))
    return in_a, in_b


def _card(failure: Mapping[str, object], key: str, marked: set[int]) -> dict:
    """What one cell shows: an optional image and its caption words, wrapped to fit."""
    image = failure.get(f"{key}_image")
    words = _caption_words(failure.get(f"{key}_text"))
    boxed = image is None and bool(words)
    width = (CARD_WIDTH - (2 * CARD_PADDING if boxed else 0)) * 72
    props = [FontProperties(size=TEXT_POINTS, weight="bold" if i in marked else "normal")
             for i in range(len(words))]
    lines = _wrap_words(words, width, props)
    text_height = len(lines) * LINE + (2 * CARD_PADDING if boxed else 0)
    height = HEADING + (IMAGE_SIZE + 0.06 if image is not None else 0) + text_height
    return {"image": image, "words": words, "props": props, "lines": lines, "marked": marked,
            "boxed": boxed, "height": height}


class _InchCanvas:
    """Draws on a figure at positions in inches from its lower left, through figure-fraction
    coordinates: those follow the tight bounding box when the figure is saved, inches do not."""

    def __init__(self, fig: Figure):
        self.fig = fig
        self.width, self.height = fig.get_size_inches()

    def text(self, x: float, y: float, text: str, **kwargs):
        return self.fig.text(x / self.width, y / self.height, text, va="top", **kwargs)

    def box(self, x: float, y: float, width: float, height: float) -> None:
        self.fig.add_artist(FancyBboxPatch(
            (x / self.width, y / self.height), width / self.width, height / self.height,
            boxstyle="round,pad=0,rounding_size=0.06", mutation_scale=1 / self.width,
            mutation_aspect=self.width / self.height, transform=self.fig.transFigure,
            facecolor="0.96", edgecolor="0.8", linewidth=0.8))

    def rule(self, y: float) -> None:
        self.fig.add_artist(Line2D(
            [FIGURE_MARGIN / self.width, 1 - FIGURE_MARGIN / self.width], [y / self.height] * 2,
            transform=self.fig.transFigure, color="0.85", linewidth=0.8))

    def image(self, x: float, top: float, image) -> None:
        ax = self.fig.add_axes([x / self.width, (top - IMAGE_SIZE) / self.height,
                                IMAGE_SIZE / self.width, IMAGE_SIZE / self.height])
        ax.imshow(image)
        ax.set(xticks=[], yticks=[])

    def words(self, card: dict, left: float, top: float, color) -> None:
        """Caption lines from (left, top); marked words bold in `color`. Each word is anchored
        to the right edge of the one before it, so spacing follows the rendered widths."""
        space = _text_width(" ", FontProperties(size=TEXT_POINTS))
        for n, line in enumerate(card["lines"]):
            previous = None
            for i in line:
                style = {"fontproperties": card["props"][i],
                         "color": color if i in card["marked"] else "0.15"}
                if previous is None:
                    previous = self.text(left, top - n * LINE, card["words"][i], **style)
                else:
                    previous = self.fig.add_artist(Annotation(
                        card["words"][i], xy=(1, 0), xycoords=previous, xytext=(space, 0),
                        textcoords="offset points", va="bottom", **style))


def plot_failure_cases(failures: Sequence[Mapping[str, object]], title: str = "") -> Figure:
    """One row per failed query: the query, the candidate the model chose, and the positive.

    failures: dicts with query_text/query_image, chosen_text/chosen_image, positive_text/
    positive_image (images may be None) and "margin" (chosen minus positive similarity), e.g.
    from `studies.hardest_failures`; the image placeholder is dropped from texts. A candidate
    without an image is drawn as wrapped text in a panel; the words where the model's choice and
    the positive differ are bold, in the hard-negative and the positive colour. Rows are as tall
    as their content.
    """
    width = 2 * FIGURE_MARGIN + 3 * CARD_WIDTH + 2 * CARD_GAP
    rows = []
    for failure in failures:
        chosen = _caption_words(failure.get("chosen_text"))
        positive = _caption_words(failure.get("positive_text"))
        in_chosen, in_positive = _differing_words(chosen, positive)
        rows.append([_card(failure, "query", set()), _card(failure, "chosen", in_chosen),
                     _card(failure, "positive", in_positive)])
    colors = {"query": "0.15", "chosen": ROLE_COLORS["hard"], "positive": ROLE_COLORS["positive"]}
    with matplotlib.rc_context(style_rc()):
        guide_prop = FontProperties(size=TEXT_POINTS - 0.5)
        guide = _wrap(FAILURE_GUIDE, (width - 2 * FIGURE_MARGIN) * 72, guide_prop)
        header = (0.3 if title else 0) + 0.15 + \
            (guide.count("\n") + 1) * 1.35 * guide_prop.get_size_in_points() / 72
        body = sum(max(card["height"] for card in row) + ROW_GAP for row in rows) if rows else 0.4
        fig = KitFigure(figsize=(width, 2 * FIGURE_MARGIN + header + body))
        canvas = _InchCanvas(fig)
        top = canvas.height - FIGURE_MARGIN
        if title:
            canvas.text(FIGURE_MARGIN, top, title, fontsize="large")
        canvas.text(FIGURE_MARGIN, top - (0.3 if title else 0), guide, fontproperties=guide_prop,
                    color="0.3")
        top -= header
        if not rows:
            canvas.text(FIGURE_MARGIN, top, "no failures: the model ranks every positive first")
        for n, (failure, row) in enumerate(zip(failures, rows)):
            if n:
                canvas.rule(top + ROW_GAP / 2)
            for column, ((key, heading), card) in enumerate(zip(FAILURE_COLUMNS, row)):
                left = FIGURE_MARGIN + column * (CARD_WIDTH + CARD_GAP)
                if key == "chosen" and failure.get("margin") is not None:
                    heading = f"{heading}, margin {failure['margin']:+.3f}"
                canvas.text(left, top, heading, fontsize=TEXT_POINTS - 0.5, fontweight="bold",
                            color="0.35")
                y = top - HEADING
                if card["image"] is not None:
                    canvas.image(left, y, card["image"])
                    y -= IMAGE_SIZE + 0.06
                if card["boxed"]:
                    box_height = len(card["lines"]) * LINE + 2 * CARD_PADDING
                    canvas.box(left, y - box_height, CARD_WIDTH, box_height)
                    canvas.words(card, left + CARD_PADDING, y - CARD_PADDING, colors[key])
                else:
                    canvas.words(card, left, y, colors[key])
            top -= max(card["height"] for card in row) + ROW_GAP
    return fig


def plot_training_curves(history: Sequence[Mapping[str, float]], keys=("loss", "lr")) -> Figure:
    """Per-step training records (e.g. `TrainResult.history`) against step, one panel per key."""
    frame = _as_frame(history, ["step", *keys])
    with matplotlib.rc_context(style_rc()):
        fig, axes = _panel_grid(len(keys), size=(4.2, 3.0))
        for ax, key in zip(axes, keys):
            ax.plot(frame["step"], frame[key], linewidth=1)
            ax.set(xlabel="step", ylabel=_readable(key), title=_readable(key))
    return fig
