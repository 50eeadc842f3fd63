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
# # Clustering: do the embeddings group images by what they show?
#
# k-means on image embeddings, scored by NMI, ARI and purity against the true labels, with 2-D
# projections. Two image sets: scikit-learn's **digits** (real handwritten digits; the shared starting
# checkpoint is fine-tuned on digit-caption pairs with InfoNCE and with hardness weighting) and the
# **scenes** data's single-object images (labelled by shape), embedded by the scenes models.

# %% tags=["parameters"]
base_checkpoint = "runs/pretrain/final"
scenes_models = {"after InfoNCE": "runs/finetune_info_nce/final",
                 "after weighting": "runs/finetune_weighted/final"}
data_dir = "runs/data/scenes"
n_train = 500
n_eval = 200
digits_dir = "runs/data/digits"
digits_steps = 60
alpha = 9.0
temperature = 0.05
lr = 5e-4
batch_size = 64
seed = 0
device = "cpu"
projection = "tsne"  # "tsne", "pca" or "umap" (needs umap-learn)
output_dir = "runs/clustering"
figures_dir = "figures/clustering"

# %%
import pandas as pd

from llave_kit.evaluation import cluster_embeddings, project_2d
from llave_kit.pipeline import record_metrics
from llave_kit.plotting import plot_metric_bars, plot_projection, save_figure
from llave_kit.studies import embed_images, labelled_images, load_data, load_model, train_embedder

# %% [markdown]
# ## Digits: fine-tune on digit captions, then cluster the held-out digit images

# %%
digits = load_data("digits", digits_dir)
digit_images, digit_labels = labelled_images(digits, "digit", split="eval")
recipes = {"InfoNCE": {"loss": "info_nce"}, "weighted": {"loss": "hardness_weighted", "alpha": alpha}}
embeddings = {}
for name, recipe in recipes.items():
    embedder, _ = train_embedder(base_checkpoint, digits, f"{output_dir}/digits_{name}",
                                 max_steps=digits_steps, temperature=temperature, lr=lr,
                                 batch_size=batch_size, seed=seed, device=device, **recipe)
    embeddings[f"digits · {name}"] = (embed_images(embedder, digit_images), digit_labels)

# %% [markdown]
# ## Scenes: single-object images, labelled by shape

# %%
scenes = load_data("scenes", data_dir, n_train=n_train, n_eval=n_eval)
scene_images, scene_labels = labelled_images(scenes, "shape", split="eval", task="cls_object", role="query")
for name, path in scenes_models.items():
    embeddings[f"scenes · {name}"] = (embed_images(load_model(path, scenes, device=device), scene_images), scene_labels)

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
