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
# # Contrastive basics: InfoNCE, temperature and hardness weighting
#
# InfoNCE scores each query against its positive and the batch's negatives. LLaVE adds a detached
# `α · s_ij` to every negative logit, so a negative's gradient is multiplied by `w_ij = exp(α s_ij)`.
# This notebook shows, on a toy batch, how that moves the push on negatives towards the hardest ones,
# and how it differs from simply lowering the temperature.

# %% tags=["parameters"]
temperature = 0.02
alpha_values = [0.0, 1.0, 3.0, 9.0, 27.0]
batch_size = 64
dim = 32
seed = 0
interactive = True  # sliders in JupyterLab; the pipeline passes False for static figures
figures_dir = "figures/basics"

# %%
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from llave_kit.analysis import gradient_share
from llave_kit.losses import hardness_weighted_info_nce, info_nce
from llave_kit.pipeline import record_metrics
from llave_kit.plotting import plot_gradient_share, save_figure
from llave_kit.studies import matched_temperature

# %% [markdown]
# ## A toy batch: loss values
# Queries, positives close to them, and random vectors as in-batch negatives.

# %%
generator = torch.Generator().manual_seed(seed)
query = F.normalize(torch.randn(batch_size, dim, generator=generator), dim=-1)
target = F.normalize(query + 0.6 * torch.randn(batch_size, dim, generator=generator), dim=-1)
losses = pd.DataFrame(
    [{"alpha": a, "InfoNCE (tau)": info_nce(query, target, temperature).item(),
      "weighted": hardness_weighted_info_nce(query, target, a, temperature).item()}
     for a in alpha_values]
)
losses

# %% [markdown]
# ## Where does the gradient on negatives go?
# One query's negatives spread over similarities from -0.3 to 0.8. Each curve is every negative's
# share of the total push on negatives. InfoNCE already favours hard negatives (share ∝ e^{s/τ});
# weighting sharpens this to ∝ e^{(1/τ + α)s}.

# %%
similarities = np.concatenate([[0.9], np.linspace(-0.3, 0.8, 40)])  # positive first
negatives = similarities[1:]
curves = {f"α = {a:g}": (negatives, gradient_share(similarities, 0, a, temperature)[1:])
          for a in alpha_values}
figure = plot_gradient_share(curves)
save_figure(figure, f"{figures_dir}/gradient_share")
figure

# %% [markdown]
# ## Weighting versus a lower temperature
# For negatives, `s/τ + α s = s (1/τ + α)`: InfoNCE at `1/τ' = 1/τ + α` spreads the push over
# negatives identically. What differs is the positive, whose logit keeps the scale `1/τ` under
# weighting, and the total gradient size. Study 05 measures whether training can tell them apart.

# %%
alpha = 9.0
tau_matched = matched_temperature(temperature, alpha)
weighted_share = gradient_share(similarities, 0, alpha, temperature)[1:]
matched_share = gradient_share(similarities, 0, 0.0, tau_matched)[1:]
figure = plot_gradient_share({f"weighted α={alpha:g}, τ={temperature}": (negatives, weighted_share),
                              f"InfoNCE τ'={tau_matched:.4f}": (negatives, matched_share),
                              f"InfoNCE τ={temperature}": (negatives, gradient_share(similarities, 0, 0.0, temperature)[1:])})
save_figure(figure, f"{figures_dir}/weighting_vs_temperature")
figure

# %%
if interactive:
    from ipywidgets import FloatLogSlider, FloatSlider, interact

    @interact(alpha=FloatSlider(value=9.0, min=0.0, max=30.0, step=0.5),
              tau=FloatLogSlider(value=temperature, base=10, min=-2.5, max=0))
    def explore(alpha, tau):
        return plot_gradient_share({
            "InfoNCE": (negatives, gradient_share(similarities, 0, 0.0, tau)[1:]),
            f"weighted α={alpha:g}": (negatives, gradient_share(similarities, 0, alpha, tau)[1:]),
        })

# %%
hardest = {f"alpha={a:g}": float(curves[f"α = {a:g}"][1][-1]) for a in alpha_values}
record_metrics({"hardest_negative_share": hardest,
                "max_share_difference_weighted_vs_matched": float(np.abs(weighted_share - matched_share).max()),
                "weighted_loss": {f"alpha={a:g}": v for a, v in zip(losses.alpha, losses.weighted)}})
