"""Exact, memory-efficient (tiled) hardness-weighted InfoNCE.

The dense losses in `losses.py` materialise the (B, M) similarity matrix and several same-sized
intermediates (logits, masks, softmax), so memory grows as B^2: about 1.8 GiB at B = 8192 in
float32.
Here the matrix is only ever seen one (chunk, chunk) block at a time, in a forward pass that keeps
row and column log-sum-exps and a backward pass that recomputes each block, so the extra memory is
O(chunk^2 + B * D) while the value and gradients equal the dense ones to float tolerance.

Use it through the public API: `hardness_weighted_info_nce(q, t, chunk_size=512)`,
`info_nce(q, t, chunk_size=512)`, or the modules' `chunk_size` argument; `losses.py` validates the
inputs and performs the cross-device gather, then calls `tiled_direction_sums`.
`benchmarks/bench_tiled_loss.py` compares memory and speed with the dense form.
"""
from __future__ import annotations

import torch

# On a 2-core CPU (benchmarks/RESULTS.md), 512 x 512 blocks (1 MiB in float32) were as fast as 1024
# or 2048 at B = 8192 and 16384 with a half to a third of the peak memory; 4096 was slower. A GPU
# wants larger blocks (fewer kernel launches): sweep benchmarks/bench_tiled_loss.py --chunk-size.
DEFAULT_CHUNK_SIZE = 512


def _blocks(rows: int, columns: int, offset: int, chunk: int):
    """Yield (row slice, column slice, square slice or None) covering a (rows, columns) matrix.

    Row i's positive is column offset + i, so columns offset .. offset + rows form the square part
    where the column direction lives; column blocks never straddle its edges, and the square slice
    gives a block's columns in square coordinates (the index of each column's positive row).
    """
    edges = (0, offset, offset + rows, columns)
    for r0 in range(0, rows, chunk):
        row_slice = slice(r0, min(r0 + chunk, rows))
        for part, (lo, hi) in enumerate(zip(edges, edges[1:])):
            for c0 in range(lo, hi, chunk):
                c1 = min(c0 + chunk, hi)
                square = slice(c0 - offset, c1 - offset) if part == 1 else None
                yield row_slice, slice(c0, c1), square


def _block_logits(sim, diagonal, row_positives, column_positives, temperature, alpha, margin):
    """Hardness-weighted logits of one block for the row and the column direction.

    sim (r, c); `diagonal` is the block diagonal holding positives (a torch.diagonal offset);
    row_positives (r, 1) and column_positives (1, c) or None are the positives' similarities.
    Returns (row_logits, column_logits or None), probable false negatives set to -inf.
    """
    # Negatives get s / tau + alpha * sg(s): the stop-gradient is implemented by the backward pass,
    # which differentiates every logit as s / tau (LLaVE, Eq. 4). The positive keeps s / tau.
    logits = sim * (1.0 / temperature + alpha)  # (r, c)
    torch.diagonal(logits, diagonal).copy_(torch.diagonal(sim, diagonal) / temperature)
    if margin is None:
        return logits, (logits if column_positives is not None else None)

    def drop_false_negatives(positives):
        kept = logits.masked_fill(sim > positives - margin, -torch.inf)
        torch.diagonal(kept, diagonal).copy_(torch.diagonal(logits, diagonal))  # never the positive
        return kept

    column_logits = None if column_positives is None else drop_false_negatives(column_positives)
    return drop_false_negatives(row_positives), column_logits


def _logit_blocks(x, y, positive_sims, offset, with_columns, alpha, temperature, margin, chunk):
    """Yield (row slice, column slice, square slice, row logits, column logits or None) by block."""
    for r, c, square in _blocks(x.shape[0], y.shape[0], offset, chunk):
        sim = x[r] @ y[c].T  # (r, c)
        in_square = with_columns and square is not None
        column_positives = positive_sims[None, square] if in_square else None
        yield r, c, square, *_block_logits(sim, offset + r.start - c.start, positive_sims[r, None],
                                           column_positives, temperature, alpha, margin)


