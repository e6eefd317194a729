"""The promotion rule as a pure function: hand-worked metric sets, no registry."""

from __future__ import annotations

import json

import pytest

from d2llm.config import PromotionConfig
from d2llm.errors import ArtifactError
from d2llm.tracking.promotion import Decision, decide_promotion, metrics_from_tags, metrics_to_tags

CFG = PromotionConfig(main_metric="mean_main", tolerance=0.5)
CHAMPION = {"mean_main": 60.0, "sick/ap": 70.0, "stsb_en/spearman": 80.0, "cisi/ndcg@10": 30.0}


def test_first_model_is_promoted():
    decision = decide_promotion(None, {"mean_main": 1.0}, CFG)
    assert decision.promote
    assert decision.main_delta is None
    assert "first model" in decision.reason


def test_better_main_metric_and_no_regression_promotes():
    challenger = {"mean_main": 61.25, "sick/ap": 70.0, "stsb_en/spearman": 80.5, "cisi/ndcg@10": 33.0}
    decision = decide_promotion(CHAMPION, challenger, CFG)
    assert decision.promote
    assert decision.main_delta == pytest.approx(1.25)
    assert decision.deltas == pytest.approx({"cisi/ndcg@10": 3.0, "sick/ap": 0.0, "stsb_en/spearman": 0.5})
    assert decision.regressions == {}


def test_regression_within_tolerance_is_allowed():
    # sick/ap drops 0.5 points: exactly the tolerance, which is still allowed.
    challenger = {"mean_main": 60.1, "sick/ap": 69.5, "stsb_en/spearman": 80.0, "cisi/ndcg@10": 30.0}
    assert decide_promotion(CHAMPION, challenger, CFG).promote


def test_regression_beyond_tolerance_refuses_even_if_main_improves():
    challenger = {"mean_main": 65.0, "sick/ap": 69.0, "stsb_en/spearman": 80.0, "cisi/ndcg@10": 40.0}
    decision = decide_promotion(CHAMPION, challenger, CFG)
    assert not decision.promote
    assert decision.regressions == pytest.approx({"sick/ap": -1.0})
    assert "sick/ap" in decision.reason and "regressed" in decision.reason


def test_equal_or_worse_main_metric_refuses():
    same = dict(CHAMPION)
    assert not decide_promotion(CHAMPION, same, CFG).promote
    worse = {**CHAMPION, "mean_main": 59.0}
    decision = decide_promotion(CHAMPION, worse, CFG)
    assert not decision.promote
    assert decision.main_delta == pytest.approx(-1.0)
    assert "did not improve" in decision.reason


def test_tolerance_zero_refuses_any_task_drop():
    strict = PromotionConfig(main_metric="mean_main", tolerance=0.0)
    challenger = {**CHAMPION, "mean_main": 61.0, "sick/ap": 69.99}
    assert not decide_promotion(CHAMPION, challenger, strict).promote


def test_metric_sets_over_other_datasets_are_not_compared():
    # A mean over other validation sets is another mean: no verdict either way, in either direction.
    with pytest.raises(ArtifactError, match=r"only the champion: \['cisi/ndcg@10', 'stsb_en/spearman'\]"):
        decide_promotion(CHAMPION, {"mean_main": 70.0, "sick/ap": 75.0}, CFG)
    extra = {**CHAMPION, "mean_main": 99.0, "trecqa/map": 90.0}  # a challenger with an extra dataset
    with pytest.raises(ArtifactError, match=r"only the challenger: \['trecqa/map'\]"):
        decide_promotion(CHAMPION, extra, CFG)


def test_missing_main_metric_is_an_error():
    with pytest.raises(ArtifactError, match="main metric 'mean_main'"):
        decide_promotion(CHAMPION, {"sick/ap": 99.0}, CFG)
    with pytest.raises(ArtifactError, match="champion metrics lack"):
        decide_promotion({"sick/ap": 1.0}, {"mean_main": 1.0}, CFG)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "61", None, True])
def test_non_numeric_metrics_are_errors(bad):
    with pytest.raises(ArtifactError, match="finite number"):
        decide_promotion(CHAMPION, {**CHAMPION, "sick/ap": bad}, CFG)


def test_other_main_metric_name_is_used():
    cfg = PromotionConfig(main_metric="sick/ap", tolerance=1.0)
    challenger = {**CHAMPION, "sick/ap": 71.0, "mean_main": 59.5}  # mean drops 0.5 <= 1.0
    decision = decide_promotion(CHAMPION, challenger, cfg)
    assert decision.promote and decision.main_metric == "sick/ap"
    assert decision.deltas["mean_main"] == pytest.approx(-0.5)


def test_decision_json_round_trip():
    decision = Decision(False, "why", "mean_main", -1.5, {"a": -1.5}, {"a": -1.5})
    assert json.loads(decision.to_json()) == {
        "promote": False,
        "reason": "why",
        "main_metric": "mean_main",
        "main_delta": -1.5,
        "deltas": {"a": -1.5},
        "regressions": {"a": -1.5},
    }


def test_metric_tags_round_trip_exactly():
    metrics = {"mean_main": 61.123456789012345, "cisi/ndcg@10": 1 / 3}
    tags = metrics_to_tags(metrics)
    # Names are stored the way MLflow accepts them: "@" is not allowed in a tag key.
    assert set(tags) == {"metric.mean_main", "metric.cisi/ndcg_10"}
    expected = {"mean_main": 61.123456789012345, "cisi/ndcg_10": 1 / 3}
    assert metrics_from_tags({**tags, "other": "x"}) == expected
