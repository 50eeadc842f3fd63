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
# # α sweep, a temperature-matched control, and the ablation ladder
#
# 1. **α sweep.** Fine-tune the shared starting checkpoint with hardness weighting at several α, once
#    per training seed; P@1 on hard lists, the positive-hard gap and AUROC against α.
# 2. **Temperature-matched control.** For negatives, `s/τ + α s = s (1/τ + α)`: part of the gain may
#    be "sharper negatives". Beside each α of `matched_alphas`, InfoNCE at `1/τ' = 1/τ + α` is
#    trained (drawn at the same α). What weighting adds beyond it is the effect of keeping the
#    positive at scale `1/τ` and of the stop-gradient: the control's differences answer that,
#    whichever way they go.
# 3. **Ablation ladder** (the paper's Table 5 order): InfoNCE → + cross-device gather (simulated here
#    by a `pool_factor` times larger batch, which the gather makes exactly equivalent; like a run on
#    `pool_factor` devices, it also sees `pool_factor` times more pairs in the same steps) → + focal
#    InfoNCE → + hardness weighting.
#
# Metrics on hard candidate lists (8 candidates, every wrong one a single attribute off): **P@1**,
# the share of queries whose most similar candidate is the positive (chance 0.125); **gap**, mean
# positive similarity minus the mean of the 5 most similar wrong candidates; **AUROC**, the
# probability that a positive scores above one of its hard negatives (0.5 none, 1 perfect).
#
# All intervals are 95 % bootstrap CIs over training seeds and queries, paired where runs share them;
# a difference whose interval contains 0 is inconclusive. Fine-tunes with the same recipe as
# another study's (α = 0 and α = 9 are the overlap study's arms) are loaded from `train_dir`, not
# trained again: after `make reproduce` this notebook runs in seconds.

# %% tags=["parameters"]
base_checkpoint = "checkpoints/tiny-dual-scenes"
finetune = {"max_steps": 300, "lr": 1e-3, "temperature": 0.02, "batch_size": 64, "device": "cpu"}
seeds = [0, 1, 2]
data = "scenes"
data_dir = "runs/cpu_demo/data/scenes"  # paths are relative to the repository root
n_train = 6000
n_eval = 200
on_error = "raise"  # bad records in an MMEB folder: "raise" (naming file and line) or "skip" them
alphas = [0.0, 3.0, 9.0]
matched_alphas = [9.0]  # alphas that get a temperature-matched InfoNCE control
ladder = True
ladder_batch_size = 16  # rung 1's batch; rungs 2-4 use pool_factor times as many
pool_factor = 4
ladder_alpha = 9.0
level = "hard"
n_resamples = 2000
train_dir = "runs/cpu_demo/finetunes"  # fine-tunes by recipe, shared with the other studies
cache_dir = "runs/cpu_demo/embedding_cache"
figures_dir = "figures/notebooks/alpha_sweep"

# %%
import pandas as pd
from IPython.display import display

from llave_kit.notebook import start
from llave_kit.pipeline import record_metrics
from llave_kit.plotting import metric_titles, plot_effects, plot_intervals, save_figure
from llave_kit.studies import (
    ablation_ladder_variants,
    alpha_sweep_variants,
    arm_difference,
    intervals_record,
    load_data,
    run_variants,
    stack_scores,
    variant_intervals,
)

start(checkpoints=[base_checkpoint], data=data)

# %%
dataset = load_data(data, data_dir, n_train=n_train, n_eval=n_eval, on_error=on_error)
temperature = finetune["temperature"]
variants = alpha_sweep_variants(alphas, temperature, matched_alphas)
samples = stack_scores(run_variants(variants, base_checkpoint, dataset, train_dir, seeds=seeds, level=level,
                                    cache_dir=cache_dir, **finetune))
sweep = variant_intervals(variants, samples, n_resamples=n_resamples)
sweep.pivot_table(index=["group", "alpha_value"], columns="metric", values="mean").round(3)

# %%
figure = plot_intervals(sweep, x="alpha_value", hue="group", connect=True, xlabel="α (hardness strength)",
                        legend_title="", title=f"Fine-tuning at τ = {temperature:g} against α",
                        panel_titles=metric_titles(level=level),
                        caption="The temperature-matched control is InfoNCE at τ' with 1/τ' = 1/τ + α, "
                                "drawn at the α it matches; α = 0 is plain InfoNCE at τ.")
save_figure(figure, f"{figures_dir}/alpha_sweep")
figure

# %% [markdown]
# **What to look for:** how the gap and P@1 move as α grows, and whether the control (InfoNCE at
# the matched temperature) lands where weighting does at the same α — if so, weighting acts as a
# sharper temperature there. Read each panel's y range: small ranges are stated on the panel.

# %% [markdown]
# ## What weighting adds: differences with 95 % CIs
# Against α = 0 (plain InfoNCE at τ), and against InfoNCE at the matched temperature (same α).

# %%
labels = {(v["group"], v["alpha_value"]): v["label"] for v in variants}
baseline = labels[("hardness weighting", 0.0)] if 0.0 in alphas else None
effects = []
for alpha in [a for a in alphas if a]:
    weighted = labels[("hardness weighting", alpha)]
    if baseline:
        effects.append(arm_difference(samples, weighted, baseline, "p@1",
                                      f"α = {alpha:g} vs α = 0: P@1 gain", +1, n_resamples))
    if ("temperature-matched InfoNCE", alpha) in labels:
        matched = labels[("temperature-matched InfoNCE", alpha)]
        for metric, name in (("p@1", "P@1"), ("gap", "gap")):
            effects.append(arm_difference(samples, weighted, matched, metric,
                                          f"α = {alpha:g} vs {matched}: {name} gain", +1, n_resamples))
effects = pd.DataFrame(effects)
figure = plot_effects(effects, title="Hardness weighting vs plain and temperature-matched InfoNCE")
save_figure(figure, f"{figures_dir}/effects")
display(figure)
effects.round(4)

# %% [markdown]
# **What to look for:** only differences whose interval stays on one side of 0 say anything.

# %%
if ladder:
    rungs = ablation_ladder_variants(ladder_batch_size, pool_factor, ladder_alpha, temperature)
    ladder_samples = stack_scores(run_variants(rungs, base_checkpoint, dataset, train_dir, seeds=seeds,
                                               level=level, cache_dir=cache_dir,
                                               **{k: v for k, v in finetune.items() if k != "batch_size"}))
    ladder_table = variant_intervals(rungs, ladder_samples, n_resamples=n_resamples)
    steps = [arm_difference(ladder_samples, upper["label"], lower["label"], "p@1",
                            f"{upper['label']} vs {lower['label'][2:]}: P@1 gain", +1, n_resamples)
             for lower, upper in zip(rungs, rungs[1:])]
    figure = plot_intervals(ladder_table, x="label", xlabel="rung (each adds one change to the one before)",
                            title="The ablation ladder (LLaVE's Table 5 order)",
                            panel_titles=metric_titles(level=level))
    save_figure(figure, f"{figures_dir}/ablation_ladder")
    display(figure)
    display(pd.DataFrame(steps).round(4))

# %% [markdown]
# **What to look for:** which step moves P@1 most. In the paper the cross-device negatives (rung 2)
# are the largest step.

# %%
metrics = {"sweep": intervals_record(sweep, key="label"), "effects": effects.to_dict("records"),
           "seeds": len(seeds)}
if ladder:
    metrics["ladder"] = intervals_record(ladder_table, key="label")
    metrics["ladder_steps"] = steps
record_metrics(metrics)
