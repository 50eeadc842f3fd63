"""statistics.py against closed forms, scipy's bootstrap, brute-force loops and scikit-learn."""
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from llave_kit.statistics import (
    VERDICTS,
    Interval,
    auroc,
    auroc_of,
    bootstrap_ci,
    compound_verdict,
    difference,
    mean_of,
    verdict,
)


def half_width(interval: Interval) -> float:
    return (interval.ci_high - interval.ci_low) / 2


# --------------------------------------------------------------------------------------------------
# One seed: the bootstrap of a mean against the normal approximation and scipy


@pytest.fixture(scope="module")
def normal_draws():
    return np.random.default_rng(0).normal(loc=0.3, scale=2.0, size=4000)


def test_one_seed_mean_matches_normal_approximation(normal_draws):
    x = normal_draws
    interval = bootstrap_ci({"x": x[None, :]}, mean_of("x"), n_resamples=4000, seed=1)
    se = x.std(ddof=1) / np.sqrt(x.size)
    expected_half = 1.96 * se
    assert interval.estimate == pytest.approx(x.mean(), rel=1e-12)
    assert interval.ci_low == pytest.approx(x.mean() - expected_half, abs=0.1 * expected_half)
    assert interval.ci_high == pytest.approx(x.mean() + expected_half, abs=0.1 * expected_half)


def test_one_seed_mean_matches_scipy_percentile_bootstrap(normal_draws):
    x = normal_draws
    ours = bootstrap_ci({"x": x[None, :]}, mean_of("x"), n_resamples=5000, seed=2)
    theirs = stats.bootstrap((x,), np.mean, n_resamples=5000, method="percentile",
                             confidence_level=0.95, rng=np.random.default_rng(3))
    # Each endpoint carries Monte Carlo error of ~2% of the half width per run; allow 10%.
    tolerance = 0.1 * half_width(ours)
    assert ours.ci_low == pytest.approx(theirs.confidence_interval.low, abs=tolerance)
    assert ours.ci_high == pytest.approx(theirs.confidence_interval.high, abs=tolerance)


def test_confidence_level_sets_the_percentiles(normal_draws):
    x = normal_draws[None, :1000]
    wide = bootstrap_ci({"x": x}, mean_of("x"), confidence=0.99, seed=0)
    narrow = bootstrap_ci({"x": x}, mean_of("x"), confidence=0.80, seed=0)
    # Normal quantiles: z(0.995) / z(0.90) = 2.576 / 1.282 = 2.01.
    assert half_width(wide) / half_width(narrow) == pytest.approx(2.01, rel=0.1)


# --------------------------------------------------------------------------------------------------
# Two levels: seeds and queries


def test_seed_offsets_widen_the_interval():
    rng = np.random.default_rng(4)
    n_seeds, n_queries = 3, 500
    offsets = np.array([0.0, 0.5, 1.0])  # seed effects far above the query noise / sqrt(Q)
    x = offsets[:, None] + rng.normal(size=(n_seeds, n_queries))
    hierarchical = bootstrap_ci({"x": x}, mean_of("x"), seed=0)
    ignoring_seeds = bootstrap_ci({"x": x.reshape(1, -1)}, mean_of("x"), seed=0)
    assert hierarchical.estimate == pytest.approx(ignoring_seeds.estimate)
    assert half_width(hierarchical) > 5 * half_width(ignoring_seeds)
    # The seed means (about 0, 0.5, 1) must mostly fall inside the hierarchical interval.
    assert hierarchical.ci_low < 0.3 and hierarchical.ci_high > 0.7


def test_hierarchical_variance_matches_closed_form():
    # x = a_s + b_q + e_sq (two-way decomposition of the data, population variances). With seeds
    # and queries resampled independently and queries shared across seeds, the resampled mean has
    # Var = var(a)/S + var(b)/Q + var(e)/(S Q). Sizes are chosen so that dropping the seed term,
    # dropping the query term, or drawing queries per seed would each move the sd by > 20%.
    rng = np.random.default_rng(5)
    n_seeds, n_queries = 8, 400
    x = (rng.normal(scale=0.2, size=(n_seeds, 1)) + rng.normal(size=(1, n_queries))
         + rng.normal(size=(n_seeds, n_queries)))
    grand = x.mean()
    a = x.mean(axis=1) - grand
    b = x.mean(axis=0) - grand
    e = x - grand - a[:, None] - b[None, :]
    seed_term, query_term = a.var() / n_seeds, b.var() / n_queries
    variance = seed_term + query_term + e.var() / (n_seeds * n_queries)
    assert seed_term > 0.3 * variance and query_term > 0.3 * variance  # both terms matter
    interval = bootstrap_ci({"x": x}, mean_of("x"), n_resamples=4000, seed=6)
    assert half_width(interval) == pytest.approx(1.96 * np.sqrt(variance), rel=0.1)


