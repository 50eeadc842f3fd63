"""Every figure function draws the expected panels and saves non-empty PNG and SVG files."""
import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from llave_kit import plotting
from llave_kit.analysis import gradient_share, similarity_stats


def assert_saved(fig, tmp_path, name, n_axes):
    assert isinstance(fig, Figure) and len(fig.axes) == n_axes
    png, svg = plotting.save_figure(fig, tmp_path / "figures" / name)
    assert (png.name, svg.name) == (f"{name}.png", f"{name}.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
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
    assert "nmi 0.91" in fig.axes[0].get_title()


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
