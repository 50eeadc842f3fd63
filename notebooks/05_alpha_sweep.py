# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # α sweep, the ablation ladder, and a temperature-matched control
#
# 1. **α sweep.** Fine-tune the shared starting checkpoint with hardness weighting at several α, over
#    seeds; P@1 on hard lists and the positive-hard gap against α, with error bars over seeds.
# 2. **Temperature-matched control.** For negatives, `s/τ + α s = s (1/τ + α)`: part of the gain may
#    be "sharper negatives". Beside each α, InfoNCE at `1/τ' = 1/τ + α` is trained: what weighting adds
#    beyond it is the effect of keeping the positive at scale `1/τ` and of the stop-gradient.
# 3. **Ablation ladder** (the paper's Table 5 order): InfoNCE → + cross-device gather (simulated here
#    by a `pool_factor` times larger batch, which the gather makes exactly equivalent; like a run on
#    `pool_factor` devices, it also sees `pool_factor` times more pairs in the same steps) → + focal
#    InfoNCE → + hardness weighting.

# %% tags=["parameters"]
base_checkpoint = "runs/pretrain/final"
data = "scenes"
data_dir = "runs/data/scenes"
n_train = 500
n_eval = 200
alphas = [0.0, 1.0, 3.0, 9.0, 27.0]
seeds = [0, 1]
temperature = 0.05
temperature_matched = True
ladder = True
ladder_batch_size = 16  # rung 1's batch; rungs 2-4 use pool_factor times as many
pool_factor = 4
ladder_alpha = 9.0
steps = 100
batch_size = 32
lr = 5e-4
level = "hard"
device = "cpu"
output_dir = "runs/alpha_sweep"
figures_dir = "figures/alpha_sweep"

# %%
from IPython.display import display

from llave_kit.pipeline import record_metrics
from llave_kit.plotting import plot_alpha_sweep, plot_metric_bars, save_figure
from llave_kit.studies import (
    ablation_ladder_variants, alpha_sweep_variants, load_data, run_variants,
)

# %%
generator = {"n_train": n_train, "n_eval": n_eval} if data == "scenes" else {}
dataset = load_data(data, data_dir, **generator)
common = dict(max_steps=steps, batch_size=batch_size, lr=lr, level=level, device=device)
sweep = run_variants(alpha_sweep_variants(alphas, temperature, temperature_matched),
                     base_checkpoint, dataset, f"{output_dir}/sweep", seeds=seeds, **common)
sweep.groupby(["group", "alpha_value"])[["p@1", "gap", "auroc"]].agg(["mean", "std"]).round(3)

# %%
figure = plot_alpha_sweep(sweep, metrics=("p@1", "gap", "auroc"), x="alpha_value", hue="group")
save_figure(figure, f"{figures_dir}/alpha_sweep")
figure

# %%
if ladder:
    ladder_common = {k: v for k, v in common.items() if k != "batch_size"}  # rungs set their own
    rungs = run_variants(ablation_ladder_variants(ladder_batch_size, pool_factor, ladder_alpha, temperature),
                         base_checkpoint, dataset, f"{output_dir}/ladder", seeds=seeds,
                         temperature=temperature, **ladder_common)
    figure = plot_metric_bars(rungs, x="label", y="p@1", hue=None)
    save_figure(figure, f"{figures_dir}/ablation_ladder")
    display(figure)
    display(rungs.groupby("label")[["p@1", "gap", "auroc"]].mean().round(3))

# %%
means = sweep.groupby(["group", "alpha_value"])[["p@1", "gap"]].mean()
metrics = {f"{group}/alpha={alpha:g}": {k: float(v) for k, v in row.items()} for (group, alpha), row in means.iterrows()}
if ladder:
    metrics["ladder"] = rungs.groupby("label")["p@1"].mean().to_dict()
record_metrics(metrics)
