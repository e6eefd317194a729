"""Is a system really better than the bi-encoder on a test set? Paired bootstrap intervals.

A difference of half a point on 225 queries can be one query ranked differently. The report
therefore gives, next to each system's gain over the bi-encoder on a dataset's main metric, a
95% confidence interval from the paired bootstrap (Efron & Tibshirani 1993; for IR, Sakai,
SIGIR 2006; for NLP, Koehn, EMNLP 2004, and Dror et al., ACL 2018): resample the test units
with replacement, recompute both systems' metric on the *same* resample, and read the
2.5th and 97.5th percentiles of the differences.

    delta*_r = metric(system, units[I_r]) - metric(bi-encoder, units[I_r]),  I_r ~ U{1..n}^n

The unit is what the metric averages over or is computed from: a query (nDCG@10 per query),
a question (AP per question, so MAP), or, for AP and Spearman over pairs, a *cluster* of pairs:
the metric is recomputed on each resample, and pairs that share a text are not independent
(SICK pairs one premise with several hypotheses), so evaluation draws the distinct first texts
(``text_a``) with replacement and each brings all of its pairs: the cluster bootstrap of
hierarchical data (Davison & Hinkley 1997). Resampling the pairs one by one would treat a
premise's pairs as independent draws and give intervals that are too narrow. The two-sided
p-value is the bootstrap's share of resamples on the other side of zero, doubled (capped at 1).
Pure numpy; seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np

from d2llm.evaluation import metrics as M

DEFAULT_RESAMPLES = 1000


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 units, got {n}")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def cluster_resamples(clusters: Sequence[Hashable], resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of each resample of a cluster bootstrap over ``clusters`` (one key per row).

    A resample draws as many clusters as there are distinct keys, with replacement, and each
    drawn cluster brings all of its rows: the rows of one cluster are always drawn together, and
    as often as each other. With every key distinct this is the plain bootstrap of the rows,
    draw for draw (the same indices for the same seed).
    """
    ids: dict[Hashable, int] = {}
    cluster = np.array([ids.setdefault(key, len(ids)) for key in clusters], dtype=np.int64)
    rows = np.argsort(cluster, kind="stable")  # rows grouped by cluster, in row order within one
    sizes = np.bincount(cluster)
    starts = np.cumsum(sizes) - sizes
    for drawn in _resample_indices(len(sizes), resamples, seed):
        lengths = sizes[drawn]
        # Output slot t of the k-th drawn cluster c holds rows[starts[c] + t - (its first slot)].
        shift = np.repeat(starts[drawn] - (np.cumsum(lengths) - lengths), lengths)
        yield rows[np.arange(lengths.sum()) + shift]


def _summary(observed: float, deltas: np.ndarray, unit: str, n: int) -> dict[str, float | int | str]:
    deltas = deltas[np.isfinite(deltas)]  # a resample can make a metric undefined (e.g. no positive)
    low, high = np.percentile(deltas, [2.5, 97.5])
    below, above = float(np.mean(deltas <= 0)), float(np.mean(deltas >= 0))
    return {
        "delta": float(observed),
        "ci95": [float(low), float(high)],
        "p_value": min(1.0, 2.0 * min(below, above)),
        "resamples": int(deltas.size),
        "unit": unit,
        "n_units": n,
    }


def bootstrap_mean_difference(
    values: np.ndarray, baseline: np.ndarray, unit: str, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> dict[str, float | int | str]:
    """Paired bootstrap of ``mean(values) - mean(baseline)`` over units (queries, questions).

    Both arrays hold one number per unit, in the same unit order and in the metric's scale.
    """
    values, baseline = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if values.shape != baseline.shape or values.ndim != 1:
        raise ValueError(
            f"paired values must be two 1-d arrays of one length: {values.shape}, {baseline.shape}"
        )
    diff = values - baseline
    index = _resample_indices(diff.size, resamples, seed)
    return _summary(float(diff.mean()), diff[index].mean(axis=1), unit, diff.size)


def bootstrap_unit_gain(
    values: Mapping[str, float],
    baseline: Mapping[str, float],
    unit: str,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """:func:`bootstrap_mean_difference` of per-unit values keyed by unit id (query, question),
    in points (x100); the baseline's units, in its order, are the ones compared."""
    missing = [u for u in baseline if u not in values]
    if missing:
        raise ValueError(f"{len(missing)} {unit}(s) of the baseline have no value, e.g. {missing[0]!r}")
    return bootstrap_mean_difference(
        np.array([100.0 * values[u] for u in baseline]),
        np.array([100.0 * baseline[u] for u in baseline]),
        unit,
        resamples,
        seed,
    )


def bootstrap_pair_metric_difference(
    metric: Callable[[np.ndarray, np.ndarray], float],
    scores: np.ndarray,
    baseline_scores: np.ndarray,
    labels: np.ndarray,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    clusters: Sequence[Hashable] | None = None,
    unit: str = "pair",
) -> dict[str, float | int | str]:
    """Paired bootstrap of ``metric(scores, labels) - metric(baseline_scores, labels)`` over pairs.

    For metrics that are not a mean over pairs (AP, Spearman): each resample recomputes them.
    ``clusters`` (one key per pair, e.g. its ``text_a``) makes it a cluster bootstrap
    (:func:`cluster_resamples`): the units are the distinct keys, named ``unit``; without it
    every pair is its own unit.
    """
    scores = np.asarray(scores, dtype=np.float64)
    baseline_scores = np.asarray(baseline_scores, dtype=np.float64)
    labels = np.asarray(labels)
    if not (scores.shape == baseline_scores.shape == labels.shape):
        raise ValueError("scores, baseline scores and labels must have one length")
    observed = metric(scores, labels) - metric(baseline_scores, labels)
    if clusters is None:
        clusters = range(scores.size)
    elif len(clusters) != scores.size:
        raise ValueError(f"{len(clusters)} cluster keys for {scores.size} pairs: expected one per pair")
    n_units = len(set(clusters))
    deltas = []
    for rows in cluster_resamples(clusters, resamples, seed):
        try:
            deltas.append(metric(scores[rows], labels[rows]) - metric(baseline_scores[rows], labels[rows]))
        except ValueError:  # e.g. a resample without a positive pair: AP undefined
            deltas.append(np.nan)
    return _summary(observed, np.asarray(deltas), unit, n_units)


def pair_metric(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """The pair-level main metric ``name`` (ap, spearman) in points, for a pair bootstrap."""
    if name == "ap":
        return lambda s, y: 100.0 * M.average_precision(s, y)
    if name == "spearman":
        return lambda s, y: 100.0 * M.spearman(s, y)
    raise ValueError(f"no pair-level bootstrap for metric {name!r}: expected ap or spearman")
