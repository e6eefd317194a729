"""Metric functions against values worked out by hand (ties, edge cases, empty relevance)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from d2llm.evaluation import metrics as M

# --------------------------------------------------------------------------- average precision


def test_average_precision_without_ties():
    # Ranked: + - + -  ->  P@1 = 1, P@3 = 2/3  ->  AP = (1 + 2/3) / 2
    assert M.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)


def test_average_precision_ties_do_not_depend_on_order():
    # The tied 0.8 pair (one +, one -) counts as one threshold: TP=2, FP=1 -> P = 2/3.
    # AP = 0.5 * 1 (at 0.9) + 0.5 * 2/3 (at 0.8) = 5/6, whichever tied row comes first.
    assert M.average_precision([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert M.average_precision([0.9, 0.8, 0.8, 0.1], [1, 1, 0, 0]) == pytest.approx(5 / 6)
    # Everything tied: one threshold, precision = base rate.
    assert M.average_precision([0.5] * 4, [1, 0, 0, 0]) == pytest.approx(0.25)


def test_average_precision_all_positive_and_all_negative():
    assert M.average_precision([0.3, 0.1, 0.2], [1, 1, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no positive label"):
        M.average_precision([0.3, 0.1], [0, 0])


def test_pair_inputs_are_checked():
    with pytest.raises(ValueError, match="differ in length"):
        M.average_precision([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="binary"):
        M.average_precision([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        M.best_threshold_accuracy([0.1, math.nan], [1, 0])
    with pytest.raises(ValueError, match="empty"):
        M.best_threshold_accuracy([], [])


# --------------------------------------------------------------------------- best-threshold accuracy


def test_best_accuracy_picks_the_highest_best_threshold():
    # Descending: 0.8(+) 0.4(-) 0.35(+) 0.1(-). Correct counts for t = inf, .8, .4, .35, .1:
    # 2, 3, 2, 3, 2 -> best 3/4, first reached at t = 0.8.
    acc, threshold = M.best_threshold_accuracy([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert acc == pytest.approx(0.75)
    assert threshold == pytest.approx(0.8)


def test_best_accuracy_cannot_split_tied_scores():
    # A tie-blind sweep over the sorted rows would put the + of the tied 0.8 pair above the -,
    # and claim accuracy 1.0. Equal scores must get the same prediction: the best is 3/4.
    acc, threshold = M.best_threshold_accuracy([0.9, 0.8, 0.8, 0.1], [1, 1, 0, 0])
    assert acc == pytest.approx(0.75)
    assert threshold == pytest.approx(0.9)
    acc_swapped, _ = M.best_threshold_accuracy([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0])
    assert acc_swapped == pytest.approx(0.75)


def test_best_accuracy_all_positive_and_all_negative():
    acc, threshold = M.best_threshold_accuracy([0.3, 0.1, 0.2], [1, 1, 1])
    assert (acc, threshold) == (1.0, pytest.approx(0.1))  # everything at or above the lowest
    acc, threshold = M.best_threshold_accuracy([0.3, 0.1, 0.2], [0, 0, 0])
    assert acc == 1.0 and threshold == math.inf  # nothing predicted positive


def test_pair_classification_metrics_are_points():
    out = M.pair_classification_metrics(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False]))
    assert out["ap"] == pytest.approx(100 * 5 / 6)
    assert out["accuracy"] == pytest.approx(75.0)
    assert out["n_pairs"] == 4 and out["n_positive"] == 2
    # A threshold chosen elsewhere (evaluation: on the dev split) is applied as it is: >= 0.75
    # predicts the first two pairs positive, 2 of 4 right; >= 0.85 only the first, 3 of 4.
    given = M.pair_classification_metrics([0.9, 0.8, 0.7, 0.6], [True, False, True, False], threshold=0.75)
    assert (given["accuracy"], given["threshold"], given["ap"]) == (pytest.approx(50.0), 0.75, out["ap"])
    assert M.accuracy_at([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], 0.85) == pytest.approx(0.75)


# --------------------------------------------------------------------------- correlations


def test_pearson_by_hand():
    # x = 1,2,3; y = 2,4,7: dx = -1,0,1; dy = -7/3,-1/3,8/3; r = 5 / sqrt(2 * 114/9) = 15/sqrt(228)
    assert M.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228))


def test_spearman_uses_average_ranks_for_ties():
    # ranks(x) = 1, 2.5, 2.5, 4 ; ranks(y) = 1, 2, 3, 4 -> r = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert M.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert M.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert M.spearman([3, 1, 2], [10, 30, 20]) == pytest.approx(-1.0)


def test_spearman_matches_scipy_on_random_data_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 200), rng.normal(size=200).round(1)
    assert M.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)


def test_correlation_of_a_constant_is_nan_and_one_pair_is_an_error():
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(M.pearson([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError, match="at least 2"):
        M.pearson([1.0], [2.0])


def test_sts_metrics_are_points():
    out = M.sts_metrics([1, 2, 2, 3], [1, 2, 3, 4])
    assert out["spearman"] == pytest.approx(100 * math.sqrt(0.9))
    assert out["n_pairs"] == 4


# --------------------------------------------------------------------------- IR


def test_ir_metrics_by_hand_with_empty_relevance_and_empty_run():
    qrels = {
        "q1": {"d1": 1, "d2": 0, "d3": 2},
        "q2": {"d4": 0},  # no relevant document: excluded and counted
        "q3": {"d5": 1},  # relevant document but nothing ranked: scores 0
    }
    run = {"q1": {"d2": 3.0, "d1": 2.0, "d3": 1.0}, "q2": {"d4": 1.0}}
    out = M.ir_metrics(qrels, run)
    # q1: DCG = 0 + 1/log2(3) + 2/log2(4); IDCG = 2 + 1/log2(3) (linear gains, as trec_eval).
    ndcg_q1 = (1 / math.log2(3) + 1.0) / (2 + 1 / math.log2(3))
    assert out["ndcg@10"] == pytest.approx(100 * ndcg_q1 / 2)
    assert out["mrr@10"] == pytest.approx(100 * 0.5 / 2)  # first relevant at rank 2
    assert out["recall@100"] == pytest.approx(100 * 1.0 / 2)
    assert out["n_queries"] == 2
    assert out["n_queries_no_relevant"] == 1
    assert out["n_queries_empty_run"] == 1


def test_ir_metrics_respect_the_cutoffs():
    docs = {f"d{i:02d}": float(100 - i) for i in range(20)}  # d00 best ... d19 worst
    out = M.ir_metrics({"q": {"d10": 1}}, {"q": docs})  # the relevant doc is at rank 11
    assert out["ndcg@10"] == 0.0 and out["mrr@10"] == 0.0
    assert out["recall@100"] == pytest.approx(100.0)
    out = M.ir_metrics({"q": {"d02": 1}}, {"q": docs})  # rank 3
    assert out["mrr@10"] == pytest.approx(100 / 3)
    assert out["ndcg@10"] == pytest.approx(100 / math.log2(4))


def test_ir_metrics_need_one_relevant_query():
    with pytest.raises(ValueError, match="no query has a relevant document"):
        M.ir_metrics({"q": {"d": 0}}, {"q": {"d": 1.0}})


def test_ranking_to_run():
    # Rank-derived scores: the ranking's order (here with tied scores) is what gets evaluated.
    run = M.ranking_to_run(["q1", "q2"], ["a", "b", "c"], [[(0, 0.5), (2, 0.5), (1, 0.1)], []])
    assert run == {"q1": {"a": 3.0, "c": 2.0, "b": 1.0}, "q2": {}}
    ours = M.ir_metrics({"q1": {"a": 1}}, run)
    assert ours["mrr@10"] == pytest.approx(100.0) and ours["ndcg@10"] == pytest.approx(100.0)
    # Given the raw tied scores, the two backends disagree on who is first: pytrec_eval (nDCG)
    # breaks ties by doc id descending ("c" first), the msmarco backend (RR) does not.
    raw = M.ir_metrics({"q1": {"a": 1}}, {"q1": {"a": 0.5, "c": 0.5}})
    assert raw["ndcg@10"] == pytest.approx(100 / math.log2(3)) and raw["mrr@10"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 query ids but 1 rankings"):
        M.ranking_to_run(["q1", "q2"], ["a"], [[]])


# --------------------------------------------------------------------------- gain recovered


def test_gain_recovered():
    assert M.gain_recovered(50.0, 80.0, 74.0) == pytest.approx(0.8)
    assert M.gain_recovered(50.0, 80.0, 50.0) == pytest.approx(0.0)
    assert M.gain_recovered(50.0, 80.0, 86.0) == pytest.approx(1.2)
    assert M.gain_recovered(50.0, 50.0, 60.0) is None  # no gain to recover
    assert M.gain_recovered(50.0, 50.2, 50.4) == pytest.approx(2.0)
    assert M.gain_recovered(50.0, 50.2, 50.4, min_gain=1.0) is None  # a share of noise
    assert M.gain_recovered(50.0, 52.0, 51.0, min_gain=1.0) == pytest.approx(0.5)
    assert M.gain_recovered(50.0, 40.0, 60.0) is None
    assert M.gain_recovered(50.0, None, 60.0) is None
    assert M.gain_recovered(50.0, math.nan, 60.0) is None


def test_answer_selection_map_and_mrr_by_hand():
    from d2llm.evaluation.metrics import answer_selection_metrics

    questions = ["q1"] * 4 + ["q2"] * 3 + ["q3"] * 2
    scores = [0.9, 0.8, 0.7, 0.1, 0.5, 0.6, 0.2, 0.3, 0.4]
    labels = [0, 1, 0, 1, 1, 0, 0, 1, 1]
    out = answer_selection_metrics(questions, scores, labels)
    # q1 ranking: 0 1 0 1 -> AP = (1/2 + 2/4) / 2 = 0.5, RR = 1/2.
    # q2 ranking: 0 1 0 -> AP = 1/2, RR = 1/2.  q3: all right, no ranking information: skipped.
    assert out["map"] == pytest.approx(100 * (0.5 + 0.5) / 2)
    assert out["mrr"] == pytest.approx(100 * (0.5 + 0.5) / 2)
    assert (out["n_questions"], out["n_questions_skipped"], out["n_pairs"]) == (2, 1, 9)


def test_answer_selection_ties_rank_wrong_candidates_first():
    from d2llm.evaluation.metrics import answer_selection_metrics

    out = answer_selection_metrics(["q"] * 3, [1.0, 1.0, 1.0], [1, 0, 0])
    assert out["mrr"] == pytest.approx(100 / 3)  # a constant scorer earns the worst rank
    assert out["map"] == pytest.approx(100 / 3)
