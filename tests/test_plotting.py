"""Every figure function draws the expected panels, saves non-empty PNG and SVG files, shows
itself inline in IPython, and reads without the code: words for names, defined marks, no
overlapping text."""
import itertools

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import same_color
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from matplotlib.text import Text

from llave_kit import plotting
from llave_kit.analysis import gradient_share, similarity_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_saved(fig, tmp_path, name, n_axes):
    assert isinstance(fig, plotting.KitFigure) and len(fig.axes) == n_axes
    png, svg = plotting.save_figure(fig, tmp_path / "figures" / name)
    assert (png.name, svg.name) == (f"{name}.png", f"{name}.svg")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    assert b"<svg" in svg.read_bytes()[:2000]
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]  # no temporary files


def stats_for(noise, seed):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(40, 8))
    cands = query[:, None, :] + noise * rng.normal(size=(40, 12, 8))
    cands[:, 0] = query + 0.3 * rng.normal(size=(40, 8))
    return similarity_stats(query, cands, k=3)


def test_similarity_distributions_one_panel_per_model(tmp_path):
    panels = {"InfoNCE": stats_for(1.0, 0).distributions(),
              "LLaVE a=9": stats_for(1.5, 1).distributions(),
              "before": {"positive": np.full(10, 0.5), "negative": np.linspace(-1, 1, 10)}}
    fig = plotting.plot_similarity_distributions(panels)
    assert_saved(fig, tmp_path, "distributions", n_axes=3)
    assert "AUROC" in fig.axes[0].texts[0].get_text()
    assert "AUROC" in fig.axes[2].texts[0].get_text()  # constant positives: histogram overlap


def test_similarity_bars_one_panel_per_dataset(tmp_path):
    table = [  # LLaVE's Table 1
        {"dataset": "SUN397", "model": "InfoNCE", "positive": .71, "hard": .65, "easy": .36},
        {"dataset": "SUN397", "model": "LLaVE", "positive": .66, "hard": .51, "easy": .03},
        {"dataset": "MSCOCO", "model": "InfoNCE", "positive": .82, "hard": .76, "easy": .39},
        {"dataset": "MSCOCO", "model": "LLaVE", "positive": .62, "hard": .52, "easy": -.02},
    ]
    fig = plotting.plot_similarity_bars(table, panel="dataset")
    assert_saved(fig, tmp_path, "table1", n_axes=2)
    heights = sorted(round(p.get_height(), 2) for p in fig.axes[1].patches)
    assert heights == sorted([.82, .76, .39, .62, .52, -.02])
    with pytest.raises(ValueError, match="lacks columns"):
        plotting.plot_similarity_bars([{"model": "x", "positive": 1.0}])


def test_gradient_share(tmp_path):
    sims = np.r_[0.9, np.linspace(-0.2, 0.8, 30)]
    curves = {f"alpha = {a}": (sims[1:], gradient_share(sims, alpha=a)[1:]) for a in (0, 9)}
    assert_saved(plotting.plot_gradient_share(curves), tmp_path, "gradient_share", n_axes=1)


def test_intervals_and_effects(tmp_path):
    rows = pd.DataFrame([{"alpha_value": a, "group": g, "metric": m, "mean": 0.5 + a / 100,
                          "ci_low": 0.45 + a / 100, "ci_high": 0.58 + a / 100}
                         for a in (0, 3, 9) for g in ("weighted", "matched") for m in ("p@1", "gap")])
    fig = plotting.plot_intervals(rows, x="alpha_value", hue="group", connect=True, title="sweep")
    assert_saved(fig, tmp_path, "alpha_sweep", n_axes=2)
    bars = fig.axes[0].containers[0]  # the first series' error bars: mean and CI bounds
    np.testing.assert_allclose(bars.lines[0].get_ydata(), [0.5, 0.53, 0.59])
    segments = bars.lines[2][0].get_segments()
    np.testing.assert_allclose([seg[:, 1] for seg in segments],
                               [[0.45, 0.58], [0.48, 0.61], [0.54, 0.67]])
    assert "95 % CI" in fig._suptitle.get_text()
    effects = pd.DataFrame([
        {"reading": "P@1 gain", "estimate": 0.03, "ci_low": 0.01, "ci_high": 0.05,
         "verdict": "reproduced"},
        {"reading": "gap gain", "estimate": 0.01, "ci_low": -0.01, "ci_high": 0.02,
         "verdict": "inconclusive"}])
    fig = plotting.plot_effects(effects)
    assert_saved(fig, tmp_path, "effects", n_axes=1)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["reproduced", "inconclusive"]
    with pytest.raises(ValueError, match="lacks columns"):
        plotting.plot_effects([{"reading": "x"}])


