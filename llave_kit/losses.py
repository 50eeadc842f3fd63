"""Contrastive losses for multimodal embedders, centred on LLaVE's hardness-weighted InfoNCE.

Conventions shared by every loss
--------------------------------
query  (B, D)  L2-normalised query embeddings.
target (M, D)  L2-normalised targets, M >= B. Row i is query i's positive; rows B..M-1 are extra
               (explicit hard) negatives shared by all queries.
s_ij = q_i . t_j,   temperature tau ("scale" = 1 / tau).

Every loss is assembled from the same three pieces:

1. `_similarity_views`: this rank's rows against all (optionally gathered) columns, with labels,
   for the query->target direction and, when symmetric, the target->query direction (first B
   targets only: extra negatives have no query of their own).
2. a *row loss*, the only part that differs between losses: one value per row of similarities.
3. `_reduce`: the mean over the global batch, averaged over the two directions.

With `gather_across_devices=True` each rank computes its own rows against the global batch and
returns `world_size x` its share of the global mean, so that averaging the returned losses over ranks
gives the single-process loss, and DDP's gradient averaging (divide by world size) gives the
single-process gradient.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn as nn

from llave_kit.distributed import all_gather_with_grad, local_row_offset, world_size
from llave_kit.tiled import tiled_direction_sums

RowLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Input checks


def _check_embeddings(query: torch.Tensor, target: torch.Tensor) -> None:
    for name, tensor in (("query", query), ("target", target)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must have shape (rows, dim), got {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {tensor.dtype}")
    if query.shape[0] == 0:
        raise ValueError("empty batch: query has no rows")
    if query.shape[1] == 0:
        raise ValueError("embedding dimension is 0")
    if query.shape[1] != target.shape[1]:
        raise ValueError(
            f"query and target dims differ: {query.shape[1]} vs {target.shape[1]}"
        )
    if target.shape[0] < query.shape[0]:
        raise ValueError(
            f"target has {target.shape[0]} rows but needs at least one positive per query "
            f"(M >= B = {query.shape[0]})"
        )
    for name, tensor in (("query", query), ("target", target)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _check_hyper_parameters(**values) -> None:
    """Validate the hyper-parameters any loss here may take, by name."""
    rules = {
        "temperature": (lambda v: v > 0, "> 0"),
        "alpha": (lambda v: v >= 0, ">= 0"),
        "beta": (lambda v: v >= 0, ">= 0"),
        "margin": (lambda v: v >= 0, ">= 0"),
        "tau_plus": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "false_negative_margin": (lambda v: True, "a number"),
        "chunk_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                       "and an integer >= 1 (or None for the dense path)"),
    }
    for name, value in values.items():
        if name in ("false_negative_margin", "chunk_size") and value is None:
            continue
        ok, expected = rules[name]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Shared machinery: similarities, negatives mask, cross-entropy, reduction


def _gather_batch(
    query: torch.Tensor, target: torch.Tensor, gather: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Global queries, global targets and this rank's label offset (local tensors and 0 alone)."""
    if not gather:
        return query, target, 0
    batch = query.shape[0]
    all_queries = all_gather_with_grad(query)  # (B_global, D)
    all_targets = torch.cat(  # (B_global + extra_global, D): every positive, then every extra
        [all_gather_with_grad(target[:batch]), all_gather_with_grad(target[batch:])]
    )
    return all_queries, all_targets, local_row_offset(batch, query.device)


