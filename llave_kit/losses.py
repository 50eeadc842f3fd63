"""Contrastive losses for multimodal embedders, centred on LLaVE's hardness-weighted InfoNCE.

Conventions shared by every loss
--------------------------------
query  (B, D)  L2-normalised query embeddings.
target (M, D)  L2-normalised targets, M >= B. Row i is query i's positive; rows B..M-1 are extra
               (explicit hard) negatives shared by all queries.
s_ij = q_i . t_j,   temperature tau ("scale" = 1 / tau).
dtypes         query and target may differ in floating dtype. Then both are cast to their common
               dtype (two different floating dtypes always promote to float32 or wider), on the
               dense and the tiled path alike: the loss equals the loss of the cast inputs, and each
               input's gradient comes back in that input's own dtype. A bf16 query against float32
               targets gives the float32 loss of the bf16-rounded query, as a cast would.
               The softmax always runs in at least float32 (`compute_dtype`), the dtype of the
               returned scalar. Half-precision inputs of one dtype: the dense path forms the
               similarities in that dtype, as a half-precision matmul does; the tiled path forms
               them in float32.

How a loss is built
-------------------
Every loss is a *row function*, the only part that differs between losses: similarities (rows, K),
labels (rows,) and a negatives mask (rows, K) in, one loss value per row out. `contrastive_loss`
does the rest, the same for all:

1. `_similarity_views`: this rank's rows against all (optionally gathered) columns, with labels,
   for the query->target direction and, when symmetric, the target->query direction (first B
   targets only: extra negatives have no query of their own).
2. `_negatives_mask`: which columns count as negatives (the optional false-negative filter).
3. `_reduce`: the mean over the global batch, averaged over the two directions.

Each loss then has the function people call (`info_nce`, ...: its signature, its formula and
references in the docstring) and a module derived from that function (`InfoNCELoss`, ...: see
`_LossModule`); `make_loss(name, **kwargs)` builds a module by name.

With `gather_across_devices=True` each rank computes its own rows against the global batch and
returns `world_size x` its share of the global mean, so that averaging the returned losses over
ranks gives the single-process loss, and DDP's gradient averaging (divide by world size) gives the
single-process gradient.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn as nn

from llave_kit.distributed import all_gather_with_grad, local_row_offset, world_size
from llave_kit.tiled import tiled_direction_sums

RowLoss = Callable[..., torch.Tensor]


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


_HYPER_PARAMETER_RULES = {
    "temperature": (lambda v: v > 0, "> 0"),
    "alpha": (lambda v: v >= 0, ">= 0"),
    "beta": (lambda v: v >= 0, ">= 0"),
    "margin": (lambda v: v >= 0, ">= 0"),
    "tau_plus": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "false_negative_margin": (lambda v: True, "a number"),
    "chunk_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                   "and an integer >= 1 (or None for the dense path)"),
}


def _check_hyper_parameters(**values) -> None:
    """Validate the named hyper-parameters that have a rule; flags such as `symmetric`, and a custom
    row loss's own parameters, have none and pass as they are."""
    for name, value in values.items():
        if name not in _HYPER_PARAMETER_RULES:
            continue
        if name in ("false_negative_margin", "chunk_size") and value is None:
            continue
        ok, expected = _HYPER_PARAMETER_RULES[name]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")


