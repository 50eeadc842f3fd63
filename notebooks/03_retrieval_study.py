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
# # Retrieval: P@1 per meta-task on hard and random candidate lists
#
# The shared starting checkpoint and its fine-tunes (one per arm and training seed, the same runs
# as the overlap study) are scored on each task's candidate lists at two hardness levels: **hard**
# lists (every wrong candidate differs from the truth in one attribute, the headline) and
# **random** lists (which nearly saturate at this scale and are shown for contrast).
#
# **P@1** is MMEB's metric: the share of queries whose most similar candidate is the positive
# (candidate 0); a tie counts against the positive. With 8 candidates, chance is 0.125. The tasks
# are grouped by MMEB's meta-tasks: classification, VQA, retrieval and visual grounding. Intervals
# are 95 % bootstrap CIs over training seeds and queries; a gain whose interval contains 0 is
# inconclusive.
#
# After `make reproduce` the fine-tunes are found in `train_dir` and the notebook runs in seconds.

# %% tags=["parameters"]
base_checkpoint = "checkpoints/tiny-dual-scenes"
arms = {"info_nce": {"loss": "info_nce"}, "weighted": {"loss": "hardness_weighted", "alpha": 9.0}}
finetune = {"max_steps": 300, "lr": 1e-3, "temperature": 0.02, "batch_size": 64, "device": "cpu"}
seeds = [0, 1, 2]
data = "scenes"
data_dir = "runs/cpu_demo/data/scenes"  # paths are relative to the repository root
n_train = 6000
n_eval = 200
on_error = "raise"  # bad records in an MMEB folder: "raise" (naming file and line) or "skip" them
levels = ["hard", "random"]
failure_arm = "weighted"  # its first seed's model is searched for failures
failure_task = "ret_i2t"
failure_level = "hard"
failures_shown = 6
n_resamples = 2000
train_dir = "runs/cpu_demo/finetunes"  # fine-tunes by recipe, shared with the other studies
cache_dir = "runs/cpu_demo/embedding_cache"
figures_dir = "figures/notebooks/retrieval"

# %%
import pandas as pd
from IPython.display import display

from llave_kit.notebook import start
from llave_kit.pipeline import record_metrics
from llave_kit.plotting import plot_effects, plot_failure_cases, plot_intervals, save_figure
from llave_kit.studies import (
    arm_difference,
    arm_intervals,
    hardest_failures,
    intervals_record,
    load_data,
    load_model,
    meta_task_intervals,
    score_arms,
    stack_scores,
    train_arms,
)

start(checkpoints=[base_checkpoint], data=data)

# %%
dataset = load_data(data, data_dir, n_train=n_train, n_eval=n_eval, on_error=on_error)
checkpoints = {"before": [base_checkpoint],
               **train_arms(arms, base_checkpoint, dataset, train_dir, seeds=seeds, **finetune)}
overall, by_meta_task, effects = {}, [], []
for level in levels:
    scores = score_arms(checkpoints, dataset, level=level, cache_dir=cache_dir, device=finetune.get("device"))
    samples = stack_scores(scores)
    overall[level] = intervals_record(arm_intervals(samples, ("p@1",), n_resamples))["p@1"]
    by_meta_task.append(meta_task_intervals(scores, dataset, n_resamples=n_resamples).assign(level=level))
    effects.append(arm_difference(samples, "weighted", "info_nce", "p@1",
                                  f"weighting raises P@1 over InfoNCE on {level} lists", +1, n_resamples))
by_meta_task = pd.concat(by_meta_task, ignore_index=True)
by_meta_task.pivot_table(index=["level", "meta_task"], columns="arm", values="mean").round(3)

# %%
figure = plot_intervals(by_meta_task.assign(panel=by_meta_task.level + " lists: P@1"), x="meta_task",
                        hue="arm", panel="panel", title="P@1 per meta-task")
save_figure(figure, f"{figures_dir}/p_at_1")
figure

# %% [markdown]
# **What to look for:** how far each fine-tune rises above "before" on hard lists, per meta-task;
# random lists sit near 1 for every model. Where the arms' intervals overlap, the paired gain below
# decides.

# %%
effects = pd.DataFrame(effects)
figure = plot_effects(effects, title="P@1 gain of weighting over InfoNCE")
save_figure(figure, f"{figures_dir}/p_at_1_gain")
display(figure)
effects.round(4)

# %% [markdown]
# **What to look for:** whether each level's interval excludes 0 — only then does weighting beat
# InfoNCE on P@1 here.

# %% [markdown]
# ## The hardest failures
# Queries where the model's top candidate beats the positive by the widest margin.

# %%
model = load_model(str(checkpoints[failure_arm][0]), dataset, device=finetune.get("device"))
failures = hardest_failures(model, dataset, failure_task, failure_level, failures_shown, cache_dir=cache_dir)
figure = plot_failure_cases(failures, title=f"{failure_arm} (seed {seeds[0]}): hardest failures on {failure_task}")
save_figure(figure, f"{figures_dir}/failures_{failure_task}")
figure

# %% [markdown]
# **What to look for:** the highlighted words — the one attribute in which the model's choice
# differs from the positive; a margin near 0 is a near-tie, a large one a confident mistake.

# %%
record_metrics({
    "p_at_1": overall,
    "p_at_1_by_meta_task": {level: {meta: intervals_record(rows)["p@1"] for meta, rows in frame.groupby("meta_task")}
                            for level, frame in by_meta_task.groupby("level")},
    "effects": effects.to_dict("records"),
})