def _similarity_views(
    query: torch.Tensor, target: torch.Tensor, symmetric: bool, gather: bool
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """[(similarities, labels)] per direction, and the global batch size.

    Similarities are computed in the input dtype, then promoted to at least float32 so the softmax
    never runs in half precision.
    """
    batch = query.shape[0]
    positives = target[:batch]
    all_queries, all_targets, offset = _gather_batch(query, target, gather)
    labels = torch.arange(offset, offset + batch, device=query.device)
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    views = [((query @ all_targets.T).to(compute_dtype), labels)]  # (B, M_global)
    if symmetric:
        views.append(((positives @ all_queries.T).to(compute_dtype), labels))  # (B, B_global)
    return views, all_queries.shape[0]


def _negatives_mask(
    sim: torch.Tensor, labels: torch.Tensor, false_negative_margin: float | None
) -> torch.Tensor:
    """True where column j counts as a negative for row i.

    The positive never does. With a margin, candidates the row scores above `s_pos - margin` are
    treated as probable false negatives (duplicates, same class) and dropped, as in GISTEmbed's
    absolute-margin filter. The decision is not differentiable, so it is taken without gradient.
    """
    with torch.no_grad():
        rows = torch.arange(sim.shape[0], device=sim.device)
        negatives = torch.ones_like(sim, dtype=torch.bool)
        negatives[rows, labels] = False
        if false_negative_margin is not None:
            positive_sim = sim[rows, labels].unsqueeze(1)
            negatives &= sim <= positive_sim - false_negative_margin
    return negatives


def _masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """-log softmax(logits)[label] over the positive and the kept negatives; one value per row."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    kept = negatives.clone()
    kept[rows, labels] = True
    logits = logits.masked_fill(~kept, torch.finfo(logits.dtype).min)
    return torch.logsumexp(logits, dim=1) - logits[rows, labels]


def _reduce(per_direction_sums: list[torch.Tensor], global_batch: int, gather: bool) -> torch.Tensor:
    mean_over_directions = torch.stack(per_direction_sums).mean()
    # Under gather each rank holds only its rows' terms: scale by world size so that the mean of
    # the ranks' losses, and DDP's averaged gradients, equal the single-process values.
    scale = world_size() if gather else 1
    return mean_over_directions * scale / global_batch


def contrastive_loss(
    row_loss: RowLoss,
    query: torch.Tensor,
    target: torch.Tensor,
    *,
    symmetric: bool = True,
    false_negative_margin: float | None = None,
    gather_across_devices: bool = False,
) -> torch.Tensor:
    """Apply `row_loss(sim, labels, negatives) -> (rows,)` in both directions and average.

    This is the one driver behind every loss in this module; a new loss only needs a row function.
    """
    _check_embeddings(query, target)
    _check_hyper_parameters(false_negative_margin=false_negative_margin)
    views, global_batch = _similarity_views(query, target, symmetric, gather_across_devices)
    sums = [
        row_loss(sim, labels, _negatives_mask(sim, labels, false_negative_margin)).sum()
        for sim, labels in views
    ]
    return _reduce(sums, global_batch, gather_across_devices)


def _tiled_hardness_weighted_loss(
    query, target, *, alpha, temperature, symmetric, false_negative_margin,
    gather_across_devices, chunk_size,
) -> torch.Tensor:
    """The hardness-weighted loss (InfoNCE at alpha=0) without the (B, M) matrix; see `tiled.py`."""
    _check_embeddings(query, target)
    _check_hyper_parameters(false_negative_margin=false_negative_margin)
    all_queries, all_targets, offset = _gather_batch(query, target, gather_across_devices)
    sums = tiled_direction_sums(
        query, target, all_queries, all_targets, offset, alpha=alpha, temperature=temperature,
        symmetric=symmetric, false_negative_margin=false_negative_margin, chunk_size=chunk_size,
    )
    return _reduce(sums, all_queries.shape[0], gather_across_devices)


# --------------------------------------------------------------------------------------------------
# Row losses: similarities (rows, K), labels (rows,), negatives mask (rows, K) -> loss (rows,)


def info_nce_rows(sim, labels, negatives, *, temperature):
    return _masked_cross_entropy(sim / temperature, labels, negatives)


def hardness_weighted_rows(sim, labels, negatives, *, temperature, alpha):
    # The added term is detached: it re-weights each negative's gradient by exp(alpha * s_ij)
    # without adding a gradient path of its own (LLaVE, Eq. 4).
    boost = alpha * sim.detach() * negatives
    return _masked_cross_entropy(sim / temperature + boost, labels, negatives)


def focal_info_nce_rows(sim, labels, negatives, *, temperature, margin):
    rows = torch.arange(sim.shape[0], device=sim.device)
    is_positive = torch.zeros_like(negatives)
    is_positive[rows, labels] = True
    logits = torch.where(is_positive, sim * sim, sim * (sim + margin)) / temperature
    return _masked_cross_entropy(logits, labels, negatives)


def _log_sum_exp_over(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(values.masked_fill(~keep, torch.finfo(values.dtype).min), dim=1)


def dcl_rows(sim, labels, negatives, *, temperature):
    rows = torch.arange(sim.shape[0], device=sim.device)
    logits = sim / temperature
    loss = _log_sum_exp_over(logits, negatives) - logits[rows, labels]
    # A row whose negatives were all masked has no contrast to learn from.
    return torch.where(negatives.any(dim=1), loss, torch.zeros_like(loss))


def hcl_rows(sim, labels, negatives, *, temperature, beta, tau_plus):
    rows = torch.arange(sim.shape[0], device=sim.device)
    logits = sim / temperature
    positive = logits[rows, labels]
    count = negatives.sum(dim=1).clamp(min=1).to(sim.dtype)
    # log of N * sum_j softmax(beta * s)_j * exp(s_j / tau): the importance-weighted negative mass.
    log_weighted = (
        torch.log(count)
        + _log_sum_exp_over(logits + beta * sim, negatives)
        - _log_sum_exp_over(beta * sim, negatives)
    )
    # Work relative to the row maximum so exp() cannot overflow at small temperatures.
    shift = torch.maximum(positive, logits.masked_fill(~negatives, -math.inf).amax(dim=1)).detach()
    debiased = (
        torch.exp(log_weighted - shift) - tau_plus * count * torch.exp(positive - shift)
    ) / (1 - tau_plus)
    floor = count * torch.exp(-1.0 / temperature - shift)  # the smallest possible negative mass
    negative_mass = torch.maximum(debiased, floor)
    loss = torch.log(torch.exp(positive - shift) + negative_mass) + shift - positive
    return torch.where(negatives.any(dim=1), loss, torch.zeros_like(loss))


# --------------------------------------------------------------------------------------------------
# Public functional API


def info_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 0.02,
    symmetric: bool = True,
    *,
    false_negative_margin: float | None = None,
    gather_across_devices: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Plain InfoNCE: mean over rows of -log softmax(s_i. / tau)[i]; see `InfoNCELoss`."""
    _check_hyper_parameters(temperature=temperature, chunk_size=chunk_size)
    if chunk_size is not None:
        return _tiled_hardness_weighted_loss(
            query, target, alpha=0.0, temperature=temperature, symmetric=symmetric,
            false_negative_margin=false_negative_margin,
            gather_across_devices=gather_across_devices, chunk_size=chunk_size,
        )

    rows = functools.partial(info_nce_rows, temperature=temperature)
    return contrastive_loss(
        rows, query, target, symmetric=symmetric,
        false_negative_margin=false_negative_margin, gather_across_devices=gather_across_devices,
    )


def hardness_weighted_info_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 9.0,
    temperature: float = 0.02,
    symmetric: bool = True,
    *,
    false_negative_margin: float | None = None,
    gather_across_devices: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """LLaVE's hardness-weighted InfoNCE; see `HardnessWeightedInfoNCELoss` for the formula."""
    _check_hyper_parameters(temperature=temperature, alpha=alpha, chunk_size=chunk_size)
    if chunk_size is not None:
        return _tiled_hardness_weighted_loss(
            query, target, alpha=alpha, temperature=temperature, symmetric=symmetric,
            false_negative_margin=false_negative_margin,
            gather_across_devices=gather_across_devices, chunk_size=chunk_size,
        )

    rows = functools.partial(hardness_weighted_rows, temperature=temperature, alpha=alpha)
    return contrastive_loss(
        rows, query, target, symmetric=symmetric,
        false_negative_margin=false_negative_margin, gather_across_devices=gather_across_devices,
    )


def focal_info_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    margin: float = 0.3,
    temperature: float = 0.02,
    symmetric: bool = True,
    *,
    false_negative_margin: float | None = None,
    gather_across_devices: bool = False,
) -> torch.Tensor:
    """Focal-InfoNCE (Hou & Li, 2023); see `FocalInfoNCELoss`."""
    _check_hyper_parameters(temperature=temperature, margin=margin)

    rows = functools.partial(focal_info_nce_rows, temperature=temperature, margin=margin)
    return contrastive_loss(
        rows, query, target, symmetric=symmetric,
        false_negative_margin=false_negative_margin, gather_across_devices=gather_across_devices,
    )


