"""Evaluation metrics: pure functions on numpy arrays and dicts.

Three families, matching how the paper reports results (through C-MTEB):

- pair classification (NLI as "entailment vs the rest"): average precision of the scores
  against binary labels, and the accuracy of the best single threshold;
- STS: Spearman (average ranks for ties) and Pearson correlation with the gold scores;
- IR: nDCG@10, RR@10 (MRR@10) and R@100, computed by the maintained ``ir-measures`` library
  (pytrec_eval backend for nDCG and recall, its msmarco backend for the cut-off RR), never by hand.

Scale: the low-level functions (``average_precision``, ``best_threshold_accuracy``,
``spearman``, ``pearson``) return natural values (0..1 or -1..1); the task-level functions
(``pair_classification_metrics``, ``sts_metrics``, ``ir_metrics``) return "points", i.e. x100,
so that every number in the three-system table is on one scale.

Ties are handled so that a metric never depends on the order of equal scores: AP and the
best threshold only move at distinct score values, Spearman uses average ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# ir-measures names of the three IR metrics, and the keys we report them under.
IR_MEASURES: dict[str, str] = {"ndcg@10": "nDCG@10", "mrr@10": "RR@10", "recall@100": "R@100"}


def _as_pair_arrays(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray):
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if s.size == 0:
        raise ValueError("no pairs to evaluate: scores and labels are empty")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return s, y


def _binary(labels: np.ndarray) -> np.ndarray:
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1}:  # True == 1 and False == 0 in a set
        raise ValueError(f"labels must be binary (0/1 or bool), got values {sorted(values)[:5]}")
    return labels.astype(bool)


def _tie_groups(scores: np.ndarray, positives: np.ndarray):
    """Cumulative (TP, FP) at the end of each group of equal scores, scores descending.

    Predicting "positive iff score >= t" can only take a value at distinct scores; counting at
    the end of each tie group is what makes AP and the best threshold order-independent.
    """
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positives[order]
    tp = np.cumsum(pos)
    fp = np.cumsum(~pos)
    # Last index of each run of equal scores.
    group_end = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    return s[group_end], tp[group_end], fp[group_end]


def average_precision(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """AP = sum over distinct thresholds of (recall gain) x (precision at that threshold).

    Raises ValueError when there is no positive label (AP is undefined then).
    """
    s, y = _as_pair_arrays(scores, labels)
    pos = _binary(y)
    n_pos = int(pos.sum())
    if n_pos == 0:
        raise ValueError("average precision is undefined: no positive label among the pairs")
    _, tp, fp = _tie_groups(s, pos)
    precision = tp / (tp + fp)
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_gain * precision))


def best_threshold_accuracy(
    scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """The best accuracy of the rule "positive iff score >= threshold", and that threshold.

    Candidates are every distinct score plus +inf (everything negative). Equal scores always
    fall on the same side, so tied pairs cannot be split to flatter the accuracy. On equal
    accuracy the highest threshold wins.
    """
    s, y = _as_pair_arrays(scores, labels)
    pos = _binary(y)
    n, n_neg = pos.size, int((~pos).sum())
    thresholds, tp, fp = _tie_groups(s, pos)
    correct = np.r_[n_neg, tp + (n_neg - fp)]  # first entry: threshold +inf
    candidates = np.r_[math.inf, thresholds]
    best = int(np.argmax(correct))  # first maximum = highest threshold
    return float(correct[best] / n), float(candidates[best])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], values.size]  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (the correlation is undefined)."""
    a, b = _as_pair_arrays(x, y)
    b = b.astype(np.float64)
    if a.size < 2:
        raise ValueError("a correlation needs at least 2 pairs")
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(da @ da) * float(db @ db))
    if denom == 0.0:
        return math.nan
    return float(da @ db / denom)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman correlation: Pearson on average ranks (the standard tie correction)."""
    a, b = _as_pair_arrays(x, y)
    return pearson(_average_ranks(a), _average_ranks(b.astype(np.float64)))


def accuracy_at(
    scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray, threshold: float
) -> float:
    """The accuracy of the rule "positive iff score >= threshold" (natural units)."""
    s, y = _as_pair_arrays(scores, labels)
    return float(np.mean((s >= threshold) == _binary(y)))


def pair_classification_metrics(scores, labels, threshold: float | None = None) -> dict[str, float]:
    """AP and accuracy in points (x100), plus the threshold and pair counts.

    ``threshold``: the accuracy rule's threshold, chosen on other pairs (evaluation picks it on
    the dev split). None takes the best threshold on these very pairs: an oracle accuracy,
    optimistic on a test set.
    """
    s, y = _as_pair_arrays(scores, labels)
    if threshold is None:
        accuracy, threshold = best_threshold_accuracy(s, y)
    else:
        accuracy = accuracy_at(s, y, threshold)
    return {
        "ap": 100.0 * average_precision(s, y),
        "accuracy": 100.0 * accuracy,
        "threshold": threshold,
        "n_pairs": int(s.size),
        "n_positive": int(_binary(y).sum()),
    }


def answer_selection_per_question(
    questions: Sequence[str], scores, labels
) -> tuple[dict[str, tuple[float, float]], int]:
    """Each question's (AP, reciprocal rank) in natural units, and how many were skipped.

    Only questions with both a right and a wrong candidate count (the standard TREC-QA
    protocol); ties put the wrong candidates first (pessimistic), so a constant scorer earns no
    credit. Questions keep their first-seen order.
    """
    s, y = _as_pair_arrays(scores, labels)
    if len(questions) != s.size:
        raise ValueError(f"{len(questions)} questions for {s.size} scores")
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(q, []).append(i)
    positive = _binary(y)
    out: dict[str, tuple[float, float]] = {}
    for question, rows in groups.items():
        idx = np.asarray(rows)
        pos = positive[idx]
        if pos.all() or not pos.any():
            continue
        order = np.lexsort((pos, -s[idx]))  # by score, descending; wrong candidates first on ties
        ranked = pos[order]
        hits = np.cumsum(ranked)
        precision_at_hits = hits[ranked] / (np.flatnonzero(ranked) + 1)
        out[question] = (float(precision_at_hits.mean()), 1.0 / (int(np.argmax(ranked)) + 1))
    return out, len(groups) - len(out)


def answer_selection_metrics(questions: Sequence[str], scores, labels) -> dict[str, float]:
    """MAP and MRR over the questions that have both a right and a wrong candidate, in points.

    Questions whose candidates are all right or all wrong carry no ranking information and are
    left out (counted in ``n_questions_skipped``; see :func:`answer_selection_per_question`).
    ``ap`` is the pooled average precision over every pair, as for pair classification.
    """
    per_question, skipped = answer_selection_per_question(questions, scores, labels)
    aps = [ap for ap, _ in per_question.values()]
    rrs = [rr for _, rr in per_question.values()]
    return {
        "map": 100.0 * float(np.mean(aps)) if aps else math.nan,
        "mrr": 100.0 * float(np.mean(rrs)) if rrs else math.nan,
        "ap": 100.0 * average_precision(scores, labels),
        "n_questions": len(aps),
        "n_questions_skipped": skipped,
        "n_pairs": len(questions),
    }


def sts_metrics(scores, gold) -> dict[str, float]:
    """Spearman and Pearson with the gold similarity, in points (x100)."""
    s, g = _as_pair_arrays(scores, gold)
    return {"spearman": 100.0 * spearman(s, g), "pearson": 100.0 * pearson(s, g), "n_pairs": int(s.size)}


def ir_per_query(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
) -> tuple[dict[str, dict[str, float]], int]:
    """nDCG@10, RR@10 and R@100 of each query that has a relevant document (natural units),
    and the number of judged queries without one.

    - A query with no relevant document (no qrel with relevance > 0) makes every metric
      undefined (0/0 for recall, IDCG = 0 for nDCG): it is left out and counted.
    - A query with relevant documents but no ranked document in ``run`` scores 0 on every
      metric (pytrec_eval would silently skip it, which would inflate the mean).
    - Ties in ``run`` are broken the trec_eval way (by doc id), so results are deterministic.
    """
    import ir_measures

    judged = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    with_relevant = sorted(q for q, docs in judged.items() if any(r > 0 for r in docs.values()))
    if not with_relevant:
        raise ValueError("no query has a relevant document (relevance > 0): IR metrics are undefined")
    eval_qrels = {q: judged[q] for q in with_relevant}
    eval_run = {
        str(q): {str(d): float(s) for d, s in docs.items()}
        for q, docs in run.items()
        if str(q) in eval_qrels and docs
    }
    measures = [ir_measures.parse_measure(name) for name in IR_MEASURES.values()]
    per_query: dict[str, dict[str, float]] = {q: dict.fromkeys(IR_MEASURES, 0.0) for q in with_relevant}
    names = {str(m): key for key, m in zip(IR_MEASURES, measures, strict=True)}
    if eval_run:
        # ir-measures picks a provider per measure: pytrec_eval for nDCG@10 and R@100, its msmarco
        # provider for RR@10 (trec_eval's recip_rank has no cutoff: called directly with RR@10,
        # pytrec_eval silently returns the uncut reciprocal rank).
        for metric in ir_measures.iter_calc(measures, eval_qrels, eval_run):
            per_query[metric.query_id][names[str(metric.measure)]] = float(metric.value)
    return per_query, len(judged) - len(with_relevant)


def ir_metrics(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """nDCG@10, MRR@10 and Recall@100 (points, x100): the means of :func:`ir_per_query` over the
    queries that have a relevant document, with the counts of the queries left out or unranked.
    """
    per_query, no_relevant = ir_per_query(qrels, run)
    return ir_summary(per_query, no_relevant, run)


def ir_summary(
    per_query: Mapping[str, Mapping[str, float]], no_relevant: int, run: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """The means of :func:`ir_per_query`'s values in points, with the query counts (see ir_metrics)."""
    out = {key: 100.0 * float(np.mean([pq[key] for pq in per_query.values()])) for key in IR_MEASURES}
    ranked = {str(q) for q, docs in run.items() if docs}
    out.update(
        n_queries=len(per_query),
        n_queries_no_relevant=no_relevant,
        n_queries_empty_run=len(set(per_query) - ranked),
    )
    return out


