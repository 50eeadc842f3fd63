"""Tiled hardness-weighted InfoNCE equals the dense form: values, gradients, across ranks.

References: the dense path in `llave_kit.losses` (float64, tight tolerance), finite differences of
a loss with the hardness weights frozen (the stop-gradient made explicit), and a single process
holding the global batch for the gloo runs.

Run: .venv/bin/python -m pytest tests/test_tiled.py -q
"""
import random

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import run_distributed

from llave_kit.losses import (
    HardnessWeightedInfoNCELoss,
    InfoNCELoss,
    compute_dtype,
    hardness_weighted_info_nce,
    info_nce,
    make_loss,
)

TIGHT = dict(rtol=1e-9, atol=1e-10)


def make_batch(b, extra, dim, seed, dtype=torch.float64):
    """Unit-norm query (b, dim) and target (b + extra, dim): noisy positives, then extra negatives.

    The first extra negative duplicates query 0's positive, so a false-negative margin drops it.
    """
    generator = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(b, dim, generator=generator, dtype=torch.float64), dim=-1)
    noise = torch.randn(b + extra, dim, generator=generator, dtype=torch.float64)
    target = F.normalize(noise, dim=-1)
    target[:b] = F.normalize(query + 0.6 * noise[:b], dim=-1)
    if extra:
        target[b] = target[0]
    return query.to(dtype), target.to(dtype)


def value_and_grads(loss_fn, query, target, **kwargs):
    query, target = query.clone().requires_grad_(), target.clone().requires_grad_()
    value = loss_fn(query, target, **kwargs)
    value.backward()
    return value.detach(), query.grad, target.grad


def assert_tiled_equals_dense(query, target, chunk_size, **kwargs):
    dense = value_and_grads(hardness_weighted_info_nce, query, target, **kwargs)
    tiled = value_and_grads(hardness_weighted_info_nce, query, target, chunk_size=chunk_size,
                            **kwargs)
    for got, expected in zip(tiled, dense):
        torch.testing.assert_close(got, expected, **TIGHT)


@pytest.mark.parametrize(
    "b, extra, chunk, alpha, symmetric, margin",
    [
        (8, 0, 3, 9.0, True, None),  # chunk does not divide B
        (8, 5, 5, 9.0, True, None),  # ... nor M, with extra negatives
        (8, 5, 1, 2.0, False, None),  # chunk 1
        (8, 5, 64, 0.0, True, None),  # chunk > M, plain InfoNCE
        (8, 0, 8, 9.0, False, None),  # one block
        (1, 3, 2, 9.0, True, None),  # a single query
        (5, 4, 2, 9.0, True, 0.05),  # false-negative margin, both directions
        (9, 3, 4, 9.0, False, 0.05),
        (6, 2, 4, 1.0, True, -0.2),  # a negative margin keeps more than the positive's score
    ],
)
def test_tiled_equals_dense_values_and_gradients(b, extra, chunk, alpha, symmetric, margin):
    query, target = make_batch(b, extra, dim=6, seed=b * 31 + extra)
    assert_tiled_equals_dense(query, target, chunk, alpha=alpha, temperature=0.02,
                              symmetric=symmetric, false_negative_margin=margin)


def test_tiled_equals_dense_on_random_shapes():
    rng = random.Random(0)
    for seed in range(20):
        b, extra, dim = rng.randint(1, 12), rng.randint(0, 6), rng.randint(2, 9)
        query, target = make_batch(b, extra, dim, seed)
        assert_tiled_equals_dense(
            query, target, chunk_size=rng.randint(1, 15),
            alpha=rng.choice([0.0, 0.5, 9.0]), temperature=rng.choice([0.02, 0.1]),
            symmetric=rng.random() < 0.5, false_negative_margin=rng.choice([None, None, 0.1]),
        )


def test_info_nce_and_modules_route_to_the_tiled_path():
    query, target = make_batch(7, 3, dim=5, seed=1)
    dense = info_nce(query, target, temperature=0.05)
    torch.testing.assert_close(info_nce(query, target, temperature=0.05, chunk_size=3), dense,
                               **TIGHT)
    torch.testing.assert_close(InfoNCELoss(temperature=0.05, chunk_size=2)(query, target), dense,
                               **TIGHT)
    weighted = hardness_weighted_info_nce(query, target, alpha=9.0)
    for module in (HardnessWeightedInfoNCELoss(alpha=9.0, chunk_size=4),
                   make_loss("llave", alpha=9.0, chunk_size=4)):
        torch.testing.assert_close(module(query, target), weighted, **TIGHT)


