"""Losses against independent references: per-pair loops, autograd, closed-form gradient weights."""
import doctest
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from llave_kit import losses
from llave_kit.losses import (
    dcl_loss,
    focal_info_nce,
    hardness_weighted_info_nce,
    hardness_weighted_rows,
    hcl_loss,
    info_nce,
    make_loss,
)


def unit_rows(rows, dim, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=dtype), dim=-1)


def batch(b=5, extra=3, dim=8, seed=0, dtype=torch.float64):
    query = unit_rows(b, dim, seed, dtype)
    noisy_positives = F.normalize(query + 0.8 * unit_rows(b, dim, seed + 1, dtype), dim=-1)
    target = torch.cat([noisy_positives, unit_rows(extra, dim, seed + 2, dtype)])
    return query, target


# --------------------------------------------------------------------------------------------------
# Reference loops: one python loop per row, the formula written in "weights" form with math.exp.


def rows_and_columns(query, target, symmetric):
    """Yield (similarities to candidates, index of the positive) for every direction's rows."""
    s = (query @ target.T).tolist()
    b = query.shape[0]
    for i in range(b):
        yield s[i], i
    if symmetric:
        for j in range(b):
            yield [s[i][j] for i in range(b)], j


def reference(row_fn, query, target, symmetric=True):
    terms = [row_fn(sims, pos) for sims, pos in rows_and_columns(query, target, symmetric)]
    b = query.shape[0]
    return sum(terms[:b]) / b if not symmetric else (sum(terms[:b]) / b + sum(terms[b:]) / b) / 2


def weighted_nce_row(tau, alpha, kept=lambda sims, pos, j: True):
    def row(sims, pos):
        numerator = math.exp(sims[pos] / tau)
        denominator = numerator + sum(
            math.exp(alpha * s) * math.exp(s / tau)  # w_ij * exp(s_ij / tau)
            for j, s in enumerate(sims) if j != pos and kept(sims, pos, j)
        )
        return -math.log(numerator / denominator)
    return row


def focal_row(tau, m):
    def row(sims, pos):
        numerator = math.exp(sims[pos] ** 2 / tau)
        negatives = sum(math.exp(s * (s + m) / tau) for j, s in enumerate(sims) if j != pos)
        return -math.log(numerator / (numerator + negatives))
    return row


def dcl_row(tau):
    def row(sims, pos):
        negatives = sum(math.exp(s / tau) for j, s in enumerate(sims) if j != pos)
        return -math.log(math.exp(sims[pos] / tau) / negatives)
    return row


def hcl_row(tau, beta, tau_plus):
    def row(sims, pos):
        negatives = [s for j, s in enumerate(sims) if j != pos]
        n = len(negatives)
        importance = [math.exp(beta * s) for s in negatives]
        mean_importance = sum(importance) / n
        reweighted = sum(w * math.exp(s / tau) for w, s in zip(importance, negatives)) / mean_importance
        positive = math.exp(sims[pos] / tau)
        ng = max((-tau_plus * n * positive + reweighted) / (1 - tau_plus), n * math.exp(-1 / tau))
        return -math.log(positive / (positive + ng))
    return row


# --------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 9.0])
def test_hardness_weighted_matches_weight_form_loop(symmetric, extra, alpha):
    query, target = batch(extra=extra)
    got = hardness_weighted_info_nce(query, target, alpha=alpha, temperature=0.05, symmetric=symmetric)
    expected = reference(weighted_nce_row(0.05, alpha), query, target, symmetric)
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_matches_cross_entropy_of_logit_matrix(symmetric):
    query, target = batch(extra=2)
    logits = query @ target.T / 0.02
    labels = torch.arange(query.shape[0])
    expected = F.cross_entropy(logits, labels)
    if symmetric:
        expected = (expected + F.cross_entropy(logits[:, : query.shape[0]].T, labels)) / 2
    got = info_nce(query, target, temperature=0.02, symmetric=symmetric)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("extra", [0, 2])
def test_alpha_zero_is_exactly_info_nce(extra):
    query, target = batch(extra=extra, dtype=torch.float32)
    assert torch.equal(
        hardness_weighted_info_nce(query, target, alpha=0.0, temperature=0.02),
        info_nce(query, target, temperature=0.02),
    )


