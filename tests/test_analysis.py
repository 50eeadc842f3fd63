"""analysis.py against hand-worked cases, naive loops, closed forms, scikit-learn and autograd."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde, norm
from sklearn.metrics import roc_auc_score

from llave_kit.analysis import (
    alignment,
    gradient_share,
    negative_gradients,
    overlap_metrics,
    similarity_stats,
    uniformity,
)
from llave_kit.losses import hardness_weighted_info_nce


def at_angle(degrees, norm_=1.0):
    radians = math.radians(degrees)
    return [norm_ * math.cos(radians), norm_ * math.sin(radians)]


def with_cosines(query_degrees, cosines):
    """A 2-D query and candidates whose cosine similarities to it are exactly `cosines`."""
    query = at_angle(query_degrees)
    # Candidates get arbitrary lengths: the statistics must use cosine, not dot, similarity.
    cands = [at_angle(query_degrees + math.degrees(math.acos(c)), norm_=1 + j)
             for j, c in enumerate(cosines)]
    return query, cands


# --------------------------------------------------------------------------------------------------
# similarity_stats


HAND_COSINES = [[0.9, 0.8, 0.5, 0.1, -0.3], [0.2, 0.7, -0.5, 0.6, 0.0], [0.3, -0.9, 0.4, 0.95, 0.1]]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_similarity_stats_hand_example_candidate_lists(as_tensor):
    pairs = [with_cosines(angle, cos) for angle, cos in zip((10, 100, 250), HAND_COSINES)]
    query = np.array([q for q, _ in pairs])  # (3, 2)
    cands = np.array([c for _, c in pairs])  # (3, 5, 2)
    if as_tensor:
        query, cands = torch.tensor(query, dtype=torch.float32), torch.tensor(cands)
    stats = similarity_stats(query, cands, positive_index=[0, 0, 3], k=2)
    # Worked by hand: q0 pos .9, top-2 {.8, .5}, bottom-2 {-.3, .1}; q1's positive (.2) is beaten
    # by two negatives; q2's positive is candidate 3 (.95).
    tol = 1e-6 if as_tensor else 1e-12
    np.testing.assert_allclose(stats.positive, [0.9, 0.2, 0.95], atol=tol)
    np.testing.assert_allclose(stats.hard, [[0.8, 0.5], [0.7, 0.6], [0.4, 0.3]], atol=tol)
    np.testing.assert_allclose(stats.easy, [[-0.3, 0.1], [-0.5, 0.0], [-0.9, 0.1]], atol=tol)
    np.testing.assert_allclose(stats.hard_mean, [0.65, 0.65, 0.35], atol=tol)
    np.testing.assert_allclose(stats.easy_mean, [-0.1, -0.25, -0.4], atol=tol)
    row = stats.as_dict()
    assert row["positive"] == pytest.approx(2.05 / 3, abs=tol)
    assert row["hard"] == pytest.approx(0.55, abs=tol)
    assert row["easy"] == pytest.approx(-0.25, abs=tol)
    assert row["gap"] == pytest.approx(2.05 / 3 - 0.55, abs=tol)
    assert (row["k"], row["queries"]) == (2, 3)
    assert stats.table_row() == "0.68 / 0.55 / -0.25"


def test_similarity_stats_hand_example_gallery():
    gallery = np.array([at_angle(a) for a in (0, 60, 90, 180, 270)])  # (5, 2)
    query = np.array([at_angle(a, norm_=2.0) for a in (0, 90, 180)])  # (3, 2)
    stats = similarity_stats(query, gallery, k=2)  # default: query i's positive is gallery row i
    half_root3 = math.sqrt(3) / 2
    np.testing.assert_allclose(stats.positive, [1.0, half_root3, 0.0], atol=1e-12)
    np.testing.assert_allclose(stats.hard_mean, [0.25, 0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(stats.easy_mean, [-0.5, -0.5, -0.75], atol=1e-12)


def naive_stats(query, cands, positives, k):
    """Python loop: cosine of each pair, sort the negatives, average the ends."""
    out = []
    for i, q in enumerate(query):
        candidates = cands[i] if cands.ndim == 3 else cands
        sims = [float(q @ c / (np.linalg.norm(q) * np.linalg.norm(c))) for c in candidates]
        negatives = sorted(s for j, s in enumerate(sims) if j != positives[i])
        out.append((sims[positives[i]], np.mean(negatives[-k:]), np.mean(negatives[:k])))
    return np.array(out)


@pytest.mark.parametrize("gallery", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_similarity_stats_equals_naive_loop_for_any_chunk_size(gallery, chunk_size):
    rng = np.random.default_rng(0)
    query = rng.normal(size=(7, 6))
    cands = rng.normal(size=(11, 6)) if gallery else rng.normal(size=(7, 9, 6))
    positives = rng.integers(0, cands.shape[-2], size=7)
    stats = similarity_stats(query, cands, positives, k=3, chunk_size=chunk_size)
    expected = naive_stats(query, cands, positives, k=3)
    np.testing.assert_allclose(stats.positive, expected[:, 0], atol=1e-12)
    np.testing.assert_allclose(stats.hard_mean, expected[:, 1], atol=1e-12)
    np.testing.assert_allclose(stats.easy_mean, expected[:, 2], atol=1e-12)
    assert (np.diff(stats.hard, axis=1) <= 0).all() and (np.diff(stats.easy, axis=1) >= 0).all()


@pytest.mark.parametrize("query, cands, kwargs, message", [
    (np.ones((2, 3)), np.ones((2, 4, 3)), {"k": 4}, "needs at least 4 negatives"),
    (np.ones((2, 3)), np.ones((2, 4, 5)), {}, "dims differ"),
    (np.ones((2, 3)), np.ones((3, 4, 3)), {}, "2 queries but 3 candidate lists"),
    (np.ones((2, 3)), np.ones((2, 6, 3)), {"positive_index": [0, 6]}, "out of range"),
    (np.ones((2, 3)), np.ones((2, 6, 3)), {"positive_index": [0.0, 1.0]}, "integers"),
    (np.ones((3, 3)), np.ones((2, 3)), {}, "only 2 columns"),
    (np.zeros((2, 3)), np.ones((2, 6, 3)), {}, "zero vector"),
    (np.full((2, 3), np.nan), np.ones((2, 6, 3)), {}, "non-finite"),
    (np.ones((2, 3)), np.ones((2, 6, 3)), {"chunk_size": 0}, "chunk_size"),
])
def test_similarity_stats_rejects_bad_input(query, cands, kwargs, message):
    with pytest.raises(ValueError, match=message):
        similarity_stats(query, cands, **kwargs)


# --------------------------------------------------------------------------------------------------
# overlap_metrics


@pytest.mark.parametrize("method", ["kde", "histogram"])
def test_overlap_of_identical_samples_is_one_and_of_far_apart_ones_zero(method):
    rng = np.random.default_rng(1)
    sample = rng.normal(0.5, 0.1, size=2000)
    same = overlap_metrics(sample, sample, method=method)
    assert same.overlap == pytest.approx(1.0, abs=1e-3)
    assert same.bhattacharyya == pytest.approx(1.0, abs=1e-3)
    assert same.auroc == pytest.approx(0.5)  # every pair (x, x) ties, and ties count 1/2
    far = overlap_metrics(rng.normal(0.9, 0.02, 2000), rng.normal(-0.5, 0.02, 2000), method=method)
    assert far.overlap < 1e-3 and far.bhattacharyya < 1e-3 and far.auroc == 1.0
    assert far.margin == pytest.approx(1.4, abs=0.01)


def test_binned_kde_overlap_matches_scipy_gaussian_kde():
    rng = np.random.default_rng(5)
    pos, neg = rng.normal(0.7, 0.05, 400), rng.gamma(4.0, 0.08, 700)  # unequal spreads, skewed
    kdes = gaussian_kde(pos), gaussian_kde(neg)
    grid = np.linspace(-1, 2, 60001)
    f_pos, f_neg = kdes[0](grid), kdes[1](grid)
    metrics = overlap_metrics(pos, neg)
    assert metrics.overlap == pytest.approx(np.trapezoid(np.minimum(f_pos, f_neg), grid), abs=1e-4)
    assert metrics.bhattacharyya == pytest.approx(np.trapezoid(np.sqrt(f_pos * f_neg), grid),
                                                  abs=1e-4)


def test_overlap_and_bhattacharyya_match_gaussian_closed_forms():
    rng = np.random.default_rng(2)
    mu1, s1, mu2, s2 = 0.0, 1.0, 1.0, 1.5
    metrics = overlap_metrics(rng.normal(mu1, s1, 20000), rng.normal(mu2, s2, 20000))
    distance = (0.25 * math.log(0.25 * (s1**2 / s2**2 + s2**2 / s1**2 + 2))
                + 0.25 * (mu1 - mu2) ** 2 / (s1**2 + s2**2))
    assert metrics.bhattacharyya == pytest.approx(math.exp(-distance), abs=0.01)
    # Equal variances: OVL = 2 Phi(-|mu1 - mu2| / (2 sigma)).
    equal = overlap_metrics(rng.normal(0, 1, 20000), rng.normal(1, 1, 20000))
    assert equal.overlap == pytest.approx(2 * norm.cdf(-0.5), abs=0.015)
    assert equal.auroc == pytest.approx(1 - norm.cdf(1 / math.sqrt(2)), abs=0.01)


def test_auroc_counts_ties_as_half_like_sklearn_and_a_pair_loop():
    rng = np.random.default_rng(3)
    pos = np.round(rng.normal(0.6, 0.2, 300), 1)  # rounding creates many ties
    neg = np.round(rng.normal(0.4, 0.2, 500), 1)
    metrics = overlap_metrics(pos, neg)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    assert metrics.auroc == pytest.approx(roc_auc_score(labels, np.r_[pos, neg]), abs=1e-12)
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    assert metrics.auroc == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)
    assert metrics.margin == pytest.approx(pos.mean() - neg.mean())


def test_overlap_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="zero spread"):
        overlap_metrics(np.ones(10), np.linspace(0, 1, 10))
    assert overlap_metrics(np.ones(10), np.ones(10), method="histogram").overlap == pytest.approx(1)
    with pytest.raises(ValueError, match="at least 2"):
        overlap_metrics([0.5], [0.1, 0.2])
    with pytest.raises(ValueError, match="method"):
        overlap_metrics([0.5, 0.6], [0.1, 0.2], method="gmm")


# --------------------------------------------------------------------------------------------------
# Gradient view: analytic against autograd of the loss itself


def autograd_negative_gradients(sims, alpha, temperature):
    """d loss_i / d s_ij by autograd through `hardness_weighted_info_nce`.

    With query = identity (B, B) and target = sims.T (K, B), the loss's own similarity matrix
    query @ target.T is exactly `sims`, so the gradient w.r.t. target is (dL/ds).T.
    """
    batch = sims.shape[0]
    target = sims.T.clone().requires_grad_(True)  # (K, B)
    query = torch.eye(batch, dtype=sims.dtype)
    loss = hardness_weighted_info_nce(query, target, alpha=alpha, temperature=temperature,
                                      symmetric=False)
    (grad,) = torch.autograd.grad(loss, target)
    per_row = grad.T * batch  # the loss averages rows; undo it to get per-row gradients
    return per_row.masked_fill(torch.eye(batch, sims.shape[1], dtype=torch.bool), 0.0).numpy()


@pytest.mark.parametrize("alpha, temperature", [(0.0, 0.02), (9.0, 0.02), (3.0, 0.05)])
def test_negative_gradients_and_shares_match_autograd(alpha, temperature):
    generator = torch.Generator().manual_seed(0)
    sims = torch.rand(4, 10, generator=generator, dtype=torch.float64) * 0.8 - 0.1  # (B, K)
    expected = autograd_negative_gradients(sims, alpha, temperature)
    np.testing.assert_allclose(negative_gradients(sims, alpha=alpha, temperature=temperature),
                               expected, rtol=1e-9, atol=1e-12)
    shares = gradient_share(sims, alpha=alpha, temperature=temperature)
    np.testing.assert_allclose(shares, expected / expected.sum(axis=1, keepdims=True), rtol=1e-9)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)


def test_gradient_share_single_row_and_weighting_concentrates_on_hard_negatives():
    row = np.array([0.9, 0.1, 0.5, 0.7, 0.3])  # positive first
    infonce = gradient_share(row, alpha=0.0)
    weighted = gradient_share(row, alpha=9.0)
    np.testing.assert_allclose(weighted, gradient_share(row[None], 0, alpha=9.0)[0])
    assert infonce[0] == weighted[0] == 0.0
    # Shares follow exp((1/tau + alpha) s): the ratio of two negatives' shares is closed form.
    assert weighted[3] / weighted[2] == pytest.approx(math.exp((50 + 9) * 0.2))
    assert weighted[3] > infonce[3] and weighted[1] < infonce[1]


def test_gradient_functions_reject_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        negative_gradients([0.1, 0.2], temperature=0.0)
    with pytest.raises(ValueError, match="K >= 2"):
        gradient_share([0.5])


# --------------------------------------------------------------------------------------------------
# Alignment and uniformity: direct double loops


def test_alignment_and_uniformity_match_direct_loops():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))

    def unit(v):
        length = math.sqrt(sum(c * c for c in v))
        return [c / length for c in v]

    unit_x, unit_y = [unit(v) for v in x.tolist()], [unit(v) for v in y.tolist()]

    def squared_distance(a, b):
        return sum((p - q) ** 2 for p, q in zip(a, b))

    expected_alignment = sum(squared_distance(a, b) for a, b in zip(unit_x, unit_y)) / len(x)
    assert alignment(x, y) == pytest.approx(expected_alignment, rel=1e-12)
    assert alignment(torch.tensor(x), torch.tensor(y), power=1) == pytest.approx(
        sum(math.sqrt(squared_distance(a, b)) for a, b in zip(unit_x, unit_y)) / len(x))
    pair_terms = [math.exp(-2 * squared_distance(unit_x[i], unit_x[j]))
                  for i in range(len(x)) for j in range(i + 1, len(x))]
    expected_uniformity = math.log(sum(pair_terms) / len(pair_terms))
    for chunk_size in (1, 4, 100):
        assert uniformity(x, chunk_size=chunk_size) == pytest.approx(expected_uniformity, rel=1e-12)


def test_alignment_and_uniformity_reject_bad_input():
    with pytest.raises(ValueError, match="paired"):
        alignment(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        uniformity(np.ones((1, 2)))