def test_backward_keeps_nothing_of_size_b_by_m():
    """Only embeddings and per-row vectors are saved for backward; blocks are recomputed."""
    query, target = make_batch(64, 32, dim=4, seed=2, dtype=torch.float32)
    saved = {}

    def pack(tensor):
        saved[id(tensor)] = tensor.numel()
        return tensor

    for chunk_size, name in ((None, "dense"), (16, "tiled")):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            value_and_grads(hardness_weighted_info_nce, query, target, chunk_size=chunk_size)
        largest = max(saved.values())
        if name == "dense":
            assert largest >= 64 * 96  # the reference does keep the similarity matrix
        else:
            assert largest <= 96 * 4, f"tiled path saved a tensor of {largest} elements"


def test_gradcheck_tiny_float64():
    query, target = make_batch(3, 2, dim=4, seed=3)
    query.requires_grad_(), target.requires_grad_()

    def loss(q, t):
        return info_nce(q, t, temperature=0.1, chunk_size=2, false_negative_margin=0.05)

    assert torch.autograd.gradcheck(loss, (query, target))


def frozen_weight_loss(query, target, boost, tau, symmetric):
    """Hardness-weighted loss with alpha * s written as a constant `boost` (0 on positives)."""
    b = query.shape[0]
    logits = query @ target.T / tau + boost  # (B, M)
    labels = torch.arange(b)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits[:, :b].T, labels)) / 2
    return loss


@pytest.mark.parametrize("symmetric", [True, False])
def test_gradient_equals_finite_differences_with_weights_frozen(symmetric):
    alpha, tau = 9.0, 0.1
    query, target = make_batch(3, 2, dim=4, seed=4)
    boost = alpha * (query @ target.T)
    boost[torch.arange(3), torch.arange(3)] = 0.0
    _, grad_query, grad_target = value_and_grads(
        hardness_weighted_info_nce, query, target, alpha=alpha, temperature=tau,
        symmetric=symmetric, chunk_size=2,
    )
    eps = 1e-6
    for tensor, grad in ((query, grad_query), (target, grad_target)):
        numeric = torch.zeros_like(tensor)
        for index in range(tensor.numel()):
            flat = tensor.view(-1)
            flat[index] += eps
            up = frozen_weight_loss(query, target, boost, tau, symmetric)
            flat[index] -= 2 * eps
            down = frozen_weight_loss(query, target, boost, tau, symmetric)
            flat[index] += eps
            numeric.view(-1)[index] = (up - down) / (2 * eps)
        torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype, ulp", [(torch.float32, 2**-17), (torch.bfloat16, 2**-7),
                                        (torch.float16, 2**-10)])
