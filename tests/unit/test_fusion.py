"""Teacher / bi-encoder score fusion: the weight is chosen on dev, the fused logits keep the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2llm.evaluation.metrics import spearman
from d2llm.teachers.fusion import GRID, FusedScorer, FusionWeights, fit_fusion


def _toy(seed: int = 0, n: int = 400):
    """Gold = a + b; the teacher sees a plus noise, the bi-encoder b plus noise: each alone is half right."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    gold = a + b
    teacher = 3.0 * (a + 0.3 * rng.normal(size=n)) - 1.0  # log-odds on their own scale
    cosine = 0.5 + 0.1 * (b + 0.3 * rng.normal(size=n))
    return teacher, cosine, gold


def test_fit_fusion_finds_the_mixture_that_beats_both_parts() -> None:
    teacher, cosine, gold = _toy()
    weights, value = fit_fusion(teacher, cosine, lambda s: spearman(s, gold))
    alone = {
        w: spearman(FusionWeights(w, *_stats(teacher, cosine)).log_odds(teacher, cosine), gold) for w in GRID
    }
    assert value == pytest.approx(max(alone.values()))
    assert 0.3 <= weights.weight <= 0.7  # the two halves of the signal count about equally
    assert value > spearman(teacher, gold) + 0.1 and value > spearman(cosine, gold) + 0.1


def test_fusion_keeps_the_teacher_alone_when_the_bi_encoder_adds_nothing() -> None:
    teacher, _, gold = _toy()
    noise = np.random.default_rng(5).normal(size=gold.size)
    weights, value = fit_fusion(teacher, noise, lambda s: spearman(s, gold))
    assert weights.weight == 0.0 and value == pytest.approx(spearman(teacher, gold))


def test_fused_logits_are_a_yes_no_pair_whose_difference_is_the_fused_log_odds() -> None:
    teacher, cosine, _ = _toy(n=8)
    weights = FusionWeights(0.25, *_stats(teacher, cosine))
    logits = torch.tensor(np.stack([teacher / 2 + 1.0, -teacher / 2 + 1.0], axis=1), dtype=torch.float32)
    fused = weights.logits(logits, cosine)
    assert fused.shape == (8, 2) and fused.dtype == torch.float32
    moved = teacher.mean() + teacher.std() * (cosine - cosine.mean()) / cosine.std()
    expected = 0.75 * teacher + 0.25 * moved  # by hand: (1 - w) d + w c'
    np.testing.assert_allclose((fused[:, 0] - fused[:, 1]).numpy(), expected, rtol=1e-5, atol=1e-5)
    # w = 0 gives back the teacher's own probabilities.
    same = FusionWeights(0.0, *_stats(teacher, cosine)).logits(logits, cosine)
    torch.testing.assert_close(torch.softmax(same, -1), torch.softmax(logits, -1), rtol=1e-5, atol=1e-6)


def test_fused_scorer_falls_back_to_the_mean_of_the_same_task_kind_and_round_trips() -> None:
    fusion = FusedScorer(
        {
            "sick": FusionWeights(0.2, 0.0, 1.0, 0.5, 0.1),
            "stsb": FusionWeights(0.6, 1.0, 2.0, 0.4, 0.2),
            "qa": FusionWeights(0.8, 0, 1, 0, 1),
        },
        {"sick": "sym", "stsb": "sym", "qa": "asym"},
    )
    assert fusion.for_dataset("sick", "sym") == fusion.by_dataset["sick"]
    fallback = fusion.for_dataset("sick_r", "sym")  # no dev weights of its own
    assert fallback.weight == pytest.approx(0.4) and fallback.teacher_std == pytest.approx(1.5)
    assert fusion.for_dataset("cranfield", "asym") == fusion.by_dataset["qa"]
    again = FusedScorer.from_json(fusion.to_json())
    assert again.by_dataset == fusion.by_dataset and again.tasks == fusion.tasks


def _stats(teacher: np.ndarray, cosine: np.ndarray) -> tuple[float, float, float, float]:
    return float(teacher.mean()), float(teacher.std()), float(cosine.mean()), float(cosine.std())


# --------------------------------------------------------------------------- dev fusion and the gate


def _dev_set(name: str, gold: np.ndarray, metric: str = "spearman"):
    from d2llm.evaluation.dev import DevSet

    pairs = [(f"{name} a{i}", f"b{i}") for i in range(gold.size)]
    return DevSet(name, "sym", pairs, gold, metric, "sts")  # type: ignore[arg-type]


