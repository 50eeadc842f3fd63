# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Do positives and hard negatives overlap less after hardness weighting?
#
# LLaVE's Table 1: after training with hardness weighting, the mean similarity of the top-5 hard
# negatives falls far more than that of the positive, so the two distributions overlap less. As in
# the paper, one shared starting checkpoint ("before") is fine-tuned at equal budget with InfoNCE
# and with hardness weighting — here several times, once per training seed. Similarities are
# measured on hard candidate lists (every wrong candidate differs from the truth in one attribute).
#
# What is measured, per query, then averaged:
# - **P@1**: 1 if the positive is the most similar of the query's 8 candidates, else 0 (chance
#   0.125);
# - **positive / hard / easy**: cosine similarity to the positive, mean similarity to the 5 most
#   similar wrong candidates (hard negatives) and to the 5 least similar (easy negatives);
# - **gap**: positive − hard, the margin LLaVE widens;
# - **AUROC** (positive vs hard): the probability that a query's positive scores above one of its
#   hard negatives — 1 is perfect separation, 0.5 none;
# - **overlap** (in the figure): the area shared by the positive and hard-negative similarity
#   densities — 0 is no overlap, 1 identical distributions.
#
# Every number comes with a 95 % confidence interval from a bootstrap over training seeds and eval
# queries, paired between arms (they share queries and seeds). A reading of the paper counts as
# **reproduced** only when the interval of its difference excludes 0 in the paper's direction,
# **contradicted** when it excludes 0 the other way, and **inconclusive** otherwise.
#
# After `make reproduce` the fine-tunes are found in `train_dir` and the notebook runs in seconds;
# without it, it trains them (a few minutes on a CPU).

# %% tags=["parameters"]
base_checkpoint = "checkpoints/tiny-dual-scenes"  # the shared "before": a folder or a hub id
arms = {"info_nce": {"loss": "info_nce"}, "weighted": {"loss": "hardness_weighted", "alpha": 9.0}}
finetune = {"max_steps": 300, "lr": 1e-3, "temperature": 0.02, "batch_size": 64, "device": "cpu"}
seeds = [0, 1, 2]
data = "scenes"
data_dir = "runs/cpu_demo/data/scenes"  # paths are relative to the repository root
n_train = 6000
n_eval = 200
on_error = "raise"  # bad records in an MMEB folder: "raise" (naming file and line) or "skip" them
level = "hard"
k = 5  # hard: the top-k most similar wrong candidates; easy: the bottom-k (the paper uses 5)
n_resamples = 2000  # bootstrap resamples per interval
train_dir = "runs/cpu_demo/finetunes"  # fine-tunes, stored by recipe and shared with other studies
cache_dir = "runs/cpu_demo/embedding_cache"  # embedding cache shared with other studies
figures_dir = "figures/notebooks/overlap"

# %%
from IPython.display import display

from llave_kit.notebook import start
from llave_kit.pipeline import record_metrics
from llave_kit.plotting import (
    metric_titles,
    plot_effects,
    plot_intervals,
    plot_similarity_distributions,
    save_figure,
)
from llave_kit.studies import (
    arm_intervals,
    intervals_record,
    load_data,
    paper_readings,
    pooled_distributions,
    score_arms,
    stack_scores,
    train_arms,
)

start(checkpoints=[base_checkpoint], data=data)

# %%
dataset = load_data(data, data_dir, n_train=n_train, n_eval=n_eval, on_error=on_error)
checkpoints = train_arms(arms, base_checkpoint, dataset, train_dir, seeds=seeds, **finetune)
scores = score_arms({"before": [base_checkpoint], **checkpoints}, dataset, level=level, k=k,
                    cache_dir=cache_dir, device=finetune.get("device"))
samples = stack_scores(scores)
intervals = arm_intervals(samples, n_resamples=n_resamples)
intervals.pivot(index="arm", columns="metric", values=["mean", "ci_low", "ci_high"]).round(3)

# %% [markdown]
# ## Distributions: positives vs hard and easy negatives (every seed's queries pooled)

# %%
figure = plot_similarity_distributions({arm: pooled_distributions(runs) for arm, runs in scores.items()}, k=k)
save_figure(figure, f"{figures_dir}/similarity_overlap")
figure

# %% [markdown]
# **What to look for:** after weighting, the hard negatives' distribution moves left, away from
# the positives', and the gap grows; compare the overlap, AUROC and gap written in each panel.

# %% [markdown]
# ## Table 1 with intervals: P@1, mean positive / top-5 hard / bottom-5 easy similarity, gap, AUROC

# %%
figure = plot_intervals(intervals, x="arm", title=f"{level} candidate lists, {len(seeds)} seeds per arm",
                        panel_titles=metric_titles(k, level))
save_figure(figure, f"{figures_dir}/table1_intervals")
figure

# %% [markdown]
# **What to look for:** the paper's pattern is hard similarity falling much more than positive
# similarity from InfoNCE to weighting; intervals that overlap between arms mean the difference
# needs the paired test below, not the eye.

# %% [markdown]
# ## Which of the paper's readings reproduce here?
# Each reading is a paired difference with its 95 % CI; the verdict follows from the interval alone.

# %%
readings = paper_readings(samples, "before", "info_nce", "weighted", n_resamples=n_resamples)
figure = plot_effects(readings, title="LLaVE's readings: weighted vs InfoNCE (and vs before)")
save_figure(figure, f"{figures_dir}/readings")
display(figure)
readings.round(4)

# %% [markdown]
# **What to look for:** a reading is settled only when its bar stays on one side of 0; the colour
# and the word on the right give its verdict.

# %%
table = intervals_record(intervals)
record_metrics({
    f"p_at_1_{level}": table["p@1"],
    "table1": {metric: values for metric, values in table.items() if metric != "p@1"},
    "effects": readings.to_dict("records"),
    "seeds": len(seeds),
    "queries": int(samples["before|hit"].shape[1]),
})
