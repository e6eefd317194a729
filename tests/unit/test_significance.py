"""Paired bootstrap intervals of a system's gain over the bi-encoder, checked against theory."""

from __future__ import annotations

import numpy as np
import pytest

from d2llm.evaluation import metrics as M
from d2llm.evaluation.significance import (
    bootstrap_mean_difference,
    bootstrap_pair_metric_difference,
    cluster_resamples,
    pair_metric,
)


def test_identical_systems_have_a_zero_interval_and_p_one():
    values = np.linspace(0.0, 100.0, 50)
    out = bootstrap_mean_difference(values, values.copy(), "query", resamples=200, seed=1)
    assert out["delta"] == 0.0 and out["ci95"] == [0.0, 0.0] and out["p_value"] == 1.0
    assert (out["unit"], out["n_units"], out["resamples"]) == ("query", 50, 200)


def test_mean_difference_interval_matches_the_normal_approximation():
    # Per-query differences with mean 1 and sd 4 over 400 queries: the 95% interval is about
    # 1 +- 1.96 * 4 / sqrt(400) = [0.61, 1.39], and it excludes 0.
    rng = np.random.default_rng(0)
    baseline = rng.uniform(20, 80, size=400)
    diff = rng.normal(0, 4, size=400)
    diff = (diff - diff.mean()) / diff.std() * 4 + 1.0  # exactly mean 1, sd 4
    out = bootstrap_mean_difference(baseline + diff, baseline, "query", resamples=4000, seed=0)
    assert out["delta"] == pytest.approx(1.0)
    low, high = out["ci95"]
    assert low == pytest.approx(1 - 1.96 * 4 / 20, abs=0.06)
    assert high == pytest.approx(1 + 1.96 * 4 / 20, abs=0.06)
    assert out["p_value"] < 0.01


def test_noise_gives_an_interval_around_zero_and_a_large_p():
    rng = np.random.default_rng(3)
    baseline = rng.uniform(0, 1, size=60)
    noise = rng.normal(0, 0.2, size=60)
    noise -= noise.mean()  # observed difference exactly 0
    out = bootstrap_mean_difference(baseline + noise, baseline, "question", resamples=1000, seed=0)
    low, high = out["ci95"]
    assert low < 0 < high and out["p_value"] > 0.5


def test_the_interval_is_seeded():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=30), rng.normal(size=30)
    first = bootstrap_mean_difference(a, b, "query", resamples=300, seed=7)
    assert bootstrap_mean_difference(a, b, "query", resamples=300, seed=7) == first
    assert bootstrap_mean_difference(a, b, "query", resamples=300, seed=8)["ci95"] != first["ci95"]


def test_pair_metric_bootstrap_recomputes_ap_on_each_resample():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    good = labels + rng.normal(0, 0.3, 300)  # separates the classes well
    weak = labels + rng.normal(0, 1.5, 300)
    out = bootstrap_pair_metric_difference(pair_metric("ap"), good, weak, labels, resamples=300, seed=0)
    expected = 100 * (M.average_precision(good, labels) - M.average_precision(weak, labels))
    assert out["delta"] == pytest.approx(expected)
    assert out["unit"] == "pair" and out["n_units"] == 300
    assert 0 < out["ci95"][0] < out["delta"] < out["ci95"][1] and out["p_value"] < 0.01
    # Swapping the systems mirrors the interval.
    back = bootstrap_pair_metric_difference(pair_metric("ap"), weak, good, labels, resamples=300, seed=0)
    assert back["delta"] == pytest.approx(-out["delta"])
    assert back["ci95"] == pytest.approx([-out["ci95"][1], -out["ci95"][0]])


def test_pair_metric_bootstrap_for_spearman():
    rng = np.random.default_rng(1)
    gold = rng.uniform(0, 5, 200)
    out = bootstrap_pair_metric_difference(
        pair_metric("spearman"), gold + rng.normal(0, 0.5, 200), rng.normal(size=200), gold, 200, 0
    )
    assert out["ci95"][0] > 50  # a correlated scorer against a random one: a gain of ~90 points


def test_resamples_where_the_metric_is_undefined_are_dropped():
    # One positive in 12 pairs: about 1 resample in e (1 - 1/12)^12 ~ 35% has no positive (AP undefined).
    labels = np.array([True] + [False] * 11)
    scores = np.linspace(1, 0, 12)
    out = bootstrap_pair_metric_difference(pair_metric("ap"), scores, scores[::-1].copy(), labels, 400, 0)
    assert 150 < out["resamples"] < 350
    assert np.isfinite(out["ci95"]).all()


def test_a_cluster_resample_draws_premises_each_with_all_of_its_pairs():
    # Pairs 0, 2, 5 share premise p1, pairs 1 and 4 share p2, pair 3 has p3 alone: three units.
    # Seed 2 draws the units [p3, p1, p1], then [p1, p2, p3] (np.random.default_rng(2)).
    premises = ["p1", "p2", "p1", "p3", "p2", "p1"]
    first, second = (rows.tolist() for rows in cluster_resamples(premises, resamples=2, seed=2))
    assert first == [3, 0, 2, 5, 0, 2, 5]  # p3, then p1 twice: all three of its pairs each time
    assert second == [0, 2, 5, 1, 4, 3]
    # On any resample the pairs of one premise are drawn equally often (together or not at all).
    for rows in cluster_resamples(premises, resamples=200, seed=0):
        counts = np.bincount(rows, minlength=6)
        assert counts[0] == counts[2] == counts[5] and counts[1] == counts[4], counts
        assert counts[0] + counts[1] + counts[3] == 3  # three units drawn, one row of each counted
    # Every pair its own unit: the plain bootstrap, draw for draw.
    plain = np.random.default_rng(9).integers(0, 5, size=(20, 5))
    assert [rows.tolist() for rows in cluster_resamples(range(5), 20, 9)] == plain.tolist()