def test_fit_dev_fusion_fits_each_dev_set_on_its_own_and_reports_the_fused_metric() -> None:
    from d2llm.teachers.finetune import fit_dev_fusion, fused_dev_metrics

    teacher, cosine, gold = _toy(seed=1)
    # Set "mix": both halves of the signal; set "bi": the teacher is noise, the cosine is right.
    noise = np.random.default_rng(7).normal(size=gold.size)
    devs = [_dev_set("mix", gold), _dev_set("bi", cosine)]
    log_odds = {"mix/spearman": teacher, "bi/spearman": noise}
    cosines = {"mix/spearman": cosine, "bi/spearman": cosine}
    fusion, fused = fit_dev_fusion(devs, log_odds, cosines)
    assert 0.3 <= fusion.by_dataset["mix"].weight <= 0.7
    assert fusion.by_dataset["bi"].weight == 1.0  # w = 1 is the bi-encoder alone
    assert fused["bi/spearman"] == pytest.approx(100.0)
    assert fused["main"] == pytest.approx((fused["mix/spearman"] + fused["bi/spearman"]) / 2)
    assert fusion.tasks == {"mix": "sym", "bi": "sym"}
    # Applied to the same scores, the fitted weights give the fitted metric back.
    assert fused_dev_metrics(fusion, devs, log_odds, cosines) == pytest.approx(fused)


def test_the_gate_reads_the_fused_teacher_on_the_validate_part() -> None:
    from d2llm.teachers.dev_report import teacher_gains

    # On the select part the fused gain is >= 0 by construction (w = 1 is the bi-encoder) and
    # the grid's best; on the validate part, fitted elsewhere, it is what the teacher is worth.
    report = {
        "dev_after": {"a/ap": 70.0, "b/ap": 95.0, "main": 82.5},
        "dev_fused": {"a/ap": 81.0, "b/ap": 95.0, "main": 88.0},
        "dev_baseline": {"a/ap": 80.0, "b/ap": 80.0, "main": 80.0},
        "validate_after": {"a/ap": 69.0, "b/ap": 94.0, "main": 81.5},
        "validate_fused": {"a/ap": 79.5, "b/ap": 94.0, "main": 86.75},
        "validate_baseline": {"a/ap": 80.0, "b/ap": 81.0, "main": 80.5},
    }
    gains = teacher_gains(report, min_gain=0.25)
    assert gains["a"] == {"metric": "ap", "part": "validate", "teacher": 79.5, "bi-encoder": 80.0,
                          "gain": pytest.approx(-0.5), "distil": False}  # fmt: skip
    assert gains["b"]["gain"] == pytest.approx(13.0) and gains["b"]["distil"]
    # Without fusion the raw teacher is judged; without a min gain there is no verdict.
    raw = {k: v for k, v in report.items() if "fused" not in k}
    assert teacher_gains(raw, 0.25)["a"]["teacher"] == 69.0
    assert "distil" not in teacher_gains(report)["a"]
    # A report from before the split gates on what it has (the select figures).
    old = {k: v for k, v in report.items() if k.startswith("dev_")}
    assert teacher_gains(old, 0.25)["a"] == {"metric": "ap", "part": "select", "teacher": 81.0,
                                             "bi-encoder": 80.0, "gain": 1.0, "distil": True}  # fmt: skip


def test_the_dev_table_shows_raw_and_fused_teacher_next_to_the_bi_encoder_on_both_parts() -> None:
    from d2llm.teachers.dev_report import format_dev_table

    report = {
        "dev_baseline": {"a/ap": 70.0, "main": 70.0},
        "dev_after": {"a/ap": 80.0, "main": 80.0},
        "dev_fused": {"a/ap": 81.5, "main": 81.5},
        "validate_baseline": {"a/ap": 71.0, "main": 71.0},
        "validate_after": {"a/ap": 79.0, "main": 79.0},
    }
    lines = format_dev_table(report).splitlines()
    assert lines[0].count("|") == 8 and "validate: fused teacher" in lines[0]
    assert lines[2] == "| a/ap | 70.00 | 80.00 | 81.50 | 71.00 | 79.00 | - |"
    assert lines[3].startswith("| mean | 70.00")