def compute_dtype(query: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    """The dtype the softmax and the loss run in: the inputs' common dtype, never below float32.

    bf16 rounds a similarity near 1 by up to 2^-9, which tau = 0.02 magnifies 50x in the logits;
    float64 inputs keep float64.
    """
    return torch.promote_types(torch.promote_types(query.dtype, target.dtype), torch.float32)


# --------------------------------------------------------------------------------------------------
# The driver: similarities, negatives mask, cross-entropy, reduction


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

    Similarities are computed in the inputs' common dtype (autograd casts each input's gradient
    back to its own dtype), then promoted to `compute_dtype` so the softmax never runs in half
    precision.
    """
    softmax_dtype = compute_dtype(query, target)
    common = torch.promote_types(query.dtype, target.dtype)
    query, target = query.to(common), target.to(common)  # no copies when the dtypes agree
    batch = query.shape[0]
    positives = target[:batch]
    all_queries, all_targets, offset = _gather_batch(query, target, gather)
    labels = torch.arange(offset, offset + batch, device=query.device)
    views = [((query @ all_targets.T).to(softmax_dtype), labels)]  # (B, M_global)
    if symmetric:
        views.append(((positives @ all_queries.T).to(softmax_dtype), labels))  # (B, B_global)
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
    chunk_size: int | None = None,
    **hyper_parameters,
) -> torch.Tensor:
    """Apply `row_loss(sim, labels, negatives, **hyper_parameters) -> (rows,)` in both directions
    and average.

    The one driver behind every loss in this module; a new loss only needs a row function.
    `chunk_size` selects the exact tiled computation, which exists for `info_nce_rows` and
    `hardness_weighted_rows` only.
    """
    _check_hyper_parameters(
        false_negative_margin=false_negative_margin, chunk_size=chunk_size, **hyper_parameters
    )
    _check_embeddings(query, target)
    if chunk_size is not None:
        return _tiled_loss(
            row_loss, query, target, symmetric, false_negative_margin, gather_across_devices,
            chunk_size, **hyper_parameters,
        )
    views, global_batch = _similarity_views(query, target, symmetric, gather_across_devices)
    rows = functools.partial(row_loss, **hyper_parameters)
    sums = [
        rows(sim, labels, _negatives_mask(sim, labels, false_negative_margin)).sum()
        for sim, labels in views
    ]
    return _reduce(sums, global_batch, gather_across_devices)


def _tiled_loss(
    row_loss, query, target, symmetric, false_negative_margin, gather, chunk_size,
    **hyper_parameters,
) -> torch.Tensor:
    """`contrastive_loss` without the (B, M) matrix; see `tiled.py`."""
    # InfoNCE is the hardness-weighted loss at alpha = 0, so one tiled kernel computes both.
    tiled_forms = {info_nce_rows: {"alpha": 0.0}, hardness_weighted_rows: {}}
    if row_loss not in tiled_forms:
        raise ValueError(
            "chunk_size: only info_nce_rows and hardness_weighted_rows have a tiled form"
        )
    all_queries, all_targets, offset = _gather_batch(query, target, gather)
    sums = tiled_direction_sums(
        query, target, all_queries, all_targets, offset, symmetric=symmetric,
        false_negative_margin=false_negative_margin, chunk_size=chunk_size,
        dtype=compute_dtype(query, target), **tiled_forms[row_loss], **hyper_parameters,
    )
    return _reduce(sums, all_queries.shape[0], gather)


# --------------------------------------------------------------------------------------------------
# The losses. Each is a row function, similarities (rows, K), labels (rows,), negatives mask
# (rows, K) -> loss (rows,), followed by the function people call: its signature and defaults,
# its formula, references and relations in the docstring, and one call to `contrastive_loss`.


def info_nce_rows(sim, labels, negatives, *, temperature):
    return _masked_cross_entropy(sim / temperature, labels, negatives)


def info_nce(
    query: torch.Tensor, target: torch.Tensor, temperature: float = 0.02, symmetric: bool = True,
    *, false_negative_margin: float | None = None, gather_across_devices: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """InfoNCE with in-batch (and optional explicit) negatives.

        L_q2t = mean_i -log( exp(s_ii / tau) / sum_j exp(s_ij / tau) )     j over all M targets
        L_t2q = mean_j -log( exp(s_jj / tau) / sum_i exp(s_ij / tau) )     i over the B queries
        L = (L_q2t + L_t2q) / 2   if symmetric, else L_q2t

    Args:
        query, target: (B, D) and (M >= B, D), both L2-normalised; row i of target is query i's
            positive, rows B..M-1 extra negatives shared by all queries.
        temperature: tau > 0 (scale = 1 / tau); LLaVE uses 0.02.
        symmetric: average the query->target and target->query directions.
        false_negative_margin: drop negatives with s_ij > s_ii - margin (GISTEmbed-style filter).
        gather_across_devices: contrast against every rank's embeddings (autograd-aware gather).
        chunk_size: None for the dense computation; an integer computes the same loss and gradients
            in (chunk, chunk) blocks without the (B, M) matrix (`llave_kit.tiled`; 512 suits a CPU,
            `tiled.DEFAULT_CHUNK_SIZE`).

    Returns: the loss, a scalar in float32 or wider (half-precision inputs are promoted).

    References: van den Oord et al., "Representation Learning with Contrastive Predictive Coding",
    2018; Radford et al., "CLIP", 2021 (symmetric form).

    Relations: `hardness_weighted_info_nce` with alpha=0 is exactly this loss.

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> t = torch.tensor([[0.8, 0.6], [0.6, 0.8]])  # s_ii = 0.8, s_ij = 0.6
        >>> round(info_nce(q, t, temperature=0.1).item(), 4)  # log(1 + e^(6 - 8)), both directions
        0.1269
    """
    return contrastive_loss(
        info_nce_rows, query, target, temperature=temperature, symmetric=symmetric,
        false_negative_margin=false_negative_margin, gather_across_devices=gather_across_devices,
        chunk_size=chunk_size,
    )


def hardness_weighted_rows(sim, labels, negatives, *, temperature, alpha):
    # The added term is detached: it re-weights each negative's gradient by exp(alpha * s_ij)
    # without adding a gradient path of its own (LLaVE, Eq. 4).
    boost = alpha * sim.detach() * negatives
    return _masked_cross_entropy(sim / temperature + boost, labels, negatives)


def hardness_weighted_info_nce(
    query: torch.Tensor, target: torch.Tensor, alpha: float = 9.0, temperature: float = 0.02,
    symmetric: bool = True, *, false_negative_margin: float | None = None,
    gather_across_devices: bool = False, chunk_size: int | None = None,
) -> torch.Tensor:
    """LLaVE's hardness-weighted InfoNCE: harder negatives get more gradient.

        logit_ij = s_ij / tau + alpha * sg(s_ij)   for negatives (i != j)
        logit_ii = s_ii / tau                      for the positive
        L = InfoNCE over these logits (symmetric average as in `info_nce`)

    sg is stop-gradient. Equivalently, each negative's term in the softmax denominator is
    multiplied by w_ij = exp(alpha * s_ij), a constant per step, so its gradient is
    w_ij * softmax-share: negatives that already look like the positive are pushed hardest.
    Unlike lowering tau, the positive logit and the gradient's form are unchanged.

    Args:
        alpha: hardness strength >= 0; LLaVE uses 9. alpha = 0 is plain InfoNCE.
        query, target, temperature, symmetric, false_negative_margin, gather_across_devices,
            chunk_size: as `info_nce` (chunk_size selects the exact tiled computation).

    Returns: the loss, a scalar in float32 or wider.

    References: Lan et al., "LLaVE: Large Language and Vision Embedding Models with
    Hardness-Weighted Contrastive Learning", 2025.

    Relations: alpha=0 -> `info_nce`; `hcl_loss` re-weights negatives by exp(beta * s) too, but
    normalises the weights and lets gradient flow through them.

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> t = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
        >>> round(hardness_weighted_info_nce(q, t, alpha=9.0, temperature=0.1).item(), 4)
        3.4328
        >>> torch.equal(hardness_weighted_info_nce(q, t, alpha=0.0), info_nce(q, t))
        True

    The negative's logit rose from 6 to 6 + 9 * 0.6 = 11.4, above the positive's 8:
    log(1 + e^(11.4 - 8)) = 3.4328.
    """
    return contrastive_loss(
        hardness_weighted_rows, query, target, alpha=alpha, temperature=temperature,
        symmetric=symmetric, false_negative_margin=false_negative_margin,
        gather_across_devices=gather_across_devices, chunk_size=chunk_size,
    )


def focal_info_nce_rows(sim, labels, negatives, *, temperature, margin):
    rows = torch.arange(sim.shape[0], device=sim.device)
    is_positive = torch.zeros_like(negatives)
    is_positive[rows, labels] = True
    logits = torch.where(is_positive, sim * sim, sim * (sim + margin)) / temperature
    return _masked_cross_entropy(logits, labels, negatives)


def focal_info_nce(
    query: torch.Tensor, target: torch.Tensor, margin: float = 0.3, temperature: float = 0.02,
    symmetric: bool = True, *, false_negative_margin: float | None = None,
    gather_across_devices: bool = False,
) -> torch.Tensor:
    """Focal-InfoNCE: self-paced modulation of positive and negative logits.

        logit_ii = s_ii^2 / tau,    logit_ij = s_ij (s_ij + m) / tau   (i != j)

    A negative's logit grows faster than linearly with its similarity, so hard negatives dominate
    the denominator and easy ones fade; the squared positive eases off pairs already aligned.

    Args:
        margin: m >= 0, the negatives' modulation offset.
        query, target, temperature, symmetric, false_negative_margin, gather_across_devices: as
            `info_nce`.

    Returns: the loss, a scalar in float32 or wider.

    References: Hou & Li, "Improving Contrastive Learning of Sentence Embeddings with
    Focal-InfoNCE", Findings of EMNLP 2023. LLaVE's ablation compares against it.

    Relations: `hardness_weighted_info_nce` also raises a negative's logit with its similarity, by
    a detached alpha * s_ij; here the rise s_ij (s_ij + m - 1) / tau carries gradient, and the
    positive's logit changes too, so no setting reduces to `info_nce`.

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> t = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
        >>> round(focal_info_nce(q, t, margin=0.3, temperature=0.1).item(), 4)
        0.3133

    The positive's logit is 0.8^2 / 0.1 = 6.4, the negative's 0.6 * 0.9 / 0.1 = 5.4:
    log(1 + e^(5.4 - 6.4)) = 0.3133.
    """
    return contrastive_loss(
        focal_info_nce_rows, query, target, margin=margin, temperature=temperature,
        symmetric=symmetric, false_negative_margin=false_negative_margin,
        gather_across_devices=gather_across_devices,
    )


def _log_sum_exp_over(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(values.masked_fill(~keep, torch.finfo(values.dtype).min), dim=1)


def dcl_rows(sim, labels, negatives, *, temperature):
    rows = torch.arange(sim.shape[0], device=sim.device)
    logits = sim / temperature
    loss = _log_sum_exp_over(logits, negatives) - logits[rows, labels]
    # A row whose negatives were all masked has no contrast to learn from.
    return torch.where(negatives.any(dim=1), loss, torch.zeros_like(loss))


def dcl_loss(
    query: torch.Tensor, target: torch.Tensor, temperature: float = 0.02, symmetric: bool = True,
    *, false_negative_margin: float | None = None, gather_across_devices: bool = False,
) -> torch.Tensor:
    """Decoupled contrastive loss: the positive is removed from the denominator.

        L_i = -s_ii / tau + log sum_{j != i} exp(s_ij / tau)

    Removing the positive removes the "negative-positive coupling" that shrinks InfoNCE's
    gradient once the positive dominates, which matters most for small batches. The loss can be
    negative; a row whose negatives are all filtered out contributes 0.

    Args:
        query, target, temperature, symmetric, false_negative_margin, gather_across_devices: as
            `info_nce`.

    Returns: the loss, a scalar in float32 or wider.

    References: Yeh et al., "Decoupled Contrastive Learning", ECCV 2022.

    Relations: `info_nce` with the positive dropped from its denominator.

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> t = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
        >>> round(dcl_loss(q, t, temperature=0.1).item(), 4)  # -8 + log(e^6)
        -2.0
    """
    return contrastive_loss(
        dcl_rows, query, target, temperature=temperature, symmetric=symmetric,
        false_negative_margin=false_negative_margin, gather_across_devices=gather_across_devices,
    )


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


def hcl_loss(
    query: torch.Tensor, target: torch.Tensor, beta: float = 9.0, tau_plus: float = 0.1,
    temperature: float = 0.02, symmetric: bool = True, *,
    false_negative_margin: float | None = None, gather_across_devices: bool = False,
) -> torch.Tensor:
    """Hard-negative contrastive loss with debiasing (HCL).

        w_ij = N * softmax_j(beta * s_ij)                         importance weights, mean 1
        Ng_i = max( (sum_j w_ij e^{s_ij/tau} - tau+ N e^{s_ii/tau}) / (1 - tau+),  N e^{-1/tau} )
        L_i  = -log( e^{s_ii/tau} / (e^{s_ii/tau} + Ng_i) )

    beta concentrates the negative distribution on hard negatives; tau+ (the class prior) removes
    the expected contribution of false negatives. Computed in log space, so tau = 0.02 is safe.
    Here beta multiplies the similarity s itself, on the same scale as LLaVE's alpha (the official
    code applies it to s / tau, i.e. its beta equals this beta * tau).

    Args:
        beta: concentration >= 0 (0: uniform weights).
        tau_plus: positive-class prior in [0, 1).
        query, target, temperature, symmetric, false_negative_margin, gather_across_devices: as
            `info_nce`.

    Returns: the loss, a scalar in float32 or wider.

    References: Robinson et al., "Contrastive Learning with Hard Negative Samples", ICLR 2021;
    Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020 (tau+).

    Relations: beta=0 and tau_plus=0 give `info_nce` (while the floor is inactive);
    `hardness_weighted_info_nce` also weights by exp(alpha * s), unnormalised and detached.

    Example, with an extra negative (0, -1) so that beta has weights to shift:
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> t = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, -1.0]])
        >>> round(hcl_loss(q, t, beta=0.0, tau_plus=0.0, temperature=0.1).item(), 4)  # info_nce
        0.127
        >>> round(hcl_loss(q, t, beta=9.0, tau_plus=0.0, temperature=0.1).item(), 4)
        0.183
    """
    return contrastive_loss(
        hcl_rows, query, target, beta=beta, tau_plus=tau_plus, temperature=temperature,
        symmetric=symmetric, false_negative_margin=false_negative_margin,
        gather_across_devices=gather_across_devices,
    )


# --------------------------------------------------------------------------------------------------
# Modules, derived from the functions


class _LossModule(nn.Module):
    """A loss function as a module: `class XLoss(_LossModule, loss_fn=x): pass` is the whole class.

    The subclass gets `x`'s hyper-parameters (everything after query and target) as constructor
    arguments, in the same order with the same defaults and checks; `x`'s docstring; and
    `forward(query, target) = x(query, target, **hyper_parameters)`. Written once, a module cannot
    drift from its function.
    """

    loss_fn: Callable[..., torch.Tensor]

    def __init_subclass__(cls, loss_fn: Callable[..., torch.Tensor] | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if loss_fn is None:  # a further subclass keeps its parent's loss
            return
        _query, _target, *hyper = inspect.signature(loss_fn).parameters.values()
        # Positional or keyword, so that `HCLLoss(1.0, 0.2)` keeps working as it always has.
        hyper = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in hyper]
        signature = inspect.Signature(hyper)

        def __init__(self, *args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as error:
                raise TypeError(f"{cls.__name__}.__init__() {error}") from None
            bound.apply_defaults()
            _check_hyper_parameters(**bound.arguments)
            nn.Module.__init__(self)
            self.hyper_parameters = dict(bound.arguments)

        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        __init__.__signature__ = inspect.Signature([self_parameter, *hyper])
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        __init__.__doc__ = f"Take and check the hyper-parameters of `{loss_fn.__name__}`."
        cls.__init__ = __init__
        cls.loss_fn = staticmethod(loss_fn)
        summary, _, details = inspect.cleandoc(loss_fn.__doc__).partition("\n")
        cls.__doc__ = (
            f"{summary}\n\nModule form of `{loss_fn.__name__}`: the constructor takes its "
            f"hyper-parameters,\n`forward(query, target)` returns the loss.\n{details}"
        )

    def forward(self, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(query, target, **self.hyper_parameters)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyper_parameters.items())


class InfoNCELoss(_LossModule, loss_fn=info_nce):
    pass


class HardnessWeightedInfoNCELoss(_LossModule, loss_fn=hardness_weighted_info_nce):
    pass


class FocalInfoNCELoss(_LossModule, loss_fn=focal_info_nce):
    pass


class DCLLoss(_LossModule, loss_fn=dcl_loss):
    pass


class HCLLoss(_LossModule, loss_fn=hcl_loss):
    pass


LOSSES: dict[str, type[_LossModule]] = {
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