class _TiledHardnessWeightedNCE(torch.autograd.Function):
    """Row-direction and column-direction loss sums of the hardness-weighted InfoNCE, tiled.

    rows (R, D), columns (K, D); row i's positive is column offset + i. Returns (row_sum, col_sum):

        row_sum = sum_i  LSE_j logit_ij - s_i,offset+i / tau               j over all K columns
        col_sum = sum_k  LSE_i logit'_i,offset+k - s_k,offset+k / tau      i over the R rows
                  (only with `with_columns`; 0 otherwise)

    logit / logit' differ only in which probable false negatives the margin drops (relative to the
    row's or the column's positive). Algorithm:

    1. s_pos = (rows * columns[offset:offset + R]).sum(-1), the R positive similarities.
    2. Forward: for each (chunk, chunk) block of S = rows @ columns.T, form the logits and merge
       the block's log-sum-exp into the running row LSE (and, inside the square, column LSE) with
       logaddexp. Only the LSE vectors and s_pos are kept for backward.
    3. Backward: for row i, p_ij = exp(logit_ij - LSE_i) and d row_sum / d s_ij = (p_ij - [j is
       i's positive]) / tau; the alpha * sg(s) term changes p but adds no gradient of its own.
       Likewise for columns. Each block is recomputed, dS = (g_row p + g_col p') / tau, and
       accumulated as d rows += dS @ columns, d columns += dS.T @ rows.
    4. The -[positive] / tau part is a diagonal term, added once outside the blocks.

    Everything runs in `dtype` (the losses' `compute_dtype`); the inputs are saved as they came,
    so half-precision embeddings cost half the memory, and each gradient is returned in its input's
    dtype.
    """

    @staticmethod
    def forward(ctx, rows, columns, offset, with_columns, alpha, temperature, margin, chunk, dtype):
        x, y = rows.to(dtype), columns.to(dtype)  # (R, D), (K, D)
        num_rows = x.shape[0]
        positive_sims = (x * y[offset : offset + num_rows]).sum(-1)  # (R,)
        row_lse = x.new_full((num_rows,), -torch.inf)  # (R,)
        col_lse = x.new_full((num_rows,), -torch.inf)  # (R,) one per square column
        hyper = (offset, with_columns, alpha, temperature, margin, chunk)
        for r, _, square, row_logits, col_logits in _logit_blocks(x, y, positive_sims, *hyper):
            row_lse[r] = torch.logaddexp(row_lse[r], row_logits.logsumexp(1))
            if col_logits is not None:
                col_lse[square] = torch.logaddexp(col_lse[square], col_logits.logsumexp(0))
        ctx.save_for_backward(rows, columns, positive_sims, row_lse, col_lse)
        ctx.hyper = hyper
        positive_logits = positive_sims / temperature
        row_sum = (row_lse - positive_logits).sum()
        col_sum = (col_lse - positive_logits).sum() if with_columns else row_sum.new_zeros(())
        return row_sum, col_sum

    @staticmethod
    @torch.autograd.function.once_differentiable  # the LSEs are saved as constants
    def backward(ctx, grad_row_sum, grad_col_sum):
        rows, columns, positive_sims, row_lse, col_lse = ctx.saved_tensors
        offset, with_columns, _, temperature, _, _ = ctx.hyper
        x, y = rows.to(positive_sims.dtype), columns.to(positive_sims.dtype)  # (R, D), (K, D)
        num_rows = x.shape[0]
        grad_x, grad_y = torch.zeros_like(x), torch.zeros_like(y)
        row_scale, col_scale = grad_row_sum / temperature, grad_col_sum / temperature
        for r, c, square, row_logits, col_logits in _logit_blocks(x, y, positive_sims, *ctx.hyper):
            # In-place exp_/mul_ on fresh temporaries: fewer passes over the block.
            grad_sim = (row_logits - row_lse[r, None]).exp_().mul_(row_scale)  # (r, c)
            if col_logits is not None:
                grad_sim += (col_logits - col_lse[None, square]).exp_().mul_(col_scale)
            grad_x[r].addmm_(grad_sim, y[c])
            grad_y[c].addmm_(grad_sim.T, x[r])
        # The positives' -1/tau, once per direction that uses them.
        pull = row_scale + col_scale if with_columns else row_scale
        positives = slice(offset, offset + num_rows)
        grad_x -= pull * y[positives]
        grad_y[positives] -= pull * x
        return (grad_x.to(rows.dtype), grad_y.to(columns.dtype),
                None, None, None, None, None, None, None)


def tiled_direction_sums(
    query: torch.Tensor,
    target: torch.Tensor,
    all_queries: torch.Tensor,
    all_targets: torch.Tensor,
    offset: int,
    *,
    alpha: float,
    temperature: float,
    symmetric: bool,
    false_negative_margin: float | None,
    chunk_size: int,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Per-direction sums of the row losses, exactly as the dense path computes them, but tiled.

    query (B, D) and target (M, D) are this rank's; all_queries (B_global, D) and all_targets
    (M_global, D: every positive, then every extra) are gathered (the local tensors themselves in
    one process), and `offset` is this rank's first row in the global batch. Everything is
    computed in `dtype` (`losses.compute_dtype`: the inputs' common dtype, at least float32).
    """
    batch = query.shape[0]
    hyper = (alpha, temperature, false_negative_margin, chunk_size, dtype)
    if all_queries.shape[0] == batch:
        # One process: the target->query matrix is the transpose of the query->target matrix's
        # first B columns, so one sweep yields both directions.
        row_sum, col_sum = _TiledHardnessWeightedNCE.apply(
            query, all_targets, offset, symmetric, *hyper
        )
        return [row_sum, col_sum] if symmetric else [row_sum]
    # Across ranks: this rank's rows against the gathered columns, once per direction.
    sums = [_TiledHardnessWeightedNCE.apply(query, all_targets, offset, False, *hyper)[0]]
    if symmetric:
        positives = target[:batch]  # (B, D)
        sums.append(
            _TiledHardnessWeightedNCE.apply(positives, all_queries, offset, False, *hyper)[0]
        )
    return sums
