"""LoRA on an `LmmEmbedder`'s language model, through peft: add, train, merge, save a plain model.

    spec = check_lora_spec({"r": 8, "target_modules": ["q_proj", "v_proj"]})   # defaults filled
    add_lora(embedder, spec)      # adapters on the language model; every other weight frozen
    ...train...                   # only the adapters' A and B matrices change
    merge_lora(embedder)          # W <- W + (alpha / r) * B @ A, peft's wrappers removed
    embedder.save_pretrained(folder)   # plain weights: LmmEmbedder.from_pretrained reads them

Each adapted linear map computes  y = W x + (alpha / r) * B (A dropout(x)),  A (r, d_in) random,
B (d_out, r) zero at the start, so the adapted model starts as the base model. The vision encoder,
projector, embeddings and norms stay frozen (LLaVE freezes the vision encoder; VLM2Vec's LoRA runs
train the adapters only). `TrainConfig.lora` holds a spec; `train()` adds the adapters before the
optimizer and DDP see the parameters, and merges them before writing `output_dir/final`.

Defaults: r 8, alpha 16, dropout 0.05 on all attention and MLP projections of the Qwen2 language
model (the usual peft recipe; VLM2Vec's own defaults are r 16, alpha 64, dropout 0.1 on the same
projections).

References: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; Jiang et al.
2024, "VLM2Vec".
"""
from __future__ import annotations

from numbers import Real

import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from llave_kit.encoders import LmmEmbedder

# The Qwen2 language model's attention and MLP projections (LLaVA-OneVision and Qwen2-VL alike).
QWEN2_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_LORA_SPEC = {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": QWEN2_PROJECTIONS}
ADAPTER_PREFIX = "lora_"  # peft's name prefix of adapter parameters (lora_A, lora_B)


def check_lora_spec(spec: dict) -> dict:
    """A LoRA spec with its defaults filled in; ValueError naming the first bad key.

    spec: a mapping with any of r (int >= 1), alpha (number > 0; the update is scaled by
    alpha / r), dropout (number in [0, 1), on the adapter's input), target_modules (a list of
    names of linear modules in the language model, e.g. ["q_proj", "v_proj"]).

    >>> check_lora_spec({"r": 4})["alpha"]
    16.0
    >>> check_lora_spec({"rank": 4})
    Traceback (most recent call last):
    ...
    ValueError: unknown LoRA key 'rank'; known keys: alpha, dropout, r, target_modules
    """
    if not isinstance(spec, dict):
        raise ValueError(f"a LoRA spec must be a mapping of {sorted(DEFAULT_LORA_SPEC)}, "
                         f"got {type(spec).__name__}")
    for key in spec:
        if key not in DEFAULT_LORA_SPEC:
            raise ValueError(f"unknown LoRA key {key!r}; known keys: {', '.join(sorted(DEFAULT_LORA_SPEC))}")
    filled = {**DEFAULT_LORA_SPEC, **spec}
    r, alpha, dropout, targets = (filled[k] for k in ("r", "alpha", "dropout", "target_modules"))
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise ValueError(f"LoRA r must be an integer >= 1, got {r!r}")
    if not (_is_number(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a number > 0, got {alpha!r}")
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise ValueError(f"LoRA dropout must be a number in [0, 1), got {dropout!r}")
    if (not isinstance(targets, (list, tuple)) or not targets
            or not all(isinstance(name, str) and name.isidentifier() for name in targets)):
        raise ValueError("LoRA target_modules must be a non-empty list of module names such as "
                         f"['q_proj', 'v_proj'], got {targets!r}")
    return {"r": r, "alpha": float(alpha), "dropout": float(dropout), "target_modules": list(targets)}


def _is_number(value) -> bool:
    # YAML 1.1 reads 5e-2 as text: a string here is refused rather than guessed at
    return isinstance(value, Real) and not isinstance(value, bool)


def _language_model(embedder) -> nn.Module:
    if not isinstance(embedder, LmmEmbedder):
        raise TypeError(f"LoRA needs an LmmEmbedder (a Qwen2-VL or LLaVA-OneVision model), got "
                        f"{type(embedder).__name__}; train this model without `lora`")
    return embedder.model.get_decoder()


def has_lora(embedder) -> bool:
    """Whether the embedder holds LoRA adapters that are not merged yet."""
    return any(isinstance(module, BaseTunerLayer) for module in embedder.modules())


def add_lora(embedder: LmmEmbedder, spec: dict, *, seed: int = 0) -> None:
    """Put LoRA adapters on the embedder's language model, in place, and freeze every other weight.

    The adapters' random A matrices come from a generator seeded with `seed`, without touching
    the global RNG, so every process (and a rerun) starts from the same adapters. TypeError for a
    model that is not an LmmEmbedder; ValueError for a bad spec, a target name that matches no
    linear module of the language model, or an embedder that already holds adapters.
    """
    language_model = _language_model(embedder)
    spec = check_lora_spec(spec)
    if has_lora(embedder):
        raise ValueError("the embedder already holds LoRA adapters; merge_lora it first")
    linear_names = {name.rpartition(".")[2] for name, module in language_model.named_modules()
                    if isinstance(module, nn.Linear)}
    missing = [name for name in spec["target_modules"] if name not in linear_names]
    if missing:
        raise ValueError(f"LoRA target_modules {missing} match no linear module of the language "
                         f"model; it has {sorted(linear_names)}")
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                        target_modules=spec["target_modules"], bias="none")
    # merge_lora gives the weights back their trainability (a merged model can be trained on)
    embedder._trainable_before_lora = [p for p in embedder.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):  # adapters are created on the CPU, then moved
        torch.manual_seed(seed)
        inject_adapter_in_model(config, language_model)
    for name, parameter in embedder.named_parameters():
        parameter.requires_grad_(ADAPTER_PREFIX in name)


def merge_lora(embedder: LmmEmbedder) -> None:
    """Fold the adapters into their base weights (W += alpha / r * B @ A) and remove peft's
    wrappers, in place: `save_pretrained` then writes the base model's own parameter names, which
    `LmmEmbedder.from_pretrained` and plain transformers load. Weights that were trainable before
    `add_lora` are trainable again. ValueError when there is nothing to merge."""
    language_model = _language_model(embedder)
    if not has_lora(embedder):
        raise ValueError("the embedder holds no LoRA adapters to merge")
    for name, module in list(language_model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child_name = name.rpartition(".")
            module.merge()
            setattr(language_model.get_submodule(parent_name), child_name, module.get_base_layer())
    del language_model.peft_config  # peft's record of the injected adapters
    for parameter in embedder.__dict__.pop("_trainable_before_lora", []):
        parameter.requires_grad_(True)