def test_copies_of_a_pair_under_one_premise_do_not_narrow_the_interval():
    """Each pair repeated 4 times under its own premise carries no more information than one
    copy: the cluster bootstrap gives exactly the interval of the single copies (AP does not
    change when every pair is repeated), while resampling the 480 rows as independent pairs
    would make it about half as wide (1/sqrt(4))."""
    rng = np.random.default_rng(0)
    labels = rng.random(120) < 0.4
    good, weak = labels + rng.normal(0, 0.8, 120), labels + rng.normal(0, 1.2, 120)
    ap = pair_metric("ap")
    single = bootstrap_pair_metric_difference(ap, good, weak, labels, 500, 0)
    copies = [np.repeat(x, 4) for x in (good, weak, labels)]
    premises = [f"premise {i}" for i in np.repeat(np.arange(120), 4)]
    clustered = bootstrap_pair_metric_difference(ap, *copies, 500, 0, premises, "text_a")
    assert (clustered["unit"], clustered["n_units"]) == ("text_a", 120)
    assert clustered["delta"] == pytest.approx(single["delta"])
    assert clustered["ci95"] == pytest.approx(single["ci95"])
    naive = bootstrap_pair_metric_difference(ap, *copies, 500, 0)
    assert (naive["unit"], naive["n_units"]) == ("pair", 480)

    def width(out):
        return out["ci95"][1] - out["ci95"][0]

    assert width(naive) < 0.65 * width(clustered)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bootstrap_mean_difference(np.ones(3), np.ones(4), "query"), "one length"),
        (lambda: bootstrap_mean_difference(np.ones(1), np.ones(1), "query"), "at least 2 units"),
        (lambda: bootstrap_mean_difference(np.ones(3), np.ones(3), "query", resamples=0), "positive"),
        (lambda: pair_metric("ndcg@10"), "no pair-level bootstrap"),
        (
            lambda: bootstrap_pair_metric_difference(pair_metric("ap"), np.ones(3), np.ones(3), np.ones(2)),
            "one length",
        ),
        (
            lambda: bootstrap_pair_metric_difference(
                pair_metric("ap"), np.ones(3), np.ones(3), np.ones(3), clusters=["a", "b"]
            ),
            "2 cluster keys for 3 pairs",
        ),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _report(with_intervals: bool) -> dict:
    def gain(delta):
        return {"delta": delta, "ci95": [delta - 1.0, delta + 2.0], "p_value": 0.1}

    datasets = {
        "sick": {"main_metric": "ap", "vs_bi_encoder": {"teacher": gain(10.0), "student": gain(4.0)}},
        "cisi": {"main_metric": "ndcg@10", "vs_bi_encoder": {"bm25": gain(-3.0), "student": gain(0.5)}},
    }
    if not with_intervals:
        for entry in datasets.values():
            entry.pop("vs_bi_encoder")
    return {"datasets": datasets}


def test_gain_figure_draws_each_system_with_its_interval():
    from d2llm.evaluation.plots import gain_figure

    figure = gain_figure(_report(with_intervals=True))
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["cisi (ndcg@10)", "sick (ap)"]  # top: first
    assert [c.get_label() for c in axes.containers] == ["teacher", "student"]  # BM25 is not drawn
    student = axes.containers[1]
    x, _ = student.lines[0].get_data()
    assert list(x) == [4.0, 0.5]  # sick (top row), then cisi
    (bars,) = student.lines[2]
    spans = [segment[:, 0].tolist() for segment in bars.get_segments()]
    assert spans == [[3.0, 6.0], [-0.5, 2.5]]  # each point's 95% interval
    assert gain_figure(_report(with_intervals=False)) is None


def test_unit_gain_aligns_units_by_id_in_points():
    from d2llm.evaluation.significance import bootstrap_unit_gain

    base = {"q1": 0.2, "q2": 0.5, "q3": 0.9}
    values = {"q3": 1.0, "q1": 0.4, "q2": 0.5, "extra": 0.0}  # other order; extra units ignored
    out = bootstrap_unit_gain(values, base, "query", resamples=300, seed=0)
    mine, theirs = np.array([40.0, 50.0, 100.0]), np.array([20.0, 50.0, 90.0])
    direct = bootstrap_mean_difference(mine, theirs, "query", 300)
    assert out["delta"] == pytest.approx(10.0) and out["ci95"] == pytest.approx(direct["ci95"])
    assert (out["n_units"], out["unit"]) == (3, "query")
    with pytest.raises(ValueError, match=r"1 query\(s\) of the baseline have no value, e.g. 'q2'"):
        bootstrap_unit_gain({"q1": 0.1, "q3": 0.2}, base, "query")