def dcl_loss(
    query: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 0.02,
    symmetric: bool = True,
    *,
    false_negative_margin: float | None = None,
    gather_across_devices: bool = False,
) -> torch.Tensor:
    """Decoupled contrastive loss (Yeh et al., 2022); see `DCLLoss`."""
    _check_hyper_parameters(temperature=temperature)

    rows = functools.partial(dcl_rows, temperature=temperature)
    return contrastive_loss(
        rows, query, target, symmetric=symmetric,
        false_negative_margin=false_negative_margin, gather_across_devices=gather_across_devices,
    )


def hcl_loss(
    query: torch.Tensor,
    target: torch.Tensor,
    beta: float = 9.0,
    tau_plus: float = 0.1,
    temperature: float = 0.02,
    symmetric: bool = True,
    *,
    false_negative_margin: float | None = None,
    gather_across_devices: bool = False,
) -> torch.Tensor:
    """Hard-negative contrastive loss (Robinson et al., 2021); see `HCLLoss`."""
    _check_hyper_parameters(temperature=temperature, beta=beta, tau_plus=tau_plus)

    rows = functools.partial(hcl_rows, temperature=temperature, beta=beta, tau_plus=tau_plus)
    return contrastive_loss(
        rows, query, target, symmetric=symmetric,
        false_negative_margin=false_negative_margin, gather_across_devices=gather_across_devices,
    )