def test_half_precision_computes_in_float32_and_returns_input_dtype_gradients(dtype, ulp):
    query, target = make_batch(6, 3, dim=8, seed=5, dtype=dtype)
    value, grad_query, grad_target = value_and_grads(
        hardness_weighted_info_nce, query, target, chunk_size=4)
    assert value.dtype == torch.float32
    assert grad_query.dtype == grad_target.dtype == dtype
    # Reference: the dense loss in float64 on exactly the same (rounded) inputs.
    ref_value, ref_query, ref_target = value_and_grads(
        hardness_weighted_info_nce, query.double(), target.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    for got, expected in ((grad_query, ref_query), (grad_target, ref_target)):
        scale = expected.abs().max()
        torch.testing.assert_close(got.double(), expected, rtol=2 * ulp, atol=2 * ulp * scale)


@pytest.mark.parametrize("query_dtype, target_dtype", [
    (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float16), (torch.float32, torch.float64),
])
@pytest.mark.parametrize("loss_fn", [info_nce, hardness_weighted_info_nce])
def test_mixed_dtypes_follow_the_dense_paths_rule(loss_fn, query_dtype, target_dtype):
    """Both inputs cast to their common dtype, at least float32 (`compute_dtype`), on both paths;
    each gradient in its input's dtype. float64 targets must not be rounded to float32."""
    query, target = make_batch(7, 3, dim=6, seed=8)
    query, target = query.to(query_dtype), target.to(target_dtype)
    common = compute_dtype(query, target)
    reference = value_and_grads(loss_fn, query.to(common), target.to(common), temperature=0.05)
    dense = value_and_grads(loss_fn, query, target, temperature=0.05)
    tiled = value_and_grads(loss_fn, query, target, temperature=0.05, chunk_size=3)
    for got in (dense, tiled):
        value, grad_query, grad_target = got
        assert value.dtype == common
        assert (grad_query.dtype, grad_target.dtype) == (query_dtype, target_dtype)
        torch.testing.assert_close(value, reference[0])
        torch.testing.assert_close(grad_query, reference[1].to(query_dtype))
        torch.testing.assert_close(grad_target, reference[2].to(target_dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_on_cuda_equals_dense_float64_reference(dtype):
    query, target = make_batch(300, 50, dim=32, seed=7, dtype=dtype)
    ref_value, ref_query, ref_target = value_and_grads(
        hardness_weighted_info_nce, query.double(), target.double())
    value, grad_query, grad_target = value_and_grads(
        hardness_weighted_info_nce, query.cuda(), target.cuda(), chunk_size=128)
    # float32 compute; bfloat16 gradients are rounded to 8 bits on return.
    tolerance = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(value.double().cpu(), ref_value, **tolerance)
    torch.testing.assert_close(grad_query.double().cpu(), ref_query, **tolerance)
    torch.testing.assert_close(grad_target.double().cpu(), ref_target, **tolerance)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "64"])
def test_bad_chunk_size_raises_value_error(chunk_size):
    query, target = make_batch(4, 0, dim=3, seed=6)
    with pytest.raises(ValueError, match="chunk_size"):
        hardness_weighted_info_nce(query, target, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size"):
        InfoNCELoss(chunk_size=chunk_size)


@pytest.mark.parametrize(
    "query, target",
    [
        (torch.randn(4, 3), torch.randn(3, 3)),  # fewer targets than queries
        (torch.randn(4, 3), torch.randn(4, 5)),  # dims differ
        (torch.full((2, 3), float("nan")), torch.randn(2, 3)),
        (torch.randn(0, 3), torch.randn(2, 3)),
    ],
)
def test_tiled_path_rejects_bad_input_like_the_dense_path(query, target):
    with pytest.raises(ValueError) as dense_error:
        hardness_weighted_info_nce(query, target)
    with pytest.raises(ValueError) as tiled_error:
        hardness_weighted_info_nce(query, target, chunk_size=2)
    assert str(tiled_error.value) == str(dense_error.value)


# --------------------------------------------------------------------------------------------------
# Across ranks: real gloo groups against one process holding the global batch

LOCAL_BATCHES = [3, 1, 4]  # uneven on purpose
LOCAL_EXTRAS = [2, 0, 3]
DIST_CASES = [
    dict(alpha=9.0, temperature=0.02, chunk_size=2),
    dict(alpha=0.0, temperature=0.05, symmetric=False, chunk_size=3),
    dict(alpha=9.0, temperature=0.05, false_negative_margin=0.05, chunk_size=1),
]


def rank_batches(world_size):
    """Every rank's (query, positives, extra negatives), identical in every process."""
    batches = []
    for rank, (b, extra) in enumerate(zip(LOCAL_BATCHES[:world_size], LOCAL_EXTRAS)):
        query, target = make_batch(b, extra, dim=5, seed=100 * world_size + rank)
        batches.append((query, target[:b], target[b:]))
    return batches


def tiled_on_rank(rank, world_size):
    query, positives, negatives = rank_batches(world_size)[rank]
    results = []
    for kwargs in DIST_CASES:
        value, grad_query, grad_target = value_and_grads(
            hardness_weighted_info_nce, query, torch.cat([positives, negatives]),
            gather_across_devices=True, **kwargs)
        results.append((value.item(), grad_query, grad_target))
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_gathered_tiled_loss_equals_single_process_global_batch(world_size):
    per_rank = run_distributed(world_size, tiled_on_rank)
    batches = rank_batches(world_size)
    query = torch.cat([q for q, _, _ in batches])  # (B_global, D)
    target = torch.cat([p for _, p, _ in batches] + [n for _, _, n in batches])
    global_batch = query.shape[0]
    for case, kwargs in enumerate(DIST_CASES):
        kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
        value, grad_query, grad_target = value_and_grads(
            hardness_weighted_info_nce, query, target, **kwargs)
        mean_over_ranks = sum(results[case][0] for results in per_rank) / world_size
        assert mean_over_ranks == pytest.approx(value.item(), rel=1e-9)
        row, extra_row = 0, global_batch
        for (q, _, n), results in zip(batches, per_rank):
            _, rank_grad_query, rank_grad_target = results[case]
            b, extra = q.shape[0], n.shape[0]
            expected_target = torch.cat([grad_target[row : row + b],
                                         grad_target[extra_row : extra_row + extra]])
            torch.testing.assert_close(rank_grad_query / world_size, grad_query[row : row + b],
                                       rtol=1e-7, atol=1e-9)
            torch.testing.assert_close(rank_grad_target / world_size, expected_target,
                                       rtol=1e-7, atol=1e-9)
            row, extra_row = row + b, extra_row + extra
