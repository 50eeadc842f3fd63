"""How the model is spread over processes for training, and gathered back for saving.

    net = wrap_model(model, "fsdp", runtime, precision="bf16")   # before the optimizer is built
    loss = contrastive_backward(net, loss_fn, batch)             # llave_kit.gradcache
    save_sharded_state(folder, model, optimizer)                 # a checkpoint, every rank
    plain = consolidated_embedder(model, lora_spec)              # every rank; rank 0 gets the model

`sharding="ddp"`: every process holds the whole model, its gradients and its optimizer moments,
and DDP all-reduces the gradients. `sharding="fsdp"`: torch's FSDP2 (`fully_shard`) splits every
parameter, gradient and moment over the processes (ZeRO-3, as LLaVE trains); a unit's parameters
are all-gathered just before it runs and freed after, and its gradients are reduce-scattered. The
gradient each process ends with is the same average as DDP's, so both train the same model; with
one process there is nothing to split and either runs as plain single-process training.

The FSDP units of an `LmmEmbedder`:
    1. each decoder layer of the language model: every forward runs all of them, in order;
    2. an untied LM head, which the embedding never runs: a unit of its own is never gathered;
    3. the root, the embedder itself: token embeddings, final norm, projector and vision tower.
The vision tower is not a unit of its own because it runs only for inputs with images: a unit
that runs on one process and not on another would pair their all-gathers wrongly. Frozen (as in
LLaVE), it sits in the root with trainable weights, which FSDP2 allows (a frozen parameter is
gathered, never reduced). Two rules follow from every gather being a collective:
    - every process runs as many forwards as its peers (GradCache pads its chunks to match);
    - a trainable parameter a process did not use (the projector, on a batch without images)
      reduce-scatters zeros (`set_reduce_scatter_unused_params`), as DDP's
      find_unused_parameters does.

Saving: a checkpoint holds each process's shards of the model and the optimizer, written
together by `torch.distributed.checkpoint` (`save_sharded_state`); the final model is gathered to
rank 0's CPU (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`) into a plain
`LmmEmbedder`, which writes the same `save_pretrained` folder as an unsharded run.
"""
from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from llave_kit.distributed import rank
from llave_kit.gradcache import Encoder

if TYPE_CHECKING:
    from llave_kit.encoders import LmmEmbedder
    from llave_kit.train import Runtime

SHARDINGS = ("ddp", "fsdp")


def wrap_model(model: nn.Module, sharding: str, runtime: Runtime, *, precision: str = "fp32",
               find_unused_parameters: bool = True) -> nn.Module:
    """The module a training step calls, `net(groups)`: an `Encoder` of `model`, under DDP or
    over a model sharded in place. Both start every process from rank 0's weights.
    """
    check_shardable(model, sharding)
    if runtime.world_size == 1:
        return Encoder(model)
    if sharding == "ddp":
        return DistributedDataParallel(
            Encoder(model), find_unused_parameters=find_unused_parameters,
            device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    shard_model(model, mixed_precision(precision, runtime.device))
    return Encoder(model)


def check_shardable(model: nn.Module, sharding: str) -> None:
    """TypeError unless `model` can be trained with `sharding` (FSDP knows an LmmEmbedder's
    units), ValueError when this torch is too old for FSDP."""
    if sharding != "fsdp":
        return
    if not hasattr(FSDPModule, "set_reduce_scatter_unused_params"):  # added in torch 2.13
        raise ValueError(f"sharding='fsdp' needs torch >= 2.13 (FSDP2 reducing the gradients of "
                         f"parameters a process did not use); this is torch {torch.__version__}")
    from llave_kit.encoders import LmmEmbedder  # imports transformers: only for sharded runs

    if not isinstance(model, LmmEmbedder):
        raise TypeError(f"sharding='fsdp' shards an LmmEmbedder (a Qwen2-VL or LLaVA-OneVision "
                        f"model), got {type(model).__name__}; train it with sharding='ddp'")


def mixed_precision(precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 weights for compute with float32 gradient reduction on a GPU under precision="bf16";
    float32 otherwise (on a CPU bf16 stays autocast's business, as in an unsharded run)."""
    if precision == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, policy: MixedPrecisionPolicy) -> None:
    """Apply `fully_shard` to an LmmEmbedder's units (see the module docstring), in place."""
    check_shardable(model, "fsdp")
    # DDP starts every process from rank 0's weights; sharding each process's own would mix them.
    for tensor in chain(model.parameters(), model.buffers()):
        dist.broadcast(tensor.data, src=0)
    hf_model = model.model
    for layer in hf_model.get_decoder().layers:
        fully_shard(layer, mp_policy=policy)
    head, embeddings = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        fully_shard(head, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.set_reduce_scatter_unused_params(True)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a DTensor); any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (or partial) tensor assembled on every process, a collective; any other as it is.
    (clip_grad_norm_ over sharded gradients returns such a norm.)"""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# --------------------------------------------------------------------------------------------------
# Saving and loading


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of model and optimizer into `folder` (a collective)."""
    dcp.save(_state(model, optimizer), checkpoint_id=folder)


def load_sharded_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process reads its shards back from `save_sharded_state`'s folder (a collective)."""
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def consolidated_embedder(model: LmmEmbedder, lora_spec: dict | None = None) -> LmmEmbedder | None:
    """The sharded model's weights gathered into a plain LmmEmbedder on rank 0's CPU; None on the
    other ranks. A collective: every rank calls it.

    `lora_spec`: the spec the adapters were added with (`llave_kit.lora`); the plain model gets
    the same adapters, holding the trained values, so that `merge_lora` can fold them in.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if rank() != 0:
        return None
    from llave_kit.encoders import LmmEmbedder

    hf_model = model.model
    with torch.device("meta"):  # a skeleton: its tensors come from `full` (assign=True)
        skeleton = type(hf_model)._from_config(hf_model.config)
    plain = LmmEmbedder(skeleton, model.processor, query_instruction=model.query_instruction,
                        target_instruction=model.target_instruction, freeze_vision=False)
    if lora_spec is not None:
        from llave_kit.lora import add_lora  # peft loads only for runs that use it

        add_lora(plain, lora_spec)
    plain.load_state_dict(full, assign=True)
    plain.model.tie_weights()  # assign=True replaced a tied head's weight by a copy of its own
    return plain