def test_resamples_share_indices_across_arrays_and_seeds():
    # Each entry encodes its (seed, query); the statistic checks every resample's structure.
    n_seeds, n_queries = 3, 50
    ids = 1000.0 * np.arange(n_seeds)[:, None] + np.arange(n_queries)[None, :]
    seen_seed_draws = set()

    def check(samples):
        codes, twin = samples["ids"], samples["twin"]
        assert codes.shape == (n_seeds, n_queries, 2)
        np.testing.assert_array_equal(twin, codes)  # the same indices for every array
        seeds, queries = codes[..., 0] // 1000, codes[..., 0] % 1000
        assert (seeds == seeds[:, :1]).all()  # each row is one (resampled) seed
        assert (queries == queries[:1]).all()  # the same queries for every seed
        seen_seed_draws.add(tuple(seeds[:, 0]))
        return 0.0

    both = np.stack([ids, ids], axis=-1)  # a trailing axis, like (S, Q, k)
    bootstrap_ci({"ids": both, "twin": both.copy()}, check, n_resamples=200, seed=0)
    assert {(0, 1, 2)} < seen_seed_draws  # seeds are resampled with replacement...
    assert any(len(set(draw)) < n_seeds for draw in seen_seed_draws)


def test_one_seed_resamples_only_queries():
    x = np.arange(20.0)[None, :]
    seen = []

    def record(samples):
        seen.append(samples["x"].copy())
        return float(samples["x"].mean())

    bootstrap_ci({"x": x}, record, n_resamples=50, seed=0)
    resamples = np.concatenate(seen[1:])  # seen[0] is the original data
    assert resamples.shape == (50, 20)
    assert len({tuple(row) for row in resamples}) == 50  # queries do vary


# --------------------------------------------------------------------------------------------------
# Pairing


def test_paired_difference_is_narrow_while_each_arm_is_wide():
    rng = np.random.default_rng(7)
    n_seeds, n_queries = 3, 500
    # Large between-query spread shared by both arms, small seed noise, a tiny consistent gain.
    a = rng.normal(scale=1.0, size=(1, n_queries)) + rng.normal(scale=0.01, size=(n_seeds, 1))
    b = a + 0.01 + rng.normal(scale=0.001, size=(n_seeds, n_queries))
    samples = {"a": a, "b": b}
    gain = bootstrap_ci(samples, difference(mean_of("b"), mean_of("a")), seed=0)
    arm_a = bootstrap_ci(samples, mean_of("a"), seed=0)
    arm_b = bootstrap_ci(samples, mean_of("b"), seed=0)
    assert gain.estimate == pytest.approx(0.01, abs=1e-3)
    assert gain.excludes_zero and gain.ci_low > 0.005
    assert half_width(gain) < 0.002
    assert half_width(arm_a) > 0.05 and half_width(arm_b) > 0.05
    # Compared unpaired (do the two arms' intervals overlap?) the gain would be invisible.
    assert arm_b.ci_low < arm_a.ci_high
    assert verdict(gain, +1) == "reproduced"


# --------------------------------------------------------------------------------------------------
# Null cases


@pytest.mark.parametrize("statistic", [
    difference(mean_of("a"), mean_of("b")),
    difference(auroc_of("a", "neg"), auroc_of("b", "neg")),
])
def test_identical_arms_give_exactly_zero(statistic):
    rng = np.random.default_rng(8)
    a = rng.normal(size=(3, 200))
    samples = {"a": a, "b": a.copy(), "neg": rng.normal(size=(3, 200, 5))}
    interval = bootstrap_ci(samples, statistic, n_resamples=300, seed=0)
    assert interval == Interval(0.0, 0.0, 0.0)
    assert not interval.excludes_zero
    assert verdict(interval, +1) == verdict(interval, -1) == "inconclusive"


def test_pure_noise_arms_are_inconclusive():
    rng = np.random.default_rng(9)
    arms = {name: rng.normal(size=(4, 800)) for name in ("info_nce", "weighted")}
    gap = bootstrap_ci(arms, difference(mean_of("weighted"), mean_of("info_nce")), seed=0)
    assert gap.ci_low < 0 < gap.ci_high
    assert verdict(gap, +1) == verdict(gap, -1) == "inconclusive"


