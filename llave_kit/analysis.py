"""Where positives and negatives sit in similarity space: the measures behind LLaVE's Table 1.

- `similarity_stats`: per query, the positive's similarity and the mean similarity of the top-k
  (hard) and bottom-k (easy) negatives -- the columns of LLaVE's Table 1 -- and their means.
- `overlap_metrics`: how far the positive and negative similarity distributions overlap (overlap
  coefficient, Bhattacharyya coefficient, AUROC, margin) -- the reading of LLaVE's overlap figures.
- `negative_gradients` / `gradient_share`: how InfoNCE and hardness weighting split a row's
  gradient among its negatives.
- `alignment` / `uniformity`: Wang & Isola's geometry of the embedding sphere.

Similarities are cosine similarities in float64: rows are L2-normalised here, so any embeddings
work. Inputs may be torch tensors (any dtype or device) or numpy arrays. Candidates come either as
MMEB lists, cand_emb (Q, C, D) with each query's own C candidates (the positive is usually
candidate 0), or as one shared gallery, cand_emb (N, D). Large eval sets keep each distinct
candidate once, (N, D), and an index (Q, C) into it (`indexed_similarity_chunks`).

Example (50 queries, 8 candidates each, the positive first and closest):
    >>> rng = np.random.default_rng(0)
    >>> query_emb = rng.normal(size=(50, 16))                                 # (Q, D)
    >>> cand_emb = query_emb[:, None] + 1.5 * rng.normal(size=(50, 8, 16))     # (Q, C, D)
    >>> cand_emb[:, 0] = query_emb + 0.5 * rng.normal(size=(50, 16))
    >>> stats = similarity_stats(query_emb, cand_emb, k=3)
    >>> {name: round(value, 3) for name, value in stats.as_dict().items()}
    {'positive': 0.877, 'hard': 0.669, 'easy': 0.411, 'gap': 0.207, 'k': 3, 'queries': 50}
    >>> round(overlap_metrics(stats.positive, stats.hard).auroc, 3)  # P(positive beats a top-k one)
    0.966
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.signal import fftconvolve
from scipy.special import logsumexp, softmax

from llave_kit.statistics import auroc

# --------------------------------------------------------------------------------------------------
# Inputs


def to_numpy(x) -> np.ndarray:
    """A torch tensor (floats become float64) or array-like as a numpy array, on the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def as_float_array(x, name: str) -> np.ndarray:
    """x as a finite float64 array; a ValueError names `name` otherwise."""
    array = to_numpy(x).astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return array


def l2_normalize(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} contains a zero vector: its cosine similarity is undefined")
    return x / norms


def resolve_positives(positive_index, n_rows: int, n_columns: int, default_diagonal: bool):
    """Column of each row's positive as an int array (n_rows,).

    None means column 0 for every row (MMEB lists) or, with `default_diagonal`, column i for row i
    (paired data: query i's positive is gallery row i, as in the losses).
    """
    if positive_index is None:
        if not default_diagonal:
            return np.zeros(n_rows, dtype=np.int64)
        if n_columns < n_rows:
            raise ValueError(f"positive_index=None pairs row i with column i, but there are "
                             f"{n_rows} rows and only {n_columns} columns")
        return np.arange(n_rows)
    index = to_numpy(positive_index)
    if index.ndim == 0:
        index = np.full(n_rows, index)
    if index.shape != (n_rows,) or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"positive_index must hold {n_rows} integers, got shape {index.shape} "
                         f"and dtype {index.dtype}")
    if index.min() < 0 or index.max() >= n_columns:
        raise ValueError(f"positive_index out of range [0, {n_columns}): "
                         f"min {index.min()}, max {index.max()}")
    return index.astype(np.int64)


