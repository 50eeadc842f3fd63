"""Which recipe fits your GPUs: an estimate of training memory per GPU, from parameter counts,
bytes per parameter and a per-layer activation count.

    python -m llave_kit.memory_plan                     # the README's table (80 GB GPUs, 1024 tokens)
    python -m llave_kit.memory_plan --gpu-gib 40 --seq-len 2048

Peak memory per GPU = static + activations of the sequences in flight, where

    static      = (T * (w + g + o) + F * f) / S  [+ T * g  DDP's gradient buckets, world > 1]
                                                 [+ 2 * U * 2  FSDP: a gathered bf16 unit, and the
                                                   next one prefetched]
                                                 [+ 2 * L  autocast's bf16 copies of the language
                                                   model's weights, kept for backward (DDP)]
    activations = n * s * layers * (a_h * h + 8 * i + 4 * d_kv + 4 * (heads + 2))   bytes
                  with checkpointing: n * s * (layers * c_h * h  +  one layer as above)

T trainable and F frozen parameters, S = the number of GPUs under FSDP (1 under DDP), U the
parameters of one decoder layer, L those of the language model's layers; n sequences in flight
(a GradCache chunk, `gradcache_chunk_size`, else 2 x the per-GPU batch: queries and targets), s
tokens per sequence; h hidden size, i MLP width, d_kv = kv_heads * head_dim.

Bytes, as the kit trains (`precision: bf16`): weights are float32 and compute is bf16 (autocast
under DDP, FSDP2's param_dtype=bf16 under FSDP), so w = 4, g = 4 (fp32 gradients), o = 8 (AdamW's
m and v), f = 4: 16 bytes per trainable parameter. DeepSpeed's bf16 + fp32-master accounting (bf16
weight 2 + bf16 gradient 2 + fp32 master 4 + m 4 + v 4) also gives 16, with f = 2. LoRA trains only
the adapters (T = adapter parameters), every base weight is frozen. Per-token activation bytes were
counted on CPU with autograd's saved-tensor hooks on transformers' Qwen2 decoder layer (SDPA
attention, which keeps no s x s matrix): a_h = 20 with bf16 weights (FSDP), 30 under autocast over
fp32 weights (DDP: the residual stream stays fp32); c_h = 2 (bf16) or 4 (fp32) bytes per element
of a checkpointed layer's input. The embedder never runs the LM head, so there are no (s, vocab)
logits; the frozen vision tower keeps no activations for backward.

These are estimates. Not counted: the CUDA context and allocator fragmentation (the fit test keeps
10 % of the GPU and 2 GiB free), the vision tower's transient forward memory, the loss, and the
embeddings GradCache caches (n x hidden, small). LoRA activations are taken as full fine-tuning's,
an upper bound (autograd keeps no input of a frozen linear map that only needs its weight's
gradient). `benchmarks/RESULTS.md` compares them with measured peaks.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PretrainedConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from llave_kit.encoders import LmmEmbedder
from llave_kit.lora import DEFAULT_LORA_SPEC
from llave_kit.sharding import SHARDINGS

GIB = 2**30


# --------------------------------------------------------------------------------------------------
# The models of the recipes, built in code from their published sizes (no download)


def _qwen2_text(hidden, intermediate, layers, heads, kv_heads, vocab, tied) -> dict:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                tie_word_embeddings=tied, rms_norm_eps=1e-6, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def llava_onevision_config(text: dict) -> LlavaOnevisionConfig:
    """LLaVA-OneVision: SigLIP-so400m (26 layers, width 1152, 384 px, patch 14) + a Qwen2 model."""
    return LlavaOnevisionConfig(text_config={"model_type": "qwen2", **text},
                                tie_word_embeddings=text["tie_word_embeddings"])


def llava_onevision_0_5b_config() -> LlavaOnevisionConfig:
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf's shape: Qwen2-0.5B (24 layers, hidden 896, MLP 4864,
    14 heads, 2 KV heads, tied embeddings; vocabulary 151936 as Qwen2-0.5B's)."""
    return llava_onevision_config(_qwen2_text(896, 4864, 24, 14, 2, 151936, tied=True))


