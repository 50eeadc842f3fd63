"""Means, 95% intervals and verdicts for comparing training arms over seeds and shared queries.

A study trains each arm ("before", "info_nce", "weighted", ...) with S seeds and evaluates every
(arm, seed) on the SAME Q queries, so a quantity varies for two reasons: the seed (training noise)
and the query (which eval examples we happened to pick). The interval has to cover both, and
arms compared on shared seeds/queries should be compared pair by pair.

- `bootstrap_ci`: a two-level (hierarchical) percentile bootstrap. Each resample draws S seeds
  and Q queries with replacement, the same ones for every array, and re-evaluates a statistic.
- `mean_of`, `difference`, `auroc_of`: statistics to pass to it; `auroc` is the plain AUROC.
- `verdict`, `compound_verdict`: does an interval back the paper's claim ("reproduced"), refute
  it ("contradicted"), or neither ("inconclusive")?

Example (P@1 hits of two arms, each (S, Q): 3 seeds x the same 200 queries):
    >>> rng = np.random.default_rng(0)
    >>> hits = {"weighted": (rng.random((3, 200)) < 0.75) * 1.0,
    ...         "info_nce": (rng.random((3, 200)) < 0.6) * 1.0}
    >>> gain = bootstrap_ci(hits, difference(mean_of("weighted"), mean_of("info_nce")),
    ...                     n_resamples=500)
    >>> {name: round(value, 3) for name, value in gain.as_dict().items()}
    {'mean': 0.132, 'ci_low': 0.044, 'ci_high': 0.211}
    >>> verdict(gain, direction=+1)  # the claim "weighting raises P@1", read from the interval
    'reproduced'
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Samples = Mapping[str, np.ndarray]
Statistic = Callable[[Samples], float]

VERDICTS = ("reproduced", "contradicted", "inconclusive")


# --------------------------------------------------------------------------------------------------
# The interval


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval [ci_low, ci_high]."""

    estimate: float
    ci_low: float
    ci_high: float

    def __post_init__(self):
        # A percentile interval may not contain the estimate (skewed statistics), but its bounds
        # must be ordered; `not <=` also rejects NaN.
        if not self.ci_low <= self.ci_high:
            raise ValueError(f"need ci_low <= ci_high, got {self.ci_low} and {self.ci_high}")

    @property
    def excludes_zero(self) -> bool:
        """True when 0 lies strictly outside the interval (a bound equal to 0 does not count)."""
        return self.ci_low > 0 or self.ci_high < 0

    def as_dict(self) -> dict:
        return {"mean": self.estimate, "ci_low": self.ci_low, "ci_high": self.ci_high}


# --------------------------------------------------------------------------------------------------
# Hierarchical bootstrap