def test_focal_dcl_hcl_match_loops():
    query, target = batch(extra=2)
    cases = [
        (focal_info_nce(query, target, margin=0.3, temperature=0.1), focal_row(0.1, 0.3)),
        (dcl_loss(query, target, temperature=0.1), dcl_row(0.1)),
        (hcl_loss(query, target, beta=2.0, tau_plus=0.1, temperature=0.1), hcl_row(0.1, 2.0, 0.1)),
    ]
    for got, row in cases:
        assert got.item() == pytest.approx(reference(row, query, target), rel=1e-10)


def test_hcl_stable_at_small_temperature_and_uniform_beta_without_debiasing_is_info_nce():
    query, target = batch(extra=2)
    loss = hcl_loss(query, target, beta=9.0, tau_plus=0.1, temperature=0.01)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference(hcl_row(0.01, 9.0, 0.1), query, target), rel=1e-9)
    # beta=0, tau+=0: weights are all 1 and no debiasing, so HCL is InfoNCE (floor inactive here).
    plain = hcl_loss(query, target, beta=0.0, tau_plus=0.0, temperature=0.1)
    assert plain.item() == pytest.approx(info_nce(query, target, temperature=0.1).item(), rel=1e-10)


def test_false_negative_margin_drops_candidates_scoring_near_the_positive():
    query, target = batch(b=6, extra=2)
    target = target.clone()
    target[1] = target[0]  # query 0 and 1 share the same positive: a false negative for each other
    margin = 0.1
    kept = lambda sims, pos, j: sims[j] <= sims[pos] - margin  # noqa: E731
    for alpha in (0.0, 9.0):
        got = hardness_weighted_info_nce(
            query, target, alpha=alpha, temperature=0.05, false_negative_margin=margin
        )
        expected = reference(weighted_nce_row(0.05, alpha, kept), query, target)
        assert got.item() == pytest.approx(expected, rel=1e-10)
    unmasked = info_nce(query, target, temperature=0.05)
    assert info_nce(query, target, temperature=0.05, false_negative_margin=margin) < unmasked


def test_modules_and_make_loss_agree_with_functions():
    query, target = batch(extra=1)
    pairs = [
        (make_loss("info_nce", temperature=0.1), info_nce(query, target, temperature=0.1)),
        (make_loss("llave", alpha=3.0), hardness_weighted_info_nce(query, target, alpha=3.0)),
        (make_loss("focal_info_nce", margin=0.2), focal_info_nce(query, target, margin=0.2)),
        (make_loss("dcl"), dcl_loss(query, target)),
        (make_loss("hcl", beta=1.0), hcl_loss(query, target, beta=1.0)),
    ]
    for module, value in pairs:
        assert module(query, target).item() == pytest.approx(value.item(), rel=1e-12)
    assert "alpha=3.0" in repr(make_loss("hardness_weighted", alpha=3.0))


# --------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("name, kwargs", [
    ("info_nce", dict(temperature=0.1)),
    ("focal_info_nce", dict(margin=0.3, temperature=0.1)),
    ("dcl", dict(temperature=0.1)),
    ("hcl", dict(beta=2.0, tau_plus=0.1, temperature=0.1)),
])
def test_gradcheck(name, kwargs):
    query, target = batch(b=4, extra=2, dim=5)
    loss = make_loss(name, false_negative_margin=None, **kwargs)
    assert torch.autograd.gradcheck(
        loss, (query.requires_grad_(), target.requires_grad_()), eps=1e-6, atol=1e-6
    )


def frozen_weight_loss(query, target, weights, tau):
    """Symmetric InfoNCE whose negatives' denominator terms are scaled by constant `weights`."""
    s = query @ target.T
    b = query.shape[0]
    eye = torch.eye(b, target.shape[0], dtype=s.dtype)
    terms = torch.exp(s / tau) * torch.where(eye.bool(), torch.ones_like(s), weights)
    rows = -torch.log(terms.diagonal() / terms.sum(dim=1))
    columns = -torch.log(terms.diagonal() / terms[:, :b].sum(dim=0))
    return (rows.mean() + columns.mean()) / 2


