"""Cross-device gather on real gloo process groups versus one process holding the global batch.

Contract: the mean over ranks of the returned loss equals the single-process loss on the
concatenated global batch, and each rank's gradient for its own rows, divided by the world size
(DDP's averaging), equals the single-process gradient for those rows.
"""
import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import run_distributed

from llave_kit.distributed import all_gather_with_grad, local_row_offset
from llave_kit.losses import make_loss

LOCAL_BATCHES = [3, 1, 4, 2]  # uneven on purpose
LOCAL_EXTRA_NEGATIVES = [2, 0, 1, 3]
DIM = 6
LOSS_CASES = [
    ("info_nce", dict(temperature=0.05)),
    ("hardness_weighted", dict(alpha=9.0, temperature=0.02)),
    ("hardness_weighted", dict(alpha=3.0, temperature=0.05, symmetric=False)),
    ("hardness_weighted", dict(alpha=9.0, temperature=0.05, false_negative_margin=0.05)),
    ("focal_info_nce", dict(margin=0.3, temperature=0.05)),
    ("dcl", dict(temperature=0.05)),
    ("hcl", dict(beta=3.0, tau_plus=0.1, temperature=0.05)),
]


def rank_data(world_size):
    """Every rank's (query, positives, extra negatives), identical in every process."""
    generator = torch.Generator().manual_seed(world_size)
    data = []
    for b, extra in zip(LOCAL_BATCHES[:world_size], LOCAL_EXTRA_NEGATIVES[:world_size]):
        query = F.normalize(torch.randn(b, DIM, generator=generator, dtype=torch.float64), dim=-1)
        noise = torch.randn(b, DIM, generator=generator, dtype=torch.float64)
        positives = F.normalize(query + 0.7 * noise, dim=-1)
        negatives = F.normalize(torch.randn(extra, DIM, generator=generator, dtype=torch.float64), dim=-1)
        data.append((query, positives, negatives))
    return data


def loss_and_grads(loss, query, positives, negatives):
    query, positives, negatives = (x.clone().requires_grad_() for x in (query, positives, negatives))
    value = loss(query, torch.cat([positives, negatives]))
    value.backward()
    return value.item(), query.grad, positives.grad, negatives.grad


def gathered_losses_on_rank(rank, world_size):
    query, positives, negatives = rank_data(world_size)[rank]
    results = []
    for name, kwargs in LOSS_CASES:
        loss = make_loss(name, gather_across_devices=True, **kwargs)
        results.append(loss_and_grads(loss, query, positives, negatives))
    return results


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_gathered_loss_and_gradients_equal_single_process_global_batch(world_size):
    per_rank = run_distributed(world_size, gathered_losses_on_rank)
    data = rank_data(world_size)
    global_query = torch.cat([q for q, _, _ in data])
    global_positives = torch.cat([p for _, p, _ in data])
    global_negatives = torch.cat([n for _, _, n in data])
    for case, (name, kwargs) in enumerate(LOSS_CASES):
        value, dq, dp, dn = loss_and_grads(
            make_loss(name, **kwargs), global_query, global_positives, global_negatives
        )
        mean_of_ranks = sum(results[case][0] for results in per_rank) / world_size
        assert mean_of_ranks == pytest.approx(value, rel=1e-10), (name, kwargs)
        row = neg_row = 0
        for rank, results in enumerate(per_rank):
            _, rank_dq, rank_dp, rank_dn = results[case]
            b, extra = rank_dq.shape[0], rank_dn.shape[0]
            assert torch.allclose(rank_dq / world_size, dq[row : row + b], atol=1e-10), (name, rank)
            assert torch.allclose(rank_dp / world_size, dp[row : row + b], atol=1e-10), (name, rank)
            assert torch.allclose(rank_dn / world_size, dn[neg_row : neg_row + extra], atol=1e-10)
            row, neg_row = row + b, neg_row + extra


def gather_on_rank(rank, world_size):
    rows = LOCAL_BATCHES[rank]
    local = torch.full((rows, 2), float(rank), requires_grad=True)
    gathered = all_gather_with_grad(local)
    # Each rank weighs the gathered rows differently: the owner must receive the sum over ranks.
    weights = torch.arange(gathered.shape[0], dtype=torch.float32)[:, None] * (rank + 1)
    (gathered * weights).sum().backward()
    return gathered.detach(), local.grad, local_row_offset(rows, local.device)


def test_all_gather_with_grad_concatenates_uneven_rows_and_sums_gradients_over_ranks():
    world_size = 3
    results = run_distributed(world_size, gather_on_rank)
    expected_rows = torch.cat(
        [torch.full((b, 2), float(r)) for r, b in enumerate(LOCAL_BATCHES[:world_size])]
    )
    rank_weight_sum = sum(r + 1 for r in range(world_size))
    offset = 0
    for rank, (gathered, grad, reported_offset) in enumerate(results):
        b = LOCAL_BATCHES[rank]
        assert torch.equal(gathered, expected_rows)
        assert reported_offset == offset
        expected_grad = torch.arange(offset, offset + b, dtype=torch.float32)[:, None] * rank_weight_sum
        assert torch.equal(grad, expected_grad.expand(b, 2))
        offset += b


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
    assert local_row_offset(3, x.device) == 0
    query, positives, negatives = rank_data(1)[0]
    target = torch.cat([positives, negatives])
    gathered = make_loss("hardness_weighted", gather_across_devices=True)(query, target)
    assert torch.equal(gathered, make_loss("hardness_weighted")(query, target))