def _check_samples(samples: Samples) -> dict[str, np.ndarray]:
    """The arrays as float64, checked finite and sharing S >= 1 seeds and Q >= 2 queries."""
    if not samples:
        raise ValueError("samples is empty: need at least one array of shape (S, Q, ...)")
    arrays, shape = {}, None
    for name, value in samples.items():
        array = np.asarray(value, dtype=np.float64)
        if array.ndim < 2:
            raise ValueError(f"samples[{name!r}] must have shape (S, Q, ...) = (seeds, queries, "
                             f"...), got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"samples[{name!r}] contains non-finite values (nan or inf)")
        if shape is None:
            first, shape = name, array.shape[:2]
            if shape[0] < 1:
                raise ValueError(f"samples[{name!r}] has S = 0 seeds: need at least 1")
            if shape[1] < 2:
                raise ValueError(f"samples[{name!r}] has Q = {shape[1]} queries: need Q >= 2 "
                                 f"to resample queries")
        elif array.shape[0] != shape[0]:
            raise ValueError(f"samples[{name!r}] has S = {array.shape[0]} seeds but "
                             f"samples[{first!r}] has S = {shape[0]}: arrays must share seeds")
        elif array.shape[1] != shape[1]:
            raise ValueError(f"samples[{name!r}] has Q = {array.shape[1]} queries but "
                             f"samples[{first!r}] has Q = {shape[1]}: arrays must share queries")
        arrays[name] = array
    return arrays


def _as_scalar(value, where: str) -> float:
    if np.ndim(value) != 0:
        raise ValueError(f"statistic must return a scalar, got shape {np.shape(value)} {where}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"statistic returned {value} {where}")
    return value


def bootstrap_ci(
    samples: Samples,
    statistic: Statistic,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Estimate and two-level percentile-bootstrap interval of `statistic(samples)`.

    Each samples[name] is an array (S, Q, ...): seeds x queries x anything (e.g. k negatives),
    all with the same S and Q because every arm is evaluated on the same seeds' and queries'
    indices. Resample b draws

        seed_idx  ~ S indices from {0..S-1} with replacement   (only [0] when S == 1)
        query_idx ~ Q indices from {0..Q-1} with replacement
        theta_b   = statistic({name: arr[seed_idx][:, query_idx]})

    with the SAME indices for every array, so arms that share seeds and queries are compared
    pair by pair: the between-query spread common to both arms cancels in their difference.
    For the mean of one (S, Q) array x = a_s + b_q + e_sq (seed and query effects, interaction;
    var = the data's own variances, ddof 0), Var(theta_b) = var(a)/S + var(b)/Q + var(e)/(SQ):
    both sources of noise are covered. Known biases of this two-level scheme: var(a) already holds
    var(e)/Q, so noise private to each (seed, query) is counted twice (up to sqrt(2) too wide,
    conservative), while a real seed effect is underestimated by (S-1)/S with few seeds.

        estimate = statistic(samples)
        interval = [quantile(theta, (1 - confidence)/2), quantile(theta, (1 + confidence)/2)]

    Exceptions raised by `statistic` propagate unchanged; a non-scalar or non-finite value, on
    the data or on any resample, is a ValueError. `seed` fixes the resampling (reproducible).
    """
    arrays = _check_samples(samples)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    estimate = _as_scalar(statistic(arrays), "on the original data")

    n_seeds, n_queries = next(iter(arrays.values())).shape[:2]
    rng = np.random.default_rng(seed)
    thetas = np.empty(n_resamples)
    for b in range(n_resamples):
        # Indices are drawn per resample rather than all at once: (n_resamples, Q) int64 would be
        # gigabytes for large Q, and drawing is cheap next to evaluating the statistic.
        seed_idx = rng.integers(0, n_seeds, size=n_seeds) if n_seeds > 1 else np.zeros(1, int)
        query_idx = rng.integers(0, n_queries, size=n_queries)
        # arr[seed_idx].take(query_idx, axis=1) == arr[seed_idx][:, query_idx], ~3x faster.
        resample = {name: arr[seed_idx].take(query_idx, axis=1) for name, arr in arrays.items()}
        thetas[b] = _as_scalar(statistic(resample), f"on bootstrap resample {b}")

    alpha = 1 - confidence
    low, high = np.quantile(thetas, [alpha / 2, 1 - alpha / 2])
    return Interval(estimate=estimate, ci_low=float(low), ci_high=float(high))


# --------------------------------------------------------------------------------------------------
# Statistics


def _named(function, name: str):
    # A readable name makes tracebacks and reprs of composed statistics legible.
    function.__name__ = function.__qualname__ = name
    return function


def mean_of(name: str) -> Statistic:
    """Statistic: the mean over all entries (seeds, queries, anything else) of samples[name]."""
    return _named(lambda samples: float(np.mean(samples[name])), f"mean_of({name!r})")


def difference(stat_a: Statistic, stat_b: Statistic) -> Statistic:
    """Statistic: stat_a(samples) - stat_b(samples). Paired when both read the same resample."""
    return _named(lambda samples: stat_a(samples) - stat_b(samples),
                  f"difference({getattr(stat_a, '__name__', stat_a)}, "
                  f"{getattr(stat_b, '__name__', stat_b)})")


def auroc(pos, neg) -> float:
    """P(S_pos > S_neg) + P(S_pos = S_neg) / 2 over all (positive, negative) pairs.

    Values of any shape are pooled (flattened). With the negatives sorted, for each positive p
        below(p) = #{neg < p} = searchsorted(neg, p, "left")
        upto(p)  = #{neg <= p} = searchsorted(neg, p, "right")
    and a tie (upto - below) counts 1/2, so
        AUROC = sum_p (below(p) + upto(p)) / (2 n_pos n_neg)       in O((n_pos + n_neg) log n_neg).
    It equals `sklearn.metrics.roc_auc_score` (tested) and is kept because the bootstrap calls it
    thousands of times per interval: 0.6 ms against sklearn's 5 ms for 3,600 vs 18,000 values.
    """
    pos = np.asarray(pos, dtype=np.float64).ravel()
    neg = np.sort(np.asarray(neg, dtype=np.float64).ravel())
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"auroc needs values on both sides, got {pos.size} positive and "
                         f"{neg.size} negative")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("auroc got non-finite values (nan or inf)")
    below = np.searchsorted(neg, pos, side="left")
    upto = np.searchsorted(neg, pos, side="right")
    # Integer sums are exact; the one division is the only rounding.
    return float((below.sum() + upto.sum()) / (2 * pos.size * neg.size))


def auroc_of(positive_name: str, negative_name: str) -> Statistic:
    """Statistic: `auroc` of all of samples[positive_name] vs all of samples[negative_name]."""
    return _named(lambda samples: auroc(samples[positive_name], samples[negative_name]),
                  f"auroc_of({positive_name!r}, {negative_name!r})")


# --------------------------------------------------------------------------------------------------
# Verdicts


def verdict(interval: Interval, direction: int) -> str:
    """Reading of an interval against a claim of sign `direction` (+1: positive, -1: negative).

        reproduced    the interval excludes 0 on the claimed side   (direction * value > 0 for all)
        contradicted  it excludes 0 on the other side               (direction * value < 0 for all)
        inconclusive  it contains 0, including a bound exactly at 0
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    low, high = sorted((direction * interval.ci_low, direction * interval.ci_high))
    if low > 0:
        return "reproduced"
    if high < 0:
        return "contradicted"
    return "inconclusive"


def compound_verdict(verdicts: Sequence[str]) -> str:
    """Reading of a claim that needs every condition: "reproduced" if all are reproduced,
    "contradicted" if any is contradicted, else "inconclusive"."""
    verdicts = list(verdicts)
    if not verdicts:
        raise ValueError("compound_verdict needs at least one verdict")
    unknown = [v for v in verdicts if v not in VERDICTS]
    if unknown:
        raise ValueError(f"unknown verdicts {unknown}: each must be one of {VERDICTS}")
    if any(v == "contradicted" for v in verdicts):
        return "contradicted"
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    return "inconclusive"
