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
# # Train an embedder
#
# Trains a multimodal embedder with a chosen contrastive loss, saves the checkpoint (`output_dir/final`)
# and per-step metrics, and evaluates P@1 on hard and random candidate lists. On the CPU default the
# model is a tiny Qwen2-VL built in code (or the kit's pre-trained one in `checkpoints/`); on a GPU,
# `model` is a checkpoint id or folder and `data` an MMEB folder.

# %% tags=["parameters"]
model = "tiny-qwen2-vl"  # a CPU default name, a saved checkpoint folder, or a hub id
data = "scenes"  # "scenes", "digits", or an MMEB data folder with a manifest.json
data_dir = "../runs/notebooks/data/scenes"  # where built-in data is generated
n_train = 6000  # built-in scenes: training pairs per task
n_eval = 200  # built-in scenes: eval queries per task
loss = "info_nce"
alpha = None  # hardness strength (only for the hardness_weighted loss)
temperature = 0.05
lr = 1e-3
warmup_ratio = 0.1
steps = 300
batch_size = 64
seed = 0
device = "cpu"
precision = "fp32"  # "bf16" on GPUs (LLaVE trains in bf16)
gradcache_chunk_size = None  # embed the batch in chunks of this size (GradCache), for big batches
eval_levels = ["hard", "random"]
record_p_at_1_as = "p_at_1"  # the key of {level: P@1} in the recorded metrics
output_dir = "../runs/notebooks/train"
figures_dir = "../runs/notebooks/figures/train"

# %%
from llave_kit.pipeline import record_metrics
from llave_kit.plotting import plot_metric_bars, plot_training_curves, save_figure
from llave_kit.studies import evaluate_embedder, load_data, train_embedder

# %%
dataset = load_data(data, data_dir, n_train=n_train, n_eval=n_eval)
embedder, result = train_embedder(
    model, dataset, output_dir, loss=loss, alpha=alpha, temperature=temperature, lr=lr,
    warmup_ratio=warmup_ratio, max_steps=steps, batch_size=batch_size, seed=seed, device=device,
    precision=precision, gradcache_chunk_size=gradcache_chunk_size,
)

# %%
figure = plot_training_curves(result.history)
save_figure(figure, f"{figures_dir}/training_curves")
figure

# %%
table = evaluate_embedder(embedder, dataset, levels=eval_levels)
figure = plot_metric_bars(table, x="meta_task", y="p@1", hue="level")
save_figure(figure, f"{figures_dir}/p_at_1")
table[["task", "level", "p@1", "mrr", "positive", "hard", "easy", "gap"]].round(3)

# %%
record_metrics({
    "final_loss": result.history[-1]["loss"],
    "steps": result.history[-1]["step"],
    "train_seconds": result.history[-1]["elapsed_s"],
    "checkpoint": str(result.final_model_path),
    record_p_at_1_as: table.groupby("level")["p@1"].mean().to_dict(),
    "gap": table.groupby("level")["gap"].mean().to_dict(),
})