def test_null_false_positive_rate_is_near_nominal():
    # 100 independent pure-noise comparisons: a 95% interval should exclude 0 about 5 times.
    # An interval that ignored query noise would exclude it almost every time.
    rng = np.random.default_rng(10)
    statistic = difference(mean_of("a"), mean_of("b"))
    excluded = sum(
        bootstrap_ci({"a": rng.normal(size=(1, 100)), "b": rng.normal(size=(1, 100))},
                     statistic, n_resamples=400, seed=trial).excludes_zero
        for trial in range(100))
    assert excluded <= 12


# --------------------------------------------------------------------------------------------------
# Statistics helpers and AUROC


def test_mean_of_and_difference():
    rng = np.random.default_rng(11)
    samples = {"hit": rng.integers(0, 2, size=(3, 10)).astype(float),
               "hard": rng.normal(size=(3, 10, 4))}
    assert mean_of("hard")(samples) == pytest.approx(samples["hard"].mean())
    assert difference(mean_of("hit"), mean_of("hard"))(samples) == pytest.approx(
        samples["hit"].mean() - samples["hard"].mean())
    assert mean_of("hard").__name__ == "mean_of('hard')"


def brute_force_auroc(pos, neg):
    total = 0.0
    for p in np.ravel(pos):
        for n in np.ravel(neg):
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (np.size(pos) * np.size(neg))


@pytest.mark.parametrize("trial", range(5))
def test_auroc_matches_brute_force_and_sklearn_with_ties(trial):
    rng = np.random.default_rng(100 + trial)
    pos = rng.integers(0, 6, size=rng.integers(1, 40))  # few distinct values: many ties
    neg = rng.integers(0, 5, size=rng.integers(1, 60))
    expected = brute_force_auroc(pos, neg)
    assert auroc(pos, neg) == pytest.approx(expected, abs=1e-12)
    labels = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(labels, np.r_[pos, neg]), abs=1e-12)


