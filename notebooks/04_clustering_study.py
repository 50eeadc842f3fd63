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
# k-means on image embeddings (as many clusters as labels), scored against the true labels, with
# 2-D projections. Two image sets: scikit-learn's **digits** (real handwritten digits; the shared
# starting checkpoint is fine-tuned on digit-caption pairs with InfoNCE and with hardness
# weighting) and the **scenes** data's single-object images (labelled by shape), embedded by one
# training seed's fine-tune of each arm (the runs the overlap study trains, loaded from
# `train_dir`, not retrained).
#
# - **NMI** (normalised mutual information): how much knowing the cluster tells about the label,
#   0 (nothing) to 1 (clusters are the labels);
# - **ARI** (adjusted Rand index): agreement of cluster and label on every pair of images,
#   corrected for chance — 0 is chance level, 1 perfect;
# - **purity**: the share of images that carry their cluster's most common label.
#
# One training seed, so these are single numbers without intervals: read them as a picture of
# the embeddings, not as a comparison.

# %% tags=["parameters"]
base_checkpoint = "checkpoints/tiny-dual-scenes"
arms = {"info_nce": {"loss": "info_nce"}, "weighted": {"loss": "hardness_weighted", "alpha": 9.0}}
finetune = {"max_steps": 300, "lr": 1e-3, "temperature": 0.02, "batch_size": 64, "device": "cpu"}
training_seed = 0  # which seed's fine-tunes to cluster with
data_dir = "runs/cpu_demo/data/scenes"  # paths are relative to the repository root
n_train = 6000
n_eval = 200
train_dir = "runs/cpu_demo/finetunes"  # the overlap study's fine-tunes, by recipe
digits_dir = "runs/cpu_demo/data/digits"
digits_steps = 150
seed = 0  # k-means and projection seed
projection = "tsne"  # "tsne", "pca" or "umap" (needs umap-learn)
output_dir = "runs/cpu_demo/clustering"  # the digits fine-tunes, by recipe
figures_dir = "figures/notebooks/clustering"

# %%
import pandas as pd

from llave_kit.evaluation import cluster_embeddings, project_2d
from llave_kit.notebook import start
from llave_kit.pipeline import record_metrics
from llave_kit.plotting import plot_metric_bars, plot_projection, save_figure
from llave_kit.studies import embed_images, labelled_images, load_data, load_model, train_arms

start(checkpoints=[base_checkpoint])

# %% [markdown]
# ## Digits: fine-tune on digit captions, then cluster the held-out digit images

# %%
digits = load_data("digits", digits_dir)
digit_images, digit_labels = labelled_images(digits, "digit", split="eval")
digits_models = train_arms(arms, base_checkpoint, digits, f"{output_dir}/digits", seeds=[training_seed],
                           **{**finetune, "max_steps": digits_steps})
device = finetune.get("device")
embeddings = {}
for name, (path,) in digits_models.items():
    model = load_model(str(path), digits, device=device)
    embeddings[f"digits · {name}"] = (embed_images(model, digit_images), digit_labels)

# %% [markdown]
# ## Scenes: single-object images, labelled by shape

# %%
scenes = load_data("scenes", data_dir, n_train=n_train, n_eval=n_eval)
scene_images, scene_labels = labelled_images(scenes, "shape", split="eval", task="cls_object", role="query")
scenes_models = train_arms(arms, base_checkpoint, scenes, train_dir, seeds=[training_seed], **finetune)
for name, (path,) in scenes_models.items():
    model = load_model(str(path), scenes, device=device)
    embeddings[f"scenes · {name}"] = (embed_images(model, scene_images), scene_labels)

# %%
scores = {title: cluster_embeddings(emb, labels, seed=seed).as_dict() for title, (emb, labels) in embeddings.items()}
projections = {title: (project_2d(emb, method=projection, seed=seed), labels)
               for title, (emb, labels) in embeddings.items()}
figure = plot_projection(projections, scores={t: {k: s[k] for k in ("nmi", "ari")} for t, s in scores.items()},
                         ncols=2, method=projection)
save_figure(figure, f"{figures_dir}/projections")
figure

# %% [markdown]
# **What to look for:** tight, separate islands of one colour mean the embedding groups images by
# their label; the projection only draws neighbourhoods, so distances between islands mean little.

# %%
long = pd.DataFrame([{"model": title, "metric": metric, "value": value}
                     for title, s in scores.items() for metric, value in s.items()
                     if metric in ("nmi", "ari", "purity")])
figure = plot_metric_bars(long, x="metric", y="value", hue="model")
save_figure(figure, f"{figures_dir}/clustering_scores")
figure

# %% [markdown]
# **What to look for:** the same label set (digits or scenes) compared across arms; the two data
# sets differ in difficulty, so compare within one, not across.

# %%
record_metrics({title: {k: float(s[k]) for k in ("nmi", "ari", "purity")} for title, s in scores.items()})
