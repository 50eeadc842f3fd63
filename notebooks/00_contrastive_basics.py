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
# # Contrastive basics: InfoNCE, temperature and hardness weighting
#
# An embedder maps each query and each candidate to a unit vector; `s_ij` is the cosine
# similarity of query `i` and candidate `j`, and candidate `i` is query `i`'s positive. InfoNCE
# asks each query to pick its positive out of the batch:
#
# $$\mathcal{L}_i = -\log \frac{e^{s_{ii}/\tau}}
#   {e^{s_{ii}/\tau} + \sum_{j \ne i} e^{s_{ij}/\tau + \alpha\,\mathrm{sg}(s_{ij})}}$$
#
# with temperature `τ` (LLaVE: 0.02). Plain InfoNCE has `α = 0`. LLaVE's hardness weighting adds
# a detached (`sg`, stop-gradient) `α · s_ij` to every negative's logit, so each negative's
# gradient is multiplied by `w_ij = exp(α s_ij)`: negatives that already look like the positive
# (hard negatives) are pushed hardest (LLaVE: α = 9). The loss is averaged over both directions,
# query → target and target → query.
#
# This notebook shows, on a toy batch, where the push on negatives goes as α grows, and how that
# differs from simply lowering the temperature. It needs no data and runs in seconds.

# %% tags=["parameters"]
temperature = 0.02
alpha_values = [0.0, 1.0, 3.0, 9.0, 27.0]
batch_size = 64
dim = 32
seed = 0
interactive = True  # sliders in JupyterLab; the pipeline passes False for static figures
figures_dir = "figures/notebooks/basics"  # relative to the repository root

# %%
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from llave_kit.analysis import gradient_share
from llave_kit.losses import hardness_weighted_info_nce, info_nce
from llave_kit.notebook import start
from llave_kit.pipeline import record_metrics
from llave_kit.plotting import plot_gradient_share, save_figure
from llave_kit.studies import matched_temperature

start()  # paths below are relative to the repository root, wherever the kernel started

# %% [markdown]
# ## A toy batch: loss values
# Queries, positives close to them, and the other rows' positives as in-batch negatives.

# %%
generator = torch.Generator().manual_seed(seed)
query = F.normalize(torch.randn(batch_size, dim, generator=generator), dim=-1)
target = F.normalize(query + 0.6 * torch.randn(batch_size, dim, generator=generator), dim=-1)
losses = pd.DataFrame(
    [{"α": a, "InfoNCE at τ": info_nce(query, target, temperature).item(),
      "hardness-weighted": hardness_weighted_info_nce(query, target, a, temperature).item()}
     for a in alpha_values]
)
losses

# %% [markdown]
# At α = 0 both columns agree; a larger α raises every negative's logit, so the loss grows.
#
# ## Where does the gradient on negatives go?
# One query whose negatives spread over similarities from -0.3 to 0.8. Each curve is every
# negative's share of the total push on negatives. InfoNCE already favours hard negatives (share
# ∝ e^{s/τ}); weighting sharpens this to ∝ e^{(1/τ + α)s}.

# %%
similarities = np.concatenate([[0.9], np.linspace(-0.3, 0.8, 40)])  # positive first
negatives = similarities[1:]
curves = {f"α = {a:g}": (negatives, gradient_share(similarities, 0, a, temperature)[1:])
          for a in alpha_values}
figure = plot_gradient_share(curves, temperature=temperature)
save_figure(figure, f"{figures_dir}/gradient_share")
figure

# %% [markdown]
# **What to look for:** the larger α, the steeper the curve: almost all of the push lands on the
# few negatives with the highest similarity, and easy negatives (left) get next to nothing.
#
# ## Weighting versus a lower temperature
# For negatives, `s/τ + α s = s (1/τ + α)`: InfoNCE at `1/τ' = 1/τ + α` spreads the push over
# negatives identically. What differs is the positive, whose logit keeps the scale `1/τ` under
# weighting, and the total gradient size. Study 05 measures whether training can tell them apart.

# %%
alpha = 9.0
tau_matched = matched_temperature(temperature, alpha)
weighted_share = gradient_share(similarities, 0, alpha, temperature)[1:]
matched_share = gradient_share(similarities, 0, 0.0, tau_matched)[1:]
figure = plot_gradient_share({
    f"InfoNCE, τ = {temperature:g}": (negatives, gradient_share(similarities, 0, 0.0, temperature)[1:]),
    f"weighted, α = {alpha:g}, τ = {temperature:g}": (negatives, weighted_share),
    f"InfoNCE, τ' = {tau_matched:.4f} (1/τ' = 1/τ + α)": (negatives, matched_share),
})
save_figure(figure, f"{figures_dir}/weighting_vs_temperature")
figure

# %% [markdown]
# **What to look for:** the weighted curve and InfoNCE at the matched temperature τ' coincide
# (the legend says so): among negatives, weighting is a sharper temperature. Both are steeper than
# InfoNCE at τ.
#
# ## Explore (JupyterLab)
# Move α and τ; the legend gives both. Untick "log scale" to see the shares on a linear axis.

# %%
if interactive:
    from ipywidgets import Checkbox, FloatLogSlider, FloatSlider, interact

    @interact(alpha=FloatSlider(value=9.0, min=0.0, max=30.0, step=0.5, description="α"),
              tau=FloatLogSlider(value=temperature, base=10, min=-2.5, max=0, description="τ"),
              log_scale=Checkbox(value=True, description="log scale"))
    def explore(alpha, tau, log_scale):
        return plot_gradient_share({
            f"InfoNCE, τ = {tau:.3g}": (negatives, gradient_share(similarities, 0, 0.0, tau)[1:]),
            f"weighted, α = {alpha:g}, τ = {tau:.3g}": (negatives, gradient_share(similarities, 0, alpha, tau)[1:]),
        }, log_scale=log_scale, temperature=tau)

# %%
hardest = {f"alpha={a:g}": float(curves[f"α = {a:g}"][1][-1]) for a in alpha_values}
record_metrics({"hardest_negative_share": hardest,
                "max_share_difference_weighted_vs_matched": float(np.abs(weighted_share - matched_share).max()),
                "weighted_loss": {f"alpha={a:g}": v for a, v in zip(losses["α"], losses["hardness-weighted"])}})
