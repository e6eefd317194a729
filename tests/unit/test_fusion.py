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