# --------------------------------------------------------------------------------------------------
# Modules: store hyper-parameters, call the functional form


class _ContrastiveLoss(nn.Module):
    loss_fn: Callable[..., torch.Tensor]

    def __init__(self, **hyper_parameters):
        super().__init__()
        _check_hyper_parameters(**{k: v for k, v in hyper_parameters.items()
                                   if k not in ("symmetric", "gather_across_devices")})
        self.hyper_parameters = hyper_parameters

    def forward(self, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return type(self).loss_fn(query, target, **self.hyper_parameters)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyper_parameters.items())


class InfoNCELoss(_ContrastiveLoss):
    """InfoNCE with in-batch (and optional explicit) negatives.

        L_q2t = mean_i -log( exp(s_ii / tau) / sum_j exp(s_ij / tau) )     j over all M targets
        L_t2q = mean_j -log( exp(s_jj / tau) / sum_i exp(s_ij / tau) )     i over the B queries
        L = (L_q2t + L_t2q) / 2   if symmetric, else L_q2t

    Args:
        temperature: tau > 0 (scale = 1 / tau); LLaVE uses 0.02.
        symmetric: average the query->target and target->query directions.
        false_negative_margin: drop negatives with s_ij > s_ii - margin (GISTEmbed-style filter).
        gather_across_devices: contrast against every rank's embeddings (autograd-aware gather).
        chunk_size: None for the dense computation; an integer computes the same loss and gradients
            in (chunk, chunk) blocks without the (B, M) matrix (`llave_kit.tiled`; 512 suits a CPU,
            `tiled.DEFAULT_CHUNK_SIZE`).

    Inputs: query (B, D), target (M >= B, D), both L2-normalised. Returns a scalar.

    References: van den Oord et al., "Representation Learning with Contrastive Predictive Coding",
    2018; Radford et al., "CLIP", 2021 (symmetric form).

    Relations: `HardnessWeightedInfoNCELoss` with alpha=0 is exactly this loss.

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(8, 32), dim=-1)
        >>> t = torch.nn.functional.normalize(q + 0.1 * torch.randn(8, 32), dim=-1)
        >>> InfoNCELoss(temperature=0.05)(q, t)
    """

    loss_fn = staticmethod(info_nce)

    def __init__(self, temperature=0.02, symmetric=True, false_negative_margin=None,
                 gather_across_devices=False, chunk_size=None):
        super().__init__(temperature=temperature, symmetric=symmetric,
                         false_negative_margin=false_negative_margin,
                         gather_across_devices=gather_across_devices, chunk_size=chunk_size)


class HardnessWeightedInfoNCELoss(_ContrastiveLoss):
    """LLaVE's hardness-weighted InfoNCE: harder negatives get more gradient.

        logit_ij = s_ij / tau + alpha * sg(s_ij)   for negatives (i != j)
        logit_ii = s_ii / tau                      for the positive
        L = InfoNCE over these logits (symmetric average as in `InfoNCELoss`)

    sg is stop-gradient. Equivalently, each negative's term in the softmax denominator is
    multiplied by w_ij = exp(alpha * s_ij), a constant per step, so its gradient is
    w_ij * softmax-share: negatives that already look like the positive are pushed hardest.
    Unlike lowering tau, the positive logit and the gradient's form are unchanged.

    Args:
        alpha: hardness strength >= 0; LLaVE uses 9. alpha = 0 is plain InfoNCE.
        temperature, symmetric, false_negative_margin, gather_across_devices, chunk_size: as
            `InfoNCELoss` (chunk_size selects the exact tiled computation).

    Inputs: query (B, D), target (M >= B, D), both L2-normalised. Returns a scalar.

    References: Lan et al., "LLaVE: Large Language and Vision Embedding Models with
    Hardness-Weighted Contrastive Learning", 2025.

    Relations: alpha=0 -> `InfoNCELoss`; `HCLLoss` re-weights negatives by exp(beta * s) too, but
    normalises the weights and lets gradient flow through them.

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(8, 32), dim=-1)
        >>> t = torch.nn.functional.normalize(q + 0.1 * torch.randn(8, 32), dim=-1)
        >>> HardnessWeightedInfoNCELoss(alpha=9.0, temperature=0.02)(q, t)
    """

    loss_fn = staticmethod(hardness_weighted_info_nce)

    def __init__(self, alpha=9.0, temperature=0.02, symmetric=True, false_negative_margin=None,
                 gather_across_devices=False, chunk_size=None):
        super().__init__(alpha=alpha, temperature=temperature, symmetric=symmetric,
                         false_negative_margin=false_negative_margin,
                         gather_across_devices=gather_across_devices, chunk_size=chunk_size)