def llava_onevision_7b_config() -> LlavaOnevisionConfig:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf's shape: Qwen2-7B (28 layers, hidden 3584, MLP 18944,
    28 heads, 4 KV heads, untied; vocabulary 152064)."""
    return llava_onevision_config(_qwen2_text(3584, 18944, 28, 28, 4, 152064, tied=False))


def qwen2_vl_2b_config() -> Qwen2VLConfig:
    """Qwen/Qwen2-VL-2B-Instruct's shape: a 32-block ViT (width 1280) + Qwen2-1.5B (28 layers,
    hidden 1536, MLP 8960, 12 heads, 2 KV heads, tied; vocabulary 151936)."""
    text = _qwen2_text(1536, 8960, 28, 12, 2, 151936, tied=True)
    text["rope_parameters"]["mrope_section"] = [16, 24, 24]
    vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)


RECIPE_MODELS = {
    "LLaVA-OV-0.5B": llava_onevision_0_5b_config,
    "Qwen2-VL-2B": qwen2_vl_2b_config,
    "LLaVA-OV-7B": llava_onevision_7b_config,
}
_MODEL_CLASSES = {"llava_onevision": LlavaOnevisionForConditionalGeneration,
                  "qwen2_vl": Qwen2VLForConditionalGeneration}


# --------------------------------------------------------------------------------------------------
# Sizes and the estimate


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs to know of an LMM embedder."""

    trainable: int  # full fine-tuning, vision encoder frozen (LLaVE): language model + projector
    frozen: int  # vision encoder (and an untied LM head, which the embedding never runs)
    lora: int  # adapter parameters of the default LoRA spec
    layer: int  # parameters of one decoder layer: an FSDP unit
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # kv_heads * head_dim


def lora_parameter_count(language_model: nn.Module, r: int, target_modules: list[str]) -> int:
    """r * (d_in + d_out) for every targeted linear map: the A (r, d_in) and B (d_out, r) matrices."""
    return sum(r * (m.in_features + m.out_features) for name, m in language_model.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] in target_modules)