def test_hardness_weighted_gradient_equals_finite_differences_with_weights_frozen():
    """The stop-gradient means: differentiate as if w_ij = exp(alpha * s_ij) were constants."""
    tau, alpha, eps = 0.1, 9.0, 1e-6
    query, target = batch(b=4, extra=2, dim=5)
    weights = torch.exp(alpha * query @ target.T)  # frozen at the evaluation point
    query.requires_grad_()
    hardness_weighted_info_nce(query, target, alpha=alpha, temperature=tau).backward()
    numeric = torch.zeros_like(query)
    for index in range(query.numel()):
        step = torch.zeros_like(query).view(-1)
        step[index] = eps
        step = step.view_as(query)
        up = frozen_weight_loss(query.detach() + step, target, weights, tau)
        down = frozen_weight_loss(query.detach() - step, target, weights, tau)
        numeric.view(-1)[index] = (up - down) / (2 * eps)
    assert torch.allclose(query.grad, numeric, atol=1e-7)


def test_gradient_has_analytic_weight_form():
    """dL/dq_i = (1/B) sum_j g_ij t_j with g_ij = (w_ij e^{s_ij/tau} / Z_i - [i=j]) / tau."""
    tau, alpha = 0.05, 9.0
    query, target = batch(b=5, extra=3)
    query.requires_grad_()
    hardness_weighted_info_nce(query, target, alpha=alpha, temperature=tau, symmetric=False).backward()

    s = query.detach() @ target.T
    b = query.shape[0]
    weights = torch.exp(alpha * s)
    weights[range(b), range(b)] = 1.0  # the positive is never re-weighted
    mass = weights * torch.exp(s / tau)
    g = (mass / mass.sum(dim=1, keepdim=True) - torch.eye(b, target.shape[0], dtype=s.dtype)) / tau
    assert torch.allclose(query.grad, g @ target / b, atol=1e-10)


def negative_gradient_shares(similarities, alpha, tau=0.05):
    sim = torch.tensor([similarities], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0])
    negatives = torch.ones_like(sim, dtype=torch.bool)
    negatives[0, 0] = False
    hardness_weighted_rows(sim, labels, negatives, temperature=tau, alpha=alpha).sum().backward()
    pushes = sim.grad[0, 1:]  # positive: a negative's gradient pushes its similarity down
    return pushes / pushes.sum()


def test_larger_alpha_moves_gradient_mass_to_the_hardest_negatives():
    similarities = [0.8, 0.7, 0.5, 0.3, 0.1, -0.2]  # positive first, negatives from hard to easy
    shares = {alpha: negative_gradient_shares(similarities, alpha) for alpha in (0.0, 1.0, 3.0, 9.0)}
    for share in shares.values():
        assert torch.all(share[:-1] > share[1:])  # harder negatives always get more
    hardest = [shares[a][0].item() for a in sorted(shares)]
    easiest = [shares[a][-1].item() for a in sorted(shares)]
    assert hardest == sorted(hardest) and hardest[0] < hardest[-1]
    assert easiest == sorted(easiest, reverse=True)
    # The ratio of two negatives' shares is exactly exp((alpha + 1/tau) * (s_a - s_b)).
    ratio = (shares[9.0][0] / shares[9.0][1]).item()
    assert ratio == pytest.approx(math.exp((9.0 + 1 / 0.05) * (0.7 - 0.5)), rel=1e-10)


# --------------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_softmax_in_float32(dtype):
    query, target = batch(b=16, extra=4, dim=32, dtype=torch.float32)
    expected = hardness_weighted_info_nce(query, target)
    q_half = query.to(dtype).requires_grad_()
    got = hardness_weighted_info_nce(q_half, target.to(dtype))
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(expected.item(), rel=0.05)
    got.backward()
    assert q_half.grad.dtype == dtype and torch.isfinite(q_half.grad.float()).all()


# Every kind of mismatch: half with float32 either way round, two different half formats (whose
# common dtype is float32), and float32 with float64 (which must not be rounded down to float32).
MIXED_DTYPES = [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                (torch.bfloat16, torch.float16), (torch.float32, torch.float64)]