class FocalInfoNCELoss(_ContrastiveLoss):
    """Focal-InfoNCE: self-paced modulation of positive and negative logits.

        logit_ii = s_ii^2 / tau,    logit_ij = s_ij (s_ij + m) / tau   (i != j)

    A negative's logit grows faster than linearly with its similarity, so hard negatives dominate
    the denominator and easy ones fade; the squared positive eases off pairs already aligned.

    Args:
        margin: m >= 0, the negatives' modulation offset.
        temperature, symmetric, false_negative_margin, gather_across_devices: as `InfoNCELoss`.

    References: Hou & Li, "Improving Contrastive Learning of Sentence Embeddings with
    Focal-InfoNCE", Findings of EMNLP 2023. LLaVE's ablation compares against it.
    """

    loss_fn = staticmethod(focal_info_nce)

    def __init__(self, margin=0.3, temperature=0.02, symmetric=True, false_negative_margin=None,
                 gather_across_devices=False):
        super().__init__(margin=margin, temperature=temperature, symmetric=symmetric,
                         false_negative_margin=false_negative_margin,
                         gather_across_devices=gather_across_devices)


class DCLLoss(_ContrastiveLoss):
    """Decoupled contrastive loss: the positive is removed from the denominator.

        L_i = -s_ii / tau + log sum_{j != i} exp(s_ij / tau)

    Removing the positive removes the "negative-positive coupling" that shrinks InfoNCE's
    gradient once the positive dominates, which matters most for small batches.

    Args: temperature, symmetric, false_negative_margin, gather_across_devices as `InfoNCELoss`.

    References: Yeh et al., "Decoupled Contrastive Learning", ECCV 2022.
    """

    loss_fn = staticmethod(dcl_loss)

    def __init__(self, temperature=0.02, symmetric=True, false_negative_margin=None,
                 gather_across_devices=False):
        super().__init__(temperature=temperature, symmetric=symmetric,
                         false_negative_margin=false_negative_margin,
                         gather_across_devices=gather_across_devices)


class HCLLoss(_ContrastiveLoss):
    """Hard-negative contrastive loss with debiasing (HCL).

        w_ij = N * softmax_j(beta * s_ij)                         importance weights, mean 1
        Ng_i = max( (sum_j w_ij e^{s_ij/tau} - tau+ N e^{s_ii/tau}) / (1 - tau+),  N e^{-1/tau} )
        L_i  = -log( e^{s_ii/tau} / (e^{s_ii/tau} + Ng_i) )

    beta concentrates the negative distribution on hard negatives; tau+ (the class prior) removes
    the expected contribution of false negatives. Computed in log space, so tau = 0.02 is safe.
    Here beta multiplies the similarity s itself, on the same scale as LLaVE's alpha (the official
    code applies it to s / tau, i.e. its beta equals this beta * tau).

    Args:
        beta: concentration >= 0 (0: uniform weights). tau_plus: positive-class prior in [0, 1).
        temperature, symmetric, false_negative_margin, gather_across_devices: as `InfoNCELoss`.

    References: Robinson et al., "Contrastive Learning with Hard Negative Samples", ICLR 2021;
    Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020 (tau+).
    """

    loss_fn = staticmethod(hcl_loss)

    def __init__(self, beta=9.0, tau_plus=0.1, temperature=0.02, symmetric=True,
                 false_negative_margin=None, gather_across_devices=False):
        super().__init__(beta=beta, tau_plus=tau_plus, temperature=temperature,
                         symmetric=symmetric, false_negative_margin=false_negative_margin,
                         gather_across_devices=gather_across_devices)


LOSSES: dict[str, type[_ContrastiveLoss]] = {
    "info_nce": InfoNCELoss,
    "hardness_weighted": HardnessWeightedInfoNCELoss,
    "focal_info_nce": FocalInfoNCELoss,
    "dcl": DCLLoss,
    "hcl": HCLLoss,
}
_ALIASES = {"infonce": "info_nce", "llave": "hardness_weighted",
            "hardness_weighted_info_nce": "hardness_weighted", "focal": "focal_info_nce"}


def make_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss module by name, e.g. `make_loss("hardness_weighted", alpha=9.0)`."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    try:
        return LOSSES[key](**kwargs)
    except TypeError as error:
        raise ValueError(f"bad parameters for loss {name!r}: {error}") from None