def test_metric_bars_and_projection(tmp_path):
    tasks = pd.DataFrame({"meta_task": ["classification", "classification", "vqa", "retrieval"] * 2,
                          "model": ["InfoNCE"] * 4 + ["LLaVE"] * 4,
                          "p@1": [0.5, 0.7, 0.4, 0.6, 0.6, 0.8, 0.5, 0.7]})
    fig = plotting.plot_metric_bars(tasks)
    assert_saved(fig, tmp_path, "retrieval", n_axes=1)
    assert sorted(round(p.get_height(), 2) for p in fig.axes[0].patches if p.get_height() > 0) == \
        [0.4, 0.5, 0.6, 0.6, 0.7, 0.7]  # classification averaged over its two tasks
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    panels = {name: (rng.normal(size=(30, 2)) + labels[:, None] * 3, labels) for name in ("a", "b")}
    fig = plotting.plot_projection(panels, scores={"a": {"nmi": 0.91, "ari": 0.88}})
    assert_saved(fig, tmp_path, "projection", n_axes=2)
    assert "NMI 0.91" in fig.axes[0].get_title()


def test_rerun_gives_identical_svg(tmp_path):
    def figure():
        sims = np.linspace(0.0, 0.9, 20)
        return plotting.plot_gradient_share({"InfoNCE": (sims[1:], gradient_share(sims, 0)[1:])})

    first = plotting.save_figure(figure(), tmp_path / "a", formats=("svg",))[0].read_bytes()
    second = plotting.save_figure(figure(), tmp_path / "b", formats=("svg",))[0].read_bytes()
    assert first == second  # no dates, fixed ids: unchanged figures do not churn in git


def test_save_figure_rejects_a_suffix_and_set_style_applies(tmp_path):
    fig = plotting.plot_gradient_share({"x": ([0.1, 0.2], [0.4, 0.6])})
    with pytest.raises(ValueError, match="without a suffix"):
        plotting.save_figure(fig, tmp_path / "figure.png")
    assert list(tmp_path.iterdir()) == []
    plotting.set_style()
    assert matplotlib.rcParams["svg.hashsalt"] == plotting.SVG_SALT