@pytest.mark.parametrize("query_dtype, target_dtype", MIXED_DTYPES)
@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_mixed_dtypes_give_the_loss_of_both_inputs_cast_to_their_common_dtype(
    name, query_dtype, target_dtype
):
    """The documented rule, on the dense path of every loss (test_tiled.py: the tiled path)."""
    query, target = batch(b=6, extra=2, dim=16)
    query = query.to(query_dtype).requires_grad_()
    target = target.to(target_dtype).requires_grad_()
    common = torch.promote_types(torch.promote_types(query_dtype, target_dtype), torch.float32)
    assert losses.compute_dtype(query, target) == common
    loss = make_loss(name, temperature=0.05, false_negative_margin=0.1)
    got = loss(query, target)
    got.backward()
    cast_query, cast_target = (x.detach().to(common).requires_grad_() for x in (query, target))
    expected = loss(cast_query, cast_target)
    expected.backward()
    assert got.dtype == common
    torch.testing.assert_close(got, expected)
    for tensor, reference in ((query, cast_query), (target, cast_target)):
        assert tensor.grad.dtype == tensor.dtype
        torch.testing.assert_close(tensor.grad, reference.grad.to(tensor.dtype))


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("query, target, message", [
    (torch.randn(4), torch.randn(4, 8), "query must have shape"),
    (torch.randn(4, 8), torch.randn(2, 4, 8), "target must have shape"),
    (torch.randn(4, 8), torch.randn(4, 6), "dims differ"),
    (torch.randn(4, 8), torch.randn(3, 8), "M >= B"),
    (torch.randn(0, 8), torch.randn(0, 8), "empty batch"),
    (torch.full((2, 3), float("nan")), torch.randn(2, 3), "query contains non-finite"),
    (torch.randn(2, 3), torch.tensor([[1.0, float("inf"), 0.0]] * 2), "target contains non-finite"),
    (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), "floating point"),
])
def test_bad_embeddings_raise_value_error_naming_the_problem(query, target, message):
    with pytest.raises(ValueError, match=message):
        hardness_weighted_info_nce(query, target)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(alpha=-1.0), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(false_negative_margin=float("inf")), "false_negative_margin"),
])
def test_bad_hyper_parameters_raise_in_functions_and_modules(kwargs, message):
    query, target = batch()
    with pytest.raises(ValueError, match=message):
        hardness_weighted_info_nce(query, target, **kwargs)
    with pytest.raises(ValueError, match=message):
        make_loss("hardness_weighted", **kwargs)


def test_make_loss_rejects_unknown_names_and_parameters():
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        make_loss("triplet")
    with pytest.raises(ValueError, match="bad parameters for loss 'info_nce'"):
        make_loss("info_nce", alpha=9.0)
    with pytest.raises(ValueError, match="tau_plus"):
        make_loss("hcl", tau_plus=1.0)
    assert set(losses.LOSSES) == {"info_nce", "hardness_weighted", "focal_info_nce", "dcl", "hcl"}


# --------------------------------------------------------------------------------------------------
# Modules derived from the functions, and the driver's contract


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_module_takes_its_functions_hyper_parameters_and_docstring(name):
    module_class = losses.LOSSES[name]
    function = module_class.loss_fn
    function_parameters = list(inspect.signature(function).parameters.values())[2:]
    module_parameters = list(inspect.signature(module_class).parameters.values())
    assert [(p.name, p.default) for p in module_parameters] == [
        (p.name, p.default) for p in function_parameters
    ]
    _summary, _, formula_and_the_rest = inspect.getdoc(function).partition("\n")
    assert formula_and_the_rest.strip() in inspect.getdoc(module_class)
    query, target = batch(extra=1)
    values = dict(temperature=0.1, symmetric=False, alpha=3.0, margin=0.2, beta=1.0, tau_plus=0.2)
    positional = [values[p.name] for p in function_parameters if p.kind == p.POSITIONAL_OR_KEYWORD]
    expected = function(query, target, *positional)
    assert module_class(*positional)(query, target).item() == pytest.approx(expected.item(), rel=1e-12)


def test_docstring_examples_hold():
    results = doctest.testmod(losses)
    assert results.attempted > 0 and results.failed == 0


def test_contrastive_loss_takes_a_custom_row_loss_but_tiles_only_the_two_it_can():
    query, target = batch(extra=2)

    def scaled_info_nce_rows(sim, labels, negatives, *, temperature, gamma):
        return gamma * losses.info_nce_rows(sim, labels, negatives, temperature=temperature)

    custom = losses.contrastive_loss(scaled_info_nce_rows, query, target, temperature=0.1, gamma=2.0)
    assert custom.item() == pytest.approx(2 * info_nce(query, target, temperature=0.1).item(), rel=1e-12)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.contrastive_loss(losses.dcl_rows, query, target, temperature=0.1, chunk_size=4)
