"""The teacher's listwise loss (``teacher.finetune.rank_weight``): the loss by hand, lists kept
whole in batches and in sampling, the default's batching unchanged, and a toy run that learns."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from toy_tasks import mined_rows

from d2llm.batching import bucket_batches, pack_lists
from d2llm.config import params_from_dict
from d2llm.errors import ConfigError
from d2llm.teachers.finetune import epoch_batches, finetune_teacher, list_softmax_loss, sample_lists


def test_list_softmax_loss_by_hand():
    """Two lists: [2 (pos), 0, -1] and [1 (pos), 1 (pos), 0]; a third, all negative, and a row
    outside any list (-1) are left out."""
    margins = torch.tensor([2.0, 0.0, -1.0, 1.0, 1.0, 0.0, 3.0, 5.0])
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    list_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, -1])
    first = math.log(math.exp(2) + 1 + math.exp(-1)) - 2
    second = math.log(2 * math.e + 1) - math.log(2 * math.e)
    loss = list_softmax_loss(margins, targets, list_ids)
    assert loss is not None
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-6)


def test_list_softmax_loss_is_none_without_a_ranked_list_and_falls_as_positives_rise():
    targets = torch.tensor([1.0, 0.0, 0.0])
    assert list_softmax_loss(torch.zeros(3), targets, torch.tensor([-1, -1, -1])) is None
    assert list_softmax_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.long)) is None
    at_chance = list_softmax_loss(torch.zeros(3), targets, torch.zeros(3, dtype=torch.long))
    ranked = list_softmax_loss(torch.tensor([4.0, 0.0, 0.0]), targets, torch.zeros(3, dtype=torch.long))
    assert float(at_chance) == pytest.approx(math.log(3))
    assert float(ranked) < float(at_chance)


def test_pack_lists_keeps_every_list_whole_within_the_batch_size():
    lists = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9], [10, 11, 12]]
    batches = pack_lists(lists, batch_size=5, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(13))
    assert all(len(b) <= 5 for b in batches)
    for rows in lists:
        assert sum(set(rows) <= set(b) for b in batches) == 1
    assert pack_lists(lists, 5, seed=1) == batches  # seeded
    with pytest.raises(ValueError, match="does not fit"):
        pack_lists([[0, 1, 2]], batch_size=2)


def test_epoch_batches_without_lists_are_the_length_bucketed_batches():
    """With ``rank_weight: 0`` (the default) the teacher trains on exactly the batches it did before."""
    encodings = [{"input_ids": list(range(n))} for n in (5, 9, 2, 7, 7, 3, 8, 1)]
    lengths = [len(e["input_ids"]) for e in encodings]
    assert epoch_batches(encodings, [None] * 8, 3, seed=7) == bucket_batches(lengths, 3, shuffle=True, seed=7)
    mixed = epoch_batches(encodings, [None, 0, None, 0, 1, 1, None, 0], 3, seed=7)
    assert sorted(i for b in mixed for i in b) == list(range(8))
    assert [1, 3, 7] in [sorted(b) for b in mixed] and [4, 5] in [sorted(b) for b in mixed]


def _ranked_table(n_questions: int, k: int, seed: int, split: str) -> pd.DataFrame:
    """An asym class dataset: each anchor with its positive and ``k`` hard negatives."""
    rows = [(a, p, True) for a, p, _ in mined_rows(n_questions, k, seed)]
    rows += [(a, n, False) for a, _, negs in mined_rows(n_questions, k, seed) for n in negs]
    return pd.DataFrame(
        {
            "text_a": [r[0] for r in rows],
            "text_b": [r[1] for r in rows],
            "label": [1.0 if r[2] else 0.0 for r in rows],
            "label_name": ["answer" if r[2] else "other" for r in rows],
            "task": "asym",
            "source": "toy",
            "split": split,
            "is_positive": [r[2] for r in rows],
        }
    )


def test_sample_lists_holds_both_kinds_fits_the_size_and_skips_unrankable_questions():
    table = _ranked_table(12, 6, seed=1, split="train").assign(
        target_=lambda d: d["is_positive"].astype(float)
    )
    lonely = pd.DataFrame(
        {**table.iloc[0].to_dict(), "text_a": "a question without answers", "target_": 0.0}, index=[999]
    )
    table = pd.concat([table, lonely])
    lists = sample_lists(table, list_size=4, limit=30, seed=3)
    assert len(lists) <= 30 and lists["list_"].nunique() == len(lists) // 4
    for _, rows in lists.groupby("list_"):
        assert len(rows) == 4 and rows["text_a"].nunique() == 1
        assert 0 < (rows["target_"] >= 0.5).sum() < 4
    assert "a question without answers" not in set(lists["text_a"])
    assert lists.equals(sample_lists(table, list_size=4, limit=30, seed=3))
    assert sample_lists(table[table["target_"] == 0.0], 4, None, seed=3).empty


def test_a_list_larger_than_the_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="rank_list_size"):
        params_from_dict(
            {"teacher": {"finetune": {"rank_weight": 1.0, "rank_list_size": 32, "batch_size": 16}}}
        )
    params_from_dict({"teacher": {"finetune": {"rank_list_size": 32, "batch_size": 16}}})  # off: not checked


def test_finetune_with_the_rank_loss_trains_on_lists_and_learns_to_rank(tiny_bert_dir, tmp_path):
    """The toy ranking task (the shared-noun rule, tests/toy_tasks.py): the teacher trained with
    the listwise loss on whole lists ranks the dev questions' answers first."""
    prepared = tmp_path / "prepared"
    (prepared / "pairs").mkdir(parents=True)
    table = pd.concat(
        [_ranked_table(64, 5, seed=3, split="train"), _ranked_table(16, 5, seed=4, split="dev")]
    )
    table.to_parquet(prepared / "pairs" / "qa.parquet")
    params = params_from_dict(
        {
            "device": "cpu",
            "teacher": {
                "kind": "cross_encoder",
                "model": str(tiny_bert_dir),
                "max_length": 64,
                "finetune": {
                    "datasets": ["qa"],
                    "epochs": 8.0,
                    "batch_size": 12,
                    "lr": 3e-3,
                    "warmup_ratio": 0.0,
                    "rank_weight": 1.0,
                    "rank_list_size": 6,
                },
            },
        }
    )
    result = finetune_teacher(params, prepared, tmp_path / "teacher")
    assert result["train_lists"] == 64 and result["train_pairs"] == 64 * 6
    assert result["steps"] == 8 * 32  # two whole lists of 6 per batch of 12
    assert result["dev_after"]["qa/map"] >= result["dev_before"]["qa/map"] + 20