def ranking_to_run(
    query_ids: Sequence[str], doc_ids: Sequence[str], ranked: Sequence[Sequence[tuple[int, float]]]
) -> dict[str, dict[str, float]]:
    """Turn per-query lists of (corpus position, score), best first, into an ir-measures run.

    The run's scores are rank-derived (n, n-1, ..., 1), not the systems' scores: the backends
    would otherwise re-break tied scores their own way (trec_eval by doc id), possibly
    differently per backend. The ranking's own deterministic order is what gets evaluated.
    """
    if len(query_ids) != len(ranked):
        raise ValueError(f"{len(query_ids)} query ids but {len(ranked)} rankings")
    run: dict[str, dict[str, float]] = {}
    for q, hits in zip(query_ids, ranked, strict=True):
        run[str(q)] = {str(doc_ids[pos]): float(len(hits) - r) for r, (pos, _) in enumerate(hits)}
    return run


def gain_recovered(
    baseline: float | None, teacher: float | None, student: float | None, min_gain: float = 0.0
) -> float | None:
    """Fraction of the teacher's gain over the baseline that the student recovers.

    (student - baseline) / (teacher - baseline): 1 means the student matches the teacher,
    0 means it is no better than the baseline, above 1 that it beats the teacher. None when a
    value is missing or the teacher does not beat the baseline by more than ``min_gain``: there
    is no gain to recover, or one so small that its share is noise (a 0.2-point gain turns a
    0.4-point difference into 200%).
    """
    if baseline is None or teacher is None or student is None:
        return None
    if any(isinstance(v, float) and math.isnan(v) for v in (baseline, teacher, student)):
        return None
    gain = teacher - baseline
    if gain <= max(min_gain, 1e-9):
        return None
    return float((student - baseline) / gain)
