"""One teacher per task kind (``teacher.finetune.per_task``): each part is the teacher its task's
datasets alone would train, each scores its own task's pairs, and the saved folder restores both."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from tiny_models import teacher_finetune_params
from toy_tasks import mined_rows, pair_table, rule_pairs

from d2llm.config import params_from_dict
from d2llm.errors import ConfigError, DataError, ModelError
from d2llm.quantization import is_quantized
from d2llm.teachers.base import saved_config
from d2llm.teachers.factory import load_teacher
from d2llm.teachers.finetune import finetune_teacher, load_gold
from d2llm.teachers.per_task import PerTaskTeacher, is_per_task


def _qa_table(n_questions: int, seed: int, split: str) -> pd.DataFrame:
    """An asym dataset: each question with its answer and three other candidates."""
    rows = [(a, p, True) for a, p, _ in mined_rows(n_questions, 3, seed)]
    rows += [(a, n, False) for a, _, negs in mined_rows(n_questions, 3, seed) for n in negs]
    return pair_table(rows, split, task="asym")


@pytest.fixture()
def prepared(tmp_path):
    folder = tmp_path / "prepared"
    (folder / "pairs").mkdir(parents=True)
    nli = [pair_table(rule_pairs(96, seed=3), "train"), pair_table(rule_pairs(32, seed=4), "dev")]
    pd.concat(nli).to_parquet(folder / "pairs" / "nli.parquet")
    pd.concat([_qa_table(24, seed=5, split="train"), _qa_table(12, seed=6, split="dev")]).to_parquet(
        folder / "pairs" / "qa.parquet"
    )
    return folder


def _params(model_dir, datasets, per_task=True, **ft):
    return teacher_finetune_params(
        model_dir, datasets, epochs=2.0, batch_size=8, lr=1e-3, warmup_ratio=0.0, per_task=per_task, **ft
    )


def test_each_part_is_what_its_task_alone_trains_and_scores_its_task(tiny_bert_dir, tmp_path, prepared):
    """The per-task teacher's sym part equals a teacher fine-tuned on the sym dataset alone, its
    asym part one fine-tuned on the asym dataset alone (same seed and recipe), and a pair is
    scored by the part of its task: labelling, fusion and the test rows need nothing else."""
    result = finetune_teacher(_params(tiny_bert_dir, ["nli", "qa"]), prepared, tmp_path / "both")
    alone = {
        task: finetune_teacher(_params(tiny_bert_dir, [name], per_task=False), prepared, tmp_path / task)
        for task, name in (("sym", "nli"), ("asym", "qa"))
    }

    assert result["kind"] == "per_task"
    assert result["best_epoch"] == {task: alone[task]["best_epoch"] for task in ("sym", "asym")}
    assert result["steps"] == alone["sym"]["steps"] + alone["asym"]["steps"] == 2 * (12 + 12)
    assert result["dev_after"]["nli/ap"] == pytest.approx(alone["sym"]["dev_after"]["nli/ap"])
    assert result["dev_after"]["qa/map"] == pytest.approx(alone["asym"]["dev_after"]["qa/map"])
    assert set(result["fusion"]["datasets"]) == {"nli", "qa"}  # one fusion weight per dataset, as before
    assert {h["task"] for h in result["history"]} == {"sym", "asym"}

    cfg = _params(tiny_bert_dir, ["nli", "qa"]).teacher
    assert is_per_task(tmp_path / "both") and not is_per_task(tmp_path / "sym")
    both = load_teacher(cfg, tmp_path / "both", "cpu")
    assert isinstance(both, PerTaskTeacher)
    sym, asym = (load_teacher(cfg, tmp_path / task, "cpu") for task in ("sym", "asym"))
    pairs = [("a red fox runs", "a red fox sleeps"), ("what does the fox eat", "the fox eats mice")]
    for task, part in (("sym", sym), ("asym", asym)):
        got = both.score(pairs, task, with_features=True)
        expected = part.score(pairs, task, with_features=True)
        torch.testing.assert_close(got.logits, expected.logits)
        torch.testing.assert_close(got.features, expected.features)
    # The two parts learned different things: the routing matters.
    assert not torch.allclose(sym.score(pairs, "sym").logits, asym.score(pairs, "sym").logits)


def test_a_per_task_teacher_quantizes_both_parts_and_refuses_a_batch(tiny_bert_dir, tmp_path, prepared):
    finetune_teacher(_params(tiny_bert_dir, ["nli", "qa"]), prepared, tmp_path / "t")
    teacher = load_teacher(_params(tiny_bert_dir, ["nli", "qa"]).teacher, tmp_path / "t", "cpu")
    teacher.quantize("int8")
    assert teacher.quantization == "int8"
    assert all(is_quantized(teacher.part(task).modules()[0]) for task in ("sym", "asym"))
    assert teacher.scoring_info()["quantization"].startswith("int8")
    with pytest.raises(ModelError, match="score"):
        teacher.forward({})
    with pytest.raises(ModelError, match="one teacher per task kind"):  # read as one model: a clear error
        saved_config(teacher.cfg, tmp_path / "t")
    assert json.loads((tmp_path / "t" / "teacher.json").read_text())["parts"] == ["sym", "asym"]


def test_a_per_task_teacher_needs_a_dataset_of_each_task_kind(tiny_bert_dir, tmp_path, prepared):
    with pytest.raises(DataError, match="no asym dataset"):
        finetune_teacher(_params(tiny_bert_dir, ["nli"]), prepared, tmp_path / "t")
    assert not (tmp_path / "t").exists()  # nothing half-saved


def test_per_task_config_rules(tiny_bert_dir):
    with pytest.raises(ConfigError, match=r"per_task needs teacher\.finetune\.enabled"):
        params_from_dict({"teacher": {"finetune": {"per_task": True, "enabled": False}}})
    with pytest.raises(ConfigError, match="vllm engine serves one model"):
        params_from_dict({"teacher": {"finetune": {"per_task": True}}, "labelling": {"engine": "vllm"}})
    assert not params_from_dict({}).teacher.finetune.per_task  # the paper: one teacher


def test_asym_datasets_take_their_own_cap(tiny_bert_dir, prepared):
    """``asym_max_train_pairs`` caps the QA datasets, ``max_train_pairs`` the others (unset: one cap)."""
    for asym_cap, expected in ((None, {"sym": 40, "asym": 40}), (20, {"sym": 40, "asym": 20})):
        params = _params(tiny_bert_dir, ["nli", "qa"], max_train_pairs=40, asym_max_train_pairs=asym_cap)
        train, _ = load_gold(params, prepared)
        assert {task: sum(row.task == task for row in train) for task in ("sym", "asym")} == expected