def drawn_boxes(fig):
    """(text, window extent) of every visible, non-empty text after an Agg draw."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip()]


def overlapping(boxes):
    """Pairs of boxes sharing more than half a pixel each way."""
    return [(a_name, b_name) for (a_name, a), (b_name, b) in itertools.combinations(boxes, 2)
            if min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5]


def all_text(fig):
    return " ".join(" ".join(t.get_text().split()) for t in fig.findobj(Text))


def test_figures_display_inline_as_png():
    import matplotlib.pyplot as plt
    from IPython.core.interactiveshell import InteractiveShell

    held_by_pyplot = plt.get_fignums()
    fig = plotting.plot_gradient_share({"x": ([0.1, 0.2], [0.4, 0.6])})
    # pyplot holds no reference, so an inline backend's end-of-cell flush cannot show it again.
    assert plt.get_fignums() == held_by_pyplot
    formatter = InteractiveShell.instance().display_formatter
    data, _ = formatter.format(fig)
    png = data["image/png"]
    assert png[:8] == PNG_MAGIC
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 300 and height > 200  # the IHDR chunk: a real image, not a stub
    # Where the inline backend is active, its printer for Figure wins: one image, not two.
    png_formatter = formatter.formatters["image/png"]
    previous = png_formatter.for_type(Figure, lambda figure: b"inline")
    try:
        assert formatter.format(fig)[0]["image/png"] == b"inline"
    finally:
        if previous is None:
            png_formatter.pop(Figure)
        else:
            png_formatter.for_type(Figure, previous)


def test_similarity_distributions_define_their_marks_and_do_not_mix_fills():
    fig = plotting.plot_similarity_distributions(
        {"InfoNCE": stats_for(1.0, 0).distributions(), "weighted": stats_for(1.5, 1).distributions()},
        k=3)
    words = all_text(fig)
    for definition in ("overlap: the area under both the positive and the hard-negative density",
                       "gap: mean positive − mean top-3 hard-negative similarity",
                       "AUROC: the probability that a positive outscores a hard negative"):
        assert definition in words
    assert "hard negatives (top-3)" in words
    for ax in fig.axes:
        assert not any(patch.get_fill() for patch in ax.patches)  # histograms are outlines
        (shared,) = ax.collections  # the only filled area: the hatched overlap, no face colour
        assert shared.get_hatch() and not any(color[3] for color in shared.get_facecolor())


def test_gradient_share_marks_coinciding_curves_and_cuts_the_log_axis():
    sims = np.r_[0.9, np.linspace(-0.3, 0.8, 40)]
    tau, alpha = 0.02, 9.0
    curves = {"weighted": (sims[1:], gradient_share(sims, 0, alpha, tau)[1:]),
              "matched τ": (sims[1:], gradient_share(sims, 0, 0.0, 1 / (1 / tau + alpha))[1:]),
              "InfoNCE": (sims[1:], gradient_share(sims, 0, 0.0, tau)[1:])}
    fig = plotting.plot_gradient_share(curves, temperature=tau)
    ax = fig.axes[0]
    (legend,) = fig.findobj(matplotlib.legend.Legend)
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels[0] == "weighted" and labels[2] == "InfoNCE"
    assert "(coincides with weighted)" in labels[1]
    styles = [line.get_linestyle() for line in ax.get_lines()]
    assert styles[1] == "--" and styles[0] == styles[2] == "-"
    top = max(shares.max() for _, shares in curves.values())
    np.testing.assert_allclose(ax.get_ylim()[0], top * 1e-6)
    assert ax.get_xlim()[0] > 0.4  # only where some share is above the floor
    assert "10⁻⁶ × the largest share" in all_text(fig)
    assert ax.get_title() == "Where the push on negatives goes (τ = 0.02)"
    linear = plotting.plot_gradient_share(curves, log_scale=False)
    assert linear.axes[0].get_yscale() == "linear" and "10⁻⁶" not in all_text(linear)


def test_intervals_read_in_words_and_state_a_narrow_axis():
    rows = [{"alpha_value": a, "group": g, "metric": m, "mean": mean, "ci_low": mean - 0.001,
             "ci_high": mean + 0.001}
            for a in (0.0, 3.0, 9.0) for g in ("hardness weighting", "matched InfoNCE")
            for m, mean in (("auroc", 0.55 + a / 3000), ("gap", 0.1 + a / 50))]
    caption = "The temperature-matched control is drawn at the α it matches."
    fig = plotting.plot_intervals(pd.DataFrame(rows), x="alpha_value", hue="group", connect=True,
                                  caption=caption)
    assert [ax.get_title() for ax in fig.axes] == [plotting.METRIC_TITLES["auroc"],
                                                   plotting.METRIC_TITLES["gap"]]
    assert [ax.get_xlabel() for ax in fig.axes] == ["α", "α"]
    notes = [[t.get_text() for t in ax.texts if t.get_text().startswith("y axis")] for ax in fig.axes]
    low, high = fig.axes[0].get_ylim()
    assert notes[0] == [f"y axis: {low:.3f}–{high:.3f} (zoomed in)"] and notes[1] == []
    assert 0.548 < low and high < 0.557
    (legend,) = fig.findobj(matplotlib.legend.Legend)
    assert legend.get_title().get_text() == ""
    words = all_text(fig)
    assert caption in words
    assert not {"alpha_value", "group", "auroc", "gap"} & set(words.split())

    ladder = pd.DataFrame([{"label": label, "metric": "p@1", "mean": 0.5, "ci_low": 0.4,
                            "ci_high": 0.6}
                           for label in ("1 InfoNCE", "2 + gather (x4 negatives)", "3 + focal",
                                         "4 + hardness weighting", "5 + a much longer rung name",
                                         "6 + temperature-matched control")])
    fig = plotting.plot_intervals(ladder, x="label", title="The ablation ladder",
                                  panel_titles=plotting.metric_titles(level="hard"))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "" and ax.get_title() == "P@1 on hard lists (positive ranked first)"
    ticks = [label for label in ax.get_xticklabels()]
    assert any("\n" in label.get_text() for label in ticks)  # wrapped, not run together
    boxes = [(t, box) for t, box in drawn_boxes(fig) if t in {label.get_text() for label in ticks}]
    assert len(boxes) == 6 and overlapping(boxes) == []


def test_projection_has_a_legend_per_label_set():
    rng = np.random.default_rng(0)
    digits = np.repeat(np.arange(3), 10)
    shapes = np.array(["circle", "square"] * 10)
    panels = {"digits · info_nce": (rng.normal(size=(30, 2)), digits),
              "digits · weighted": (rng.normal(size=(30, 2)), digits),
              "scenes · info_nce": (rng.normal(size=(20, 2)), shapes),
              "scenes · weighted": (rng.normal(size=(20, 2)), shapes)}
    fig = plotting.plot_projection(panels, scores={t: {"nmi": 0.52, "ari": 0.31} for t in panels},
                                   ncols=2, method="tsne")
    legends = [{t.get_text() for t in ax.get_legend().get_texts()}
               for ax in fig.axes if ax.get_legend()]
    assert legends == [{"0", "1", "2"}, {"circle", "square"}]
    assert fig.axes[2].get_title() == "scenes · info_nce\nNMI 0.52 · ARI 0.31"
    words = all_text(fig)
    assert "t-SNE" in fig._suptitle.get_text()
    assert "normalised mutual information" in words and "adjusted Rand index" in words


def test_metric_bars_label_in_words():
    scores = pd.DataFrame([{"model": m, "metric": k, "value": v} for m in ("a", "b")
                           for k, v in (("nmi", 0.5), ("ari", 0.4), ("purity", 0.7))])
    ax = plotting.plot_metric_bars(scores, x="metric", y="value", hue="model").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["NMI", "ARI", "purity"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("", "score")
    tasks = pd.DataFrame({"meta_task": ["vqa", "retrieval"], "level": ["hard", "random"],
                          "p@1": [0.5, 0.6]})
    ax = plotting.plot_metric_bars(tasks, hue="level", ylabel="P@1 on the eval lists").axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("meta-task", "P@1 on the eval lists")
    assert ax.get_legend().get_title().get_text() == "candidate list"


def test_failure_cases_wrap_captions_mark_differences_and_never_overlap(tmp_path):
    image = np.zeros((84, 84, 3), np.uint8)
    chosen = "a small green cross in the top left and a large yellow cross in the top middle"
    positive = "a small blue cross in the top left and a large yellow cross in the top middle"
    failures = [{"query_text": "<|image_1|> find a caption describing the given image",
                 "query_image": image, "chosen_text": chosen + " and" * i, "chosen_image": None,
                 "positive_text": positive + " and" * i, "positive_image": None,
                 "margin": 0.05 - i / 100} for i in range(3)]
    fig = plotting.plot_failure_cases(failures, title="hardest failures on ret_i2t")
    assert isinstance(fig, plotting.KitFigure) and len(fig.axes) == 3  # one image per query
    boxes = drawn_boxes(fig)
    assert overlapping(boxes + [("image", ax.get_window_extent()) for ax in fig.axes]) == []
    assert not any("<|image_1|>" in text for text, _ in boxes)
    texts = [t for t in fig.findobj(Text) if t.get_text().strip()]
    for role, word in (("hard", "green"), ("positive", "blue")):
        marked = {t.get_text() for t in texts if same_color(t.get_color(), plotting.ROLE_COLORS[role])}
        assert marked == {word}
        assert all(t.get_fontweight() == "bold" for t in texts if t.get_text() == word)
    panels = [patch.get_window_extent() for patch in fig.findobj(FancyBboxPatch)]
    assert len(panels) == 6  # text-only candidates sit in their own panels, text inside
    for panel in panels:
        inside = [box for _, box in boxes if panel.x0 <= box.x0 and box.x1 <= panel.x1
                  and panel.y0 <= box.y0 and box.y1 <= panel.y1]
        assert len(inside) >= 16
    png, _ = plotting.save_figure(fig, tmp_path / "failures")
    assert png.stat().st_size > 5000