def test_auroc_hand_cases_and_pooling():
    assert auroc([1.0], [1.0]) == 0.5
    assert auroc([2.0, 3.0], [1.0]) == 1.0
    assert auroc([0.0], [1.0, 2.0]) == 0.0
    assert auroc([[1.0, 3.0]], [[2.0]]) == 0.5  # shapes are pooled
    with pytest.raises(ValueError, match="both sides"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        auroc([np.nan], [1.0])


def test_auroc_of_pools_seeds_queries_and_negatives():
    rng = np.random.default_rng(12)
    samples = {"positive": rng.normal(0.5, 1, size=(3, 40)), "hard": rng.normal(size=(3, 40, 5))}
    statistic = auroc_of("positive", "hard")
    expected = brute_force_auroc(samples["positive"], samples["hard"])
    assert statistic(samples) == pytest.approx(expected, abs=1e-12)
    interval = bootstrap_ci(samples, statistic, n_resamples=200, seed=0)
    assert interval.estimate == pytest.approx(expected, abs=1e-12)
    assert 0 <= interval.ci_low < interval.ci_high <= 1


# --------------------------------------------------------------------------------------------------
# Interval and verdicts


def test_interval_basics():
    interval = Interval(0.2, 0.1, 0.3)
    assert interval.as_dict() == {"mean": 0.2, "ci_low": 0.1, "ci_high": 0.3}
    assert interval.excludes_zero and Interval(-0.2, -0.3, -0.1).excludes_zero
    assert not Interval(0.1, 0.0, 0.3).excludes_zero
    assert not Interval(0.0, -0.1, 0.1).excludes_zero
    with pytest.raises(ValueError, match="ci_low <= ci_high"):
        Interval(0.0, 1.0, -1.0)


@pytest.mark.parametrize("low, high, direction, expected", [
    (0.1, 0.3, +1, "reproduced"),
    (0.1, 0.3, -1, "contradicted"),
    (-0.3, -0.1, -1, "reproduced"),
    (-0.3, -0.1, +1, "contradicted"),
    (-0.1, 0.3, +1, "inconclusive"),
    (-0.1, 0.3, -1, "inconclusive"),
    (0.0, 0.3, +1, "inconclusive"),  # touching 0 is not excluding it
    (0.0, 0.3, -1, "inconclusive"),
    (-0.3, 0.0, -1, "inconclusive"),
    (-0.3, 0.0, +1, "inconclusive"),
    (0.0, 0.0, +1, "inconclusive"),
])
def test_verdict(low, high, direction, expected):
    assert verdict(Interval((low + high) / 2, low, high), direction) == expected


def test_verdict_rejects_other_directions():
    for direction in (0, 2, "+"):
        with pytest.raises(ValueError, match="direction"):
            verdict(Interval(0.2, 0.1, 0.3), direction)


@pytest.mark.parametrize("verdicts, expected", [
    (["reproduced"], "reproduced"),
    (["reproduced", "reproduced"], "reproduced"),
    (["reproduced", "inconclusive"], "inconclusive"),
    (["inconclusive", "inconclusive"], "inconclusive"),
    (["reproduced", "contradicted"], "contradicted"),
    (["inconclusive", "contradicted"], "contradicted"),
    (("contradicted",), "contradicted"),
])
def test_compound_verdict(verdicts, expected):
    assert compound_verdict(verdicts) == expected
    assert expected in VERDICTS


def test_compound_verdict_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        compound_verdict([])
    with pytest.raises(ValueError, match="unknown verdicts"):
        compound_verdict(["reproduced", "confirmed"])


def test_hard_falls_more_than_positive_compound_reading():
    # "hard-negative similarity FALLS more than positive similarity": hard must fall (< 0) and
    # the fall of hard must exceed that of the positive (hard_change - pos_change < 0).
    rng = np.random.default_rng(13)
    n_seeds, n_queries = 3, 400
    base_pos, base_hard = rng.normal(0.6, 0.1, (1, n_queries)), rng.normal(0.4, 0.1, (1, n_queries))
    noise = lambda: rng.normal(0, 0.005, (n_seeds, n_queries))  # noqa: E731
    samples = {"pos_before": base_pos + noise(), "pos_after": base_pos - 0.02 + noise(),
               "hard_before": base_hard + noise(), "hard_after": base_hard - 0.10 + noise()}
    hard_change = difference(mean_of("hard_after"), mean_of("hard_before"))
    pos_change = difference(mean_of("pos_after"), mean_of("pos_before"))
    readings = [verdict(bootstrap_ci(samples, hard_change, n_resamples=500), -1),
                verdict(bootstrap_ci(samples, difference(hard_change, pos_change),
                                     n_resamples=500), -1)]
    assert readings == ["reproduced", "reproduced"]
    assert compound_verdict(readings) == "reproduced"


# --------------------------------------------------------------------------------------------------
# Bad input, errors and reproducibility


def test_mismatched_seeds_are_rejected():
    with pytest.raises(ValueError, match=r"samples\['b'\] has S = 2 seeds .* S = 3"):
        bootstrap_ci({"a": np.zeros((3, 10)), "b": np.zeros((2, 10))}, mean_of("a"))


def test_mismatched_queries_are_rejected():
    with pytest.raises(ValueError, match=r"samples\['b'\] has Q = 9 queries .* Q = 10"):
        bootstrap_ci({"a": np.zeros((3, 10)), "b": np.zeros((3, 9, 5))}, mean_of("a"))


def test_too_few_queries_are_rejected():
    with pytest.raises(ValueError, match=r"Q = 1 queries: need Q >= 2"):
        bootstrap_ci({"a": np.zeros((3, 1))}, mean_of("a"))


@pytest.mark.parametrize("samples, message", [
    ({}, "empty"),
    ({"a": np.zeros(10)}, r"shape \(S, Q, \.\.\.\)"),
    ({"a": np.zeros((0, 10))}, "S = 0"),
    ({"a": np.array([[0.0, np.nan]])}, r"samples\['a'\] contains non-finite"),
])
def test_malformed_samples_are_rejected(samples, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(samples, lambda s: 0.0)


def test_bad_options_are_rejected():
    samples = {"a": np.zeros((2, 5))}
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(samples, mean_of("a"), confidence=95)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci(samples, mean_of("a"), n_resamples=0)


def test_statistic_failures_are_reported():
    samples = {"a": np.arange(10.0).reshape(2, 5)}
    with pytest.raises(ValueError, match="returned nan on the original data"):
        bootstrap_ci(samples, lambda s: float("nan"))
    with pytest.raises(ValueError, match="must return a scalar"):
        bootstrap_ci(samples, lambda s: s["a"].mean(axis=0))
    with pytest.raises(KeyError):  # the statistic's own exceptions propagate unchanged
        bootstrap_ci(samples, mean_of("missing"))
    # Finite on the data, non-finite on a resample: the resample is named.
    original = samples["a"].copy()
    nan_off_data = lambda s: 0.0 if np.array_equal(s["a"], original) else float("inf")  # noqa: E731
    with pytest.raises(ValueError, match="returned inf on bootstrap resample 0"):
        bootstrap_ci(samples, nan_off_data)


def test_same_seed_same_interval():
    rng = np.random.default_rng(14)
    samples = {"a": rng.normal(size=(3, 100)), "b": rng.normal(size=(3, 100))}
    statistic = difference(mean_of("a"), mean_of("b"))
    first = bootstrap_ci(samples, statistic, n_resamples=500, seed=42)
    assert bootstrap_ci(samples, statistic, n_resamples=500, seed=42) == first
    assert bootstrap_ci(samples, statistic, n_resamples=500, seed=43) != first