def _check_shapes(query_shape, cand_shape) -> None:
    if len(query_shape) != 2 or query_shape[0] == 0:
        raise ValueError(f"query_emb must have shape (Q > 0, D), got {query_shape}")
    if len(cand_shape) not in (2, 3):
        raise ValueError(f"cand_emb must be a gallery (N, D) or candidate lists (Q, C, D), "
                         f"got shape {cand_shape}")
    if cand_shape[-1] != query_shape[1]:
        raise ValueError(f"embedding dims differ: query {query_shape[1]}, "
                         f"candidates {cand_shape[-1]}")
    if len(cand_shape) == 3 and cand_shape[0] != query_shape[0]:
        raise ValueError(f"{query_shape[0]} queries but {cand_shape[0]} candidate lists")
    if 0 in cand_shape:
        raise ValueError(f"cand_emb is empty: shape {cand_shape}")


def similarity_chunks(
    query_emb, cand_emb, positive_index=None, chunk_size: int = 256
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Yield (rows, sims, positives) for consecutive chunks of at most `chunk_size` queries.

    rows: the chunk's slice of query indices; sims (n, C): cosine similarity of each query to its
    own candidate list, or (n, N) to the whole gallery; positives (n,): the positive's column.
    Only one chunk of similarities exists at a time, so a large gallery never builds (Q, N).
    positive_index=None: candidate 0 of each list, or gallery row i for query i.
    """
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    cand_emb = cand_emb if hasattr(cand_emb, "shape") else np.asarray(cand_emb)
    query = as_float_array(query_emb, "query_emb")
    _check_shapes(query.shape, tuple(cand_emb.shape))
    query = l2_normalize(query, "query_emb")
    gallery = len(cand_emb.shape) == 2
    positives = resolve_positives(positive_index, len(query), cand_emb.shape[-2], gallery)
    if gallery:
        cand_emb = l2_normalize(as_float_array(cand_emb, "cand_emb"), "cand_emb")  # (N, D)
    for start in range(0, len(query), chunk_size):
        rows = slice(start, start + chunk_size)
        if gallery:
            sims = query[rows] @ cand_emb.T  # (n, N)
        else:
            lists = l2_normalize(as_float_array(cand_emb[rows], "cand_emb"), "cand_emb")
            sims = np.einsum("nd,ncd->nc", query[rows], lists)  # (n, C)
        yield rows, sims, positives[rows]


MAX_GATHERED_VALUES = 2**23  # one chunk of gathered candidate lists: 64 MiB of float64


def indexed_similarity_chunks(
    query_emb, cand_emb, index, chunk_size: int = 256
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (rows, sims) for chunks of queries whose candidate lists index a table of
    embeddings: list i is cand_emb[index[i]].

    query_emb (Q, D); cand_emb (N, D), e.g. each distinct candidate of an eval set once;
    index (Q, C) ints in [0, N). sims (n, C) are the cosine similarities of `similarity_chunks` on
    the lists cand_emb[index] (Q, C, D), computed the same way, but each candidate is normalised
    once (a float64 copy of the table) and only one chunk of lists is gathered at a time: at most
    `chunk_size` queries and MAX_GATHERED_VALUES numbers, so a chunk stays near 64 MiB whatever C
    and D are.
    """
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    cand_emb = cand_emb if hasattr(cand_emb, "shape") else np.asarray(cand_emb)
    index = to_numpy(index)
    query = l2_normalize(as_float_array(query_emb, "query_emb"), "query_emb")
    if len(cand_emb.shape) != 2:
        raise ValueError(f"cand_emb must be a table of candidates (N, D), got {cand_emb.shape}")
    if index.ndim != 2 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"index must be (Q, C) integers, got shape {index.shape} and dtype "
                         f"{index.dtype}")
    _check_shapes(query.shape, (len(index), *cand_emb.shape))
    if index.shape[1] == 0 or index.min() < 0 or index.max() >= len(cand_emb):
        raise ValueError(f"index must hold at least one candidate per query, each in "
                         f"[0, {len(cand_emb)}); got shape {index.shape}")
    table = l2_normalize(as_float_array(cand_emb, "cand_emb"), "cand_emb")  # each row once
    rows_per_chunk = max(1, min(chunk_size, MAX_GATHERED_VALUES // index[0].size // table.shape[1]))
    for start in range(0, len(query), rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        yield rows, np.einsum("nd,ncd->nc", query[rows], table[index[rows]])  # (n, C)


# --------------------------------------------------------------------------------------------------
# Table 1: positive / hard-negative / easy-negative similarity


@dataclass(frozen=True)
class SimilarityStats:
    """Per-query similarities of the positive, the top-k and the bottom-k negatives.

    positive (Q,); hard (Q, k), most similar first; easy (Q, k), least similar first.
    """

    positive: np.ndarray
    hard: np.ndarray
    easy: np.ndarray

    @property
    def k(self) -> int:
        return self.hard.shape[1]

    @property
    def hard_mean(self) -> np.ndarray:  # (Q,) Table 1's "hard negatives" column, per query
        return self.hard.mean(axis=1)

    @property
    def easy_mean(self) -> np.ndarray:  # (Q,)
        return self.easy.mean(axis=1)

    def as_dict(self) -> dict[str, float]:
        """Means over queries: positive, hard, easy, gap = positive - hard; plus k and queries."""
        positive, hard = float(self.positive.mean()), float(self.hard_mean.mean())
        return {"positive": positive, "hard": hard, "easy": float(self.easy_mean.mean()),
                "gap": positive - hard, "k": self.k, "queries": len(self.positive)}

    def table_row(self, digits: int = 2) -> str:
        """'pos / hard / easy' as printed in LLaVE's Table 1, e.g. '0.71 / 0.65 / 0.36'."""
        row = self.as_dict()
        return " / ".join(f"{row[key]:.{digits}f}" for key in ("positive", "hard", "easy"))

    def distributions(self) -> dict[str, np.ndarray]:
        """Flat arrays {positive, hard, easy} for `plotting.plot_similarity_distributions`."""
        return {"positive": self.positive, "hard": self.hard.ravel(), "easy": self.easy.ravel()}

    @property
    def auroc(self) -> float:
        """P(a positive beats a top-k hard negative), pooled over queries (`statistics.auroc`):
        how far Table 1's positive and hard-negative distributions overlap (1: not at all)."""
        return auroc(self.positive, self.hard)


def similarity_stats(
    query_emb, cand_emb, positive_index=None, k: int = 5, chunk_size: int = 256
) -> SimilarityStats:
    """LLaVE's Table 1 columns: positive similarity, mean of top-k and of bottom-k negatives.

    For query i with candidate similarities s_i. and positive p_i:
        positive_i = s_{i,p_i}
        hard_i     = mean of the k largest s_ij over j != p_i   ("hard negatives", top-5)
        easy_i     = mean of the k smallest s_ij over j != p_i  ("easy negatives", bottom-5)

    Args:
        query_emb: (Q, D). cand_emb: candidate lists (Q, C, D) or a shared gallery (N, D).
        positive_index: (Q,) ints; None = candidate 0 (lists) or gallery row i (paired data).
        k: negatives per side (LLaVE: 5); needs at least k negatives per query.
        chunk_size: queries per block of similarities (bounds memory for large galleries).

    Returns a `SimilarityStats`; `.as_dict()` gives the means over queries.

    Reference: Lan et al., "LLaVE", 2025, Table 1 (SUN397 InfoNCE .71/.65/.36 -> LLaVE .66/.51/.03).
    """
    chunks = [stats_of_similarities(sims, positives, k)
              for _, sims, positives in similarity_chunks(query_emb, cand_emb, positive_index,
                                                          chunk_size)]
    return concatenate_stats(chunks)


def stats_of_similarities(sims: np.ndarray, positives: np.ndarray, k: int = 5) -> SimilarityStats:
    """`similarity_stats` of similarities already computed: sims (n, C), positives (n,) columns."""
    if not (isinstance(k, int) and k > 0):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    n, columns = sims.shape
    if columns - 1 < k:
        raise ValueError(f"k={k} needs at least {k} negatives per query, have {columns - 1}")
    is_negative = np.ones_like(sims, dtype=bool)
    is_negative[np.arange(n), positives] = False
    negatives = sims[is_negative].reshape(n, columns - 1)  # (n, C - 1), one False per row
    top = np.partition(negatives, columns - 1 - k, axis=1)[:, -k:]
    hard = np.sort(top, axis=1)[:, ::-1]
    easy = np.sort(np.partition(negatives, k - 1, axis=1)[:, :k], axis=1)
    return SimilarityStats(sims[np.arange(n), positives], hard, easy)


def concatenate_stats(chunks: list[SimilarityStats]) -> SimilarityStats:
    """The statistics of consecutive chunks of queries as one `SimilarityStats`."""
    return SimilarityStats(*(np.concatenate([getattr(chunk, role) for chunk in chunks])
                             for role in ("positive", "hard", "easy")))


# --------------------------------------------------------------------------------------------------
# Overlap of the positive and negative similarity distributions


@dataclass(frozen=True)
class OverlapMetrics:
    overlap: float  # integral of min(f_pos, f_neg): 1 identical, 0 disjoint
    bhattacharyya: float  # integral of sqrt(f_pos f_neg): 1 identical, 0 disjoint
    auroc: float  # P(s_pos > s_neg) + P(s_pos = s_neg) / 2
    margin: float  # mean(s_pos) - mean(s_neg)

    def as_dict(self) -> dict[str, float]:
        return {"overlap": self.overlap, "bhattacharyya": self.bhattacharyya,
                "auroc": self.auroc, "margin": self.margin}


def _binned_kde(values: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian KDE on a uniform grid: linear binning, then convolution with the sampled kernel.

    O(n + G log G) instead of O(n G); exact up to binning error, which is negligible with the
    grid step at a tenth of the bandwidth (Wand 1994, "Fast computation of multivariate KDEs").
    """
    step = grid[1] - grid[0]
    position = (values - grid[0]) / step
    left = np.floor(position).astype(np.int64)
    right_weight = position - left
    counts = np.bincount(left, 1 - right_weight, minlength=len(grid) + 1)
    counts += np.bincount(left + 1, right_weight, minlength=len(grid) + 1)
    offsets = np.arange(-int(5 * bandwidth / step) - 1, int(5 * bandwidth / step) + 2) * step
    kernel = np.exp(-0.5 * (offsets / bandwidth) ** 2)
    kernel /= kernel.sum() * step  # each value's mass on the grid is exactly 1
    return fftconvolve(counts[: len(grid)], kernel, mode="same").clip(min=0) / len(values)


def _kde_densities(pos, neg, max_grid_size):
    """Both Gaussian-KDE densities (Scott's bandwidth) on one grid spanning both samples."""
    bandwidths = []
    for name, values in (("pos_sims", pos), ("neg_sims", neg)):
        if np.ptp(values) == 0:
            raise ValueError(f"{name} has zero spread, so its KDE is undefined; use "
                             f"method='histogram'")
        bandwidths.append(values.std(ddof=1) * len(values) ** -0.2)  # Scott's rule, 1-D
    # Pad by 5 bandwidths so (almost) all of each density's mass lies on the grid.
    low = min(pos.min(), neg.min()) - 5 * max(bandwidths)
    high = max(pos.max(), neg.max()) + 5 * max(bandwidths)
    size = int(min(max_grid_size, np.ceil((high - low) / (min(bandwidths) / 10)) + 1))
    grid = np.linspace(low, high, size)
    densities = [_binned_kde(x, grid, h) for x, h in zip((pos, neg), bandwidths)]
    return densities[0], densities[1], grid[1] - grid[0]


def _histogram_densities(pos, neg, bins):
    """Both histogram densities on common bins spanning both samples."""
    edges = np.histogram_bin_edges(np.concatenate([pos, neg]), bins=bins)
    f_pos = np.histogram(pos, edges, density=True)[0]
    f_neg = np.histogram(neg, edges, density=True)[0]
    return f_pos, f_neg, edges[1] - edges[0]


def overlap_metrics(
    pos_sims, neg_sims, method: str = "kde", bins: int = 50, max_grid_size: int = 2**17
) -> OverlapMetrics:
    """How much the positive and negative similarity distributions overlap.

        overlap       OVL = integral of min(f_pos(s), f_neg(s)) ds          (Inman & Bradley 1989)
        bhattacharyya BC  = integral of sqrt(f_pos(s) f_neg(s)) ds          (Bhattacharyya 1943)
        auroc         P(S_pos > S_neg) + P(S_pos = S_neg) / 2 over all pairs (Mann-Whitney U)
        margin        mean(S_pos) - mean(S_neg)   (with top-k negatives: Table 1's pos - hard gap)

    OVL and BC need densities: method="kde" uses Gaussian KDEs (Scott's bandwidth
    h = std * n^(-1/5)) on one common grid, padded by 5 bandwidths, with a step of a tenth of the
    smaller bandwidth (at most `max_grid_size` points), integrated by the Riemann sum; binned, so
    millions of values are cheap. method="histogram" uses `bins` common equal-width bins over both
    samples (coarser, but defined for constant samples). AUROC and margin use the raw values.
    Values are pooled over queries: a distribution-level view, like LLaVE's overlap figures (the
    per-query view is P@1).

    Args: pos_sims, neg_sims: similarities of any shape (flattened), at least 2 values each.
    Returns an `OverlapMetrics`.
    """
    pos = as_float_array(pos_sims, "pos_sims").ravel()
    neg = as_float_array(neg_sims, "neg_sims").ravel()
    if pos.size < 2 or neg.size < 2:
        raise ValueError(f"need at least 2 values on each side, got {pos.size} and {neg.size}")
    if method == "kde":
        f_pos, f_neg, step = _kde_densities(pos, neg, max_grid_size)
    elif method == "histogram":
        f_pos, f_neg, step = _histogram_densities(pos, neg, bins)
    else:
        raise ValueError(f"method must be 'kde' or 'histogram', got {method!r}")
    return OverlapMetrics(
        overlap=float(np.minimum(f_pos, f_neg).sum() * step),
        bhattacharyya=float(np.sqrt(f_pos * f_neg).sum() * step),
        auroc=auroc(pos, neg),
        margin=float(pos.mean() - neg.mean()),
    )


# --------------------------------------------------------------------------------------------------
# Gradient view: how each loss splits a row's gradient among its negatives


def negative_gradients(
    similarities, positive_index=None, alpha: float = 9.0, temperature: float = 0.02
) -> np.ndarray:
    """d loss_i / d s_ij for every negative j of each row, under hardness-weighted InfoNCE.

        z_ij = s_ij / tau + alpha * sg(s_ij)   (negatives),   z_ii = s_ii / tau   (positive)
        p_ij = softmax_j(z_ij),   d loss_i / d s_ij = p_ij / tau   (j a negative)

    sg is stop-gradient, so the weight exp(alpha * s_ij) scales the gradient without adding its
    own; alpha = 0 is plain InfoNCE. The gradient grows like exp((1/tau + alpha) s_ij): on the
    negatives, weighting acts like a temperature tau / (1 + alpha tau) (0.02 -> 0.017 at alpha=9)
    while the positive keeps tau.

    Args:
        similarities: one row (K,) or a batch (B, K) of s_ij, e.g. query @ target.T.
        positive_index: int or (B,) ints; None = column i for row i (column 0 for a single row).
        alpha, temperature: as `losses.hardness_weighted_info_nce`.

    Returns an array shaped like `similarities`, 0 at the positives. These are gradients of the
    per-row loss; the batch-mean loss divides them by B.
    """
    if not (temperature > 0 and alpha >= 0):
        raise ValueError(f"need temperature > 0 and alpha >= 0, got {temperature}, {alpha}")
    sims = as_float_array(similarities, "similarities")
    if sims.ndim not in (1, 2) or sims.shape[-1] < 2:
        raise ValueError(f"similarities must be (K >= 2,) or (B, K >= 2), got {sims.shape}")
    rows = np.atleast_2d(sims)  # (B, K)
    positives = resolve_positives(positive_index, len(rows), rows.shape[1], default_diagonal=True)
    is_negative = np.ones_like(rows, dtype=bool)
    is_negative[np.arange(len(rows)), positives] = False
    probabilities = softmax(rows / temperature + alpha * rows * is_negative, axis=1)
    gradients = np.where(is_negative, probabilities / temperature, 0.0)
    return gradients.reshape(sims.shape)


def gradient_share(
    similarities, positive_index=None, alpha: float = 9.0, temperature: float = 0.02
) -> np.ndarray:
    """Each negative's share of its row's negative gradient: p_ij / sum_{k negative} p_ik.

    Shares sum to 1 over each row's negatives (0 at the positive) and do not depend on the scale
    1/tau, only on how the loss spreads the push: InfoNCE (alpha=0) ~ exp(s/tau), hardness
    weighting ~ exp((1/tau + alpha) s), which concentrates it on the hardest negatives.
    Arguments as `negative_gradients`.
    """
    gradients = negative_gradients(similarities, positive_index, alpha, temperature)
    return gradients / gradients.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# Alignment and uniformity (Wang & Isola, 2020)


def alignment(x_emb, y_emb, power: float = 2.0) -> float:
    """Mean distance between positive pairs on the unit sphere (lower is better aligned).

        L_align = mean_i || x_i - y_i ||^power     (rows L2-normalised first; Wang & Isola use 2)

    Reference: Wang & Isola, "Understanding Contrastive Representation Learning through
    Alignment and Uniformity on the Hypersphere", ICML 2020.
    """
    x = l2_normalize(as_float_array(x_emb, "x_emb"), "x_emb")
    y = l2_normalize(as_float_array(y_emb, "y_emb"), "y_emb")
    if x.ndim != 2 or x.shape != y.shape or len(x) == 0:
        raise ValueError(f"x_emb and y_emb must be paired (N > 0, D) arrays, got {x.shape} "
                         f"and {y.shape}")
    return float(np.mean(np.linalg.norm(x - y, axis=1) ** power))


def uniformity(emb, t: float = 2.0, chunk_size: int = 1024) -> float:
    """How evenly embeddings spread over the sphere (lower is more uniform).

        L_uniform = log mean_{i < j} exp(-t || x_i - x_j ||^2)     (rows L2-normalised; t = 2)

    Computed in chunks of rows with log-sum-exp, so N x N distances never coexist in memory.
    Reference: Wang & Isola, ICML 2020 (as `alignment`).
    """
    x = l2_normalize(as_float_array(emb, "emb"), "emb")
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"emb must have shape (N >= 2, D), got {x.shape}")
    n = len(x)
    chunk_terms = []
    for start in range(0, n, chunk_size):
        block = x[start:start + chunk_size]
        squared = np.clip(2.0 - 2.0 * block @ x.T, 0.0, None)  # (n_block, N), unit vectors
        later = np.arange(n)[None, :] > np.arange(start, start + len(block))[:, None]  # j > i
        chunk_terms.append(logsumexp(-t * squared[later]) if later.any() else -np.inf)
    return float(logsumexp(chunk_terms) - np.log(n * (n - 1) / 2))
