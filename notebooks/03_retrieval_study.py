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
# # Retrieval: P@1 per meta-task, Recall@k and MRR
#
# Every model is scored on each task's candidate lists, at two hardness levels: **hard** lists (every
# wrong candidate differs from the truth in one attribute, the headline) and **random** lists (which
# saturate at this scale and are shown for contrast). MMEB's metric is P@1 with candidate 0 the
# positive; a tie counts against the positive.

# %% tags=["parameters"]
models = {"before": "runs/pretrain/final", "after InfoNCE": "runs/finetune_info_nce/final",
          "after weighting": "runs/finetune_weighted/final"}
data = "scenes"
data_dir = "runs/data/scenes"
n_train = 500
n_eval = 200
levels = ["hard", "random"]
failure_model = "after weighting"
failure_task = "ret_i2t"
failure_level = "hard"
failures_shown = 6
cache_dir = None
device = "cpu"
figures_dir = "figures/retrieval"

# %%
import pandas as pd
from IPython.display import display

from llave_kit.pipeline import record_metrics
from llave_kit.plotting import plot_failure_cases, plot_metric_bars, save_figure
from llave_kit.studies import evaluate_embedder, hardest_failures, load_data, load_model

# %%
generator = {"n_train": n_train, "n_eval": n_eval} if data == "scenes" else {}
dataset = load_data(data, data_dir, **generator)
embedders = {name: load_model(path, dataset, device=device) for name, path in models.items()}
table = pd.concat([evaluate_embedder(embedder, dataset, levels=levels, cache_dir=cache_dir).assign(model=name)
                   for name, embedder in embedders.items()], ignore_index=True)
table.pivot_table(index=["meta_task", "task"], columns=["level", "model"], values="p@1").round(3)

# %%
for level in levels:
    figure = plot_metric_bars(table[table.level == level], x="meta_task", y="p@1", hue="model")
    figure.suptitle(f"P@1 on {level} candidate lists")
    save_figure(figure, f"{figures_dir}/p_at_1_{level}")
    display(figure)

# %%
ranking = table.groupby(["level", "model"])[["p@1", "recall@5", "mrr", "ndcg@10"]].mean()
ranking.round(3)

# %% [markdown]
# ## The hardest failures
# Queries where the model's top candidate beats the positive by the widest margin.

# %%
failures = hardest_failures(embedders[failure_model], dataset, failure_task, failure_level, failures_shown,
                            cache_dir=cache_dir)
figure = plot_failure_cases(failures, title=f"{failure_model}: hardest failures on {failure_task}")
save_figure(figure, f"{figures_dir}/failures_{failure_task}")
figure

# %%
record_metrics({f"{level}/{model}": {metric: float(value) for metric, value in row.items()}
                for (level, model), row in ranking.iterrows()})
