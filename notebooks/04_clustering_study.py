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
# # Clustering: do the embeddings group images by what they show?
#
# k-means on image embeddings, scored by NMI, ARI and purity against the true labels, with 2-D
# projections. Two image sets: scikit-learn's **digits** (real handwritten digits; the shared starting
# checkpoint is fine-tuned on digit-caption pairs with InfoNCE and with hardness weighting) and the
# **scenes** data's single-object images (labelled by shape), embedded by one training seed's
# fine-tune of each arm (the runs the overlap study trains, loaded from `train_dir`, not retrained).

# %% tags=["parameters"]
base_checkpoint = "../checkpoints/tiny-dual-scenes"
arms = {"info_nce": {"loss": "info_nce"}, "weighted": {"loss": "hardness_weighted", "alpha": 9.0}}
finetune = {"max_steps": 300, "lr": 1e-3, "temperature": 0.02, "batch_size": 64, "device": "cpu"}
training_seed = 0  # which seed's fine-tunes to cluster with
data_dir = "../runs/notebooks/data/scenes"
n_train = 6000
n_eval = 200
train_dir = "../runs/notebooks/finetunes"
digits_dir = "../runs/notebooks/data/digits"
digits_steps = 60
seed = 0  # k-means and projection seed
projection = "tsne"  # "tsne", "pca" or "umap" (needs umap-learn)
output_dir = "../runs/notebooks/clustering"
figures_dir = "../runs/notebooks/figures/clustering"

# %%
import pandas as pd

from llave_kit.evaluation import cluster_embeddings, project_2d
from llave_kit.pipeline import record_metrics
from llave_kit.plotting import plot_metric_bars, plot_projection, save_figure
from llave_kit.studies import (
    embed_images, labelled_images, load_data, load_model, train_arms,
)

# %% [markdown]
# ## Digits: fine-tune on digit captions, then cluster the held-out digit images

# %%
digits = load_data("digits", digits_dir)
digit_images, digit_labels = labelled_images(digits, "digit", split="eval")
digits_models = train_arms(arms, base_checkpoint, digits, f"{output_dir}/digits", seeds=[training_seed],
                           **{**finetune, "max_steps": digits_steps})
device = finetune.get("device")
embeddings = {f"digits · {name}": (embed_images(load_model(str(path), digits, device=device), digit_images), digit_labels)
              for name, (path,) in digits_models.items()}

# %% [markdown]
# ## Scenes: single-object images, labelled by shape

# %%
scenes = load_data("scenes", data_dir, n_train=n_train, n_eval=n_eval)
scene_images, scene_labels = labelled_images(scenes, "shape", split="eval", task="cls_object", role="query")
scenes_models = train_arms(arms, base_checkpoint, scenes, train_dir, seeds=[training_seed], **finetune)
for name, (path,) in scenes_models.items():
    embeddings[f"scenes · {name}"] = (embed_images(load_model(str(path), scenes, device=device), scene_images), scene_labels)

# %%
scores = {title: cluster_embeddings(emb, labels, seed=seed).as_dict() for title, (emb, labels) in embeddings.items()}
projections = {title: (project_2d(emb, method=projection, seed=seed), labels)
               for title, (emb, labels) in embeddings.items()}
figure = plot_projection(projections, scores={t: {k: s[k] for k in ("nmi", "ari")} for t, s in scores.items()}, ncols=2)
save_figure(figure, f"{figures_dir}/projections")
figure

# %%
long = pd.DataFrame([{"model": title, "metric": metric, "value": value}
                     for title, s in scores.items() for metric, value in s.items()
                     if metric in ("nmi", "ari", "purity")])
figure = plot_metric_bars(long, x="metric", y="value", hue="model")
save_figure(figure, f"{figures_dir}/clustering_scores")
figure

# %%
record_metrics({title: {k: float(s[k]) for k in ("nmi", "ari", "purity")} for title, s in scores.items()})