def model_size(embedder: LmmEmbedder, lora_spec: dict = DEFAULT_LORA_SPEC) -> ModelSize:
    """Count an embedder's parameters, trainable as the kit trains it (vision encoder frozen)."""
    text = embedder.model.config.text_config
    language_model = embedder.model.get_decoder()
    return ModelSize(
        trainable=sum(p.numel() for p in embedder.parameters() if p.requires_grad),
        frozen=sum(p.numel() for p in embedder.parameters() if not p.requires_grad),
        lora=lora_parameter_count(language_model, lora_spec["r"], lora_spec["target_modules"]),
        layer=sum(p.numel() for p in language_model.layers[0].parameters()),
        layers=text.num_hidden_layers, hidden=text.hidden_size,
        intermediate=text.intermediate_size, heads=text.num_attention_heads,
        kv_dim=text.num_key_value_heads * (text.hidden_size // text.num_attention_heads))


def size_of_config(config: PretrainedConfig) -> ModelSize:
    """`model_size` of a full-size model built on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        model = _MODEL_CLASSES[config.model_type](config)
    return model_size(LmmEmbedder(model, processor=None, freeze_vision=True))


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter and per activation element; the defaults are the kit's bf16 runs."""

    weight: int = 4  # fp32 weights (bf16 only inside the compute)
    grad: int = 4
    optimizer: int = 8  # AdamW's m and v in fp32
    frozen: int = 4
    autocast: bool = True  # DDP: autocast over fp32 weights; False: bf16 compute weights (FSDP)

    @property
    def per_trainable(self) -> int:
        return self.weight + self.grad + self.optimizer


@dataclass(frozen=True)
class MemoryEstimate:
    static: float  # bytes per GPU: weights, gradients, optimizer state, buffers
    per_sequence: float  # activation bytes per sequence in flight

    def largest_chunk(self, gpu_bytes: float) -> int:
        """Sequences in flight that fit beside the static part, leaving 10 % + 2 GiB free."""
        free = 0.9 * gpu_bytes - 2 * GIB - self.static
        return max(0, math.floor(free / self.per_sequence))


def estimate_training_memory(size: ModelSize, *, gpus: int, sharding: str, lora: bool,
                             checkpointing: bool, seq_len: int,
                             precision: Precision | None = None) -> MemoryEstimate:
    """Estimated training memory per GPU (see the module docstring for the formula)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if gpus < 1 or seq_len < 1:
        raise ValueError(f"gpus and seq_len must be >= 1, got {gpus} and {seq_len}")
    if precision is None:  # as the kit trains: autocast under DDP, bf16 parameters under FSDP
        precision = Precision(autocast=sharding == "ddp")
    trainable = size.lora if lora else size.trainable
    frozen = size.frozen + (size.trainable if lora else 0)
    shards = gpus if sharding == "fsdp" else 1
    static = (trainable * precision.per_trainable + frozen * precision.frozen) / shards
    if sharding == "ddp" and gpus > 1:
        static += trainable * precision.grad  # the reducer's bucket copy of the gradients
    if sharding == "fsdp":
        static += 2 * size.layer * 2  # one gathered bf16 unit and the prefetched next one
    if precision.autocast:  # bf16 weight copies kept for backward: all layers, or the one recomputed
        static += 2 * size.layer * (1 if checkpointing else size.layers)
    layer_bytes_per_token = ((30 if precision.autocast else 20) * size.hidden
                             + 8 * size.intermediate + 4 * size.kv_dim + 4 * (size.heads + 2))
    if checkpointing:
        kept = (4 if precision.autocast else 2) * size.hidden * size.layers
        per_token = kept + layer_bytes_per_token
    else:
        per_token = layer_bytes_per_token * size.layers
    return MemoryEstimate(static, per_token * seq_len)


# --------------------------------------------------------------------------------------------------
# The table


def plan_table(gpu_gib: float = 80, seq_len: int = 1024, gpu_counts: tuple[int, ...] = (1, 8)) -> str:
    """Markdown: per model, sharding, full/LoRA and checkpointing, the static GiB per GPU and the
    largest number of sequences in flight (a GradCache chunk) that fits, for each GPU count."""
    head = ["model", "params (trainable full / LoRA)", "sharding", "train", "act. ckpt"]
    for n in gpu_counts:  # activations differ too: one GPU trains unsharded, autocast included
        head += [f"static GiB / GPU ({n} GPU)", f"act. GiB / seq ({n} GPU)",
                 f"max seqs in flight ({n} GPU)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, make_config in RECIPE_MODELS.items():
        size = size_of_config(make_config())
        total = size.trainable + size.frozen
        for sharding in SHARDINGS:
            for lora in (False, True):
                for checkpointing in (False, True):
                    row = [name, f"{total / 1e9:.2f} B ({size.trainable / 1e9:.2f} B / "
                           f"{size.lora / 1e6:.1f} M)", sharding.upper(), "LoRA" if lora else "full",
                           "on" if checkpointing else "off"]
                    for gpus in gpu_counts:
                        # one process has nothing to shard: the kit trains it unsharded
                        estimate = estimate_training_memory(
                            size, gpus=gpus, sharding=sharding if gpus > 1 else "ddp", lora=lora,
                            checkpointing=checkpointing, seq_len=seq_len)
                        chunk = estimate.largest_chunk(gpu_gib * GIB)
                        row += [f"{estimate.static / GIB:.1f}", f"{estimate.per_sequence / GIB:.2f}",
                                str(chunk) if chunk else "no fit"]
                    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU (GiB)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="GPU counts")
    args = parser.parse_args(argv)
    print(plan_table(args.gpu_gib, args.seq_len, tuple(args.gpus)))


if __name__ == "__main__":
    main()
