"""A stopped teacher fine-tuning goes on from its checkpoint and ends where an unstopped run ends.

The teacher is the tiny BERT cross-encoder of ``conftest.py`` (dropout on, so the RNG state
matters), trained on the toy rule of tests/toy_tasks.py; ``stop_after_steps`` stops a run as a
kill would, its state saved. Exact equality is asked for: the same batches, dropout masks,
optimizer and scheduler steps, best epoch and fusion.
"""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch
from tiny_models import teacher_finetune_params
from toy_tasks import mined_rows, pair_table, rule_pairs

from d2llm.teachers.factory import load_teacher
from d2llm.teachers.finetune import CHECKPOINT_DIR, finetune_teacher

torch.set_num_threads(1)

STEPS_PER_EPOCH = 4  # 64 training pairs, batches of 16
EPOCHS = 3


@pytest.fixture()
def prepared(tmp_path):
    folder = tmp_path / "prepared"
    (folder / "pairs").mkdir(parents=True)
    train, dev = pair_table(rule_pairs(64, seed=3), "train"), pair_table(rule_pairs(32, seed=4), "dev")
    pd.concat([train, dev]).to_parquet(folder / "pairs" / "rule.parquet")
    qa = [(a, p, True) for a, p, _ in mined_rows(16, 3, 5)]
    qa += [(a, n, False) for a, _, negs in mined_rows(16, 3, 5) for n in negs]
    qa_dev = [(a, p, True) for a, p, _ in mined_rows(8, 3, 6)]
    qa_dev += [(a, n, False) for a, _, negs in mined_rows(8, 3, 6) for n in negs]
    frame = pd.concat([pair_table(qa, "train", task="asym"), pair_table(qa_dev, "dev", task="asym")])
    frame.to_parquet(folder / "pairs" / "qa.parquet")
    return folder


def _params(model_dir, datasets=("rule",), **ft):
    recipe = {
        "epochs": float(EPOCHS),
        "batch_size": 16,
        "lr": 1e-3,
        "warmup_ratio": 0.25,
        "checkpoint_every": 3,
    }
    return teacher_finetune_params(model_dir, datasets, **{**recipe, **ft})


def _weights(params, folder) -> dict[str, torch.Tensor]:
    teacher = load_teacher(params.teacher, folder, "cpu")
    return {
        f"{i}.{n}": p.detach().clone()
        for i, m in enumerate(teacher.modules())
        for n, p in m.named_parameters()
    }


def _same_run(params, done, expected, folder, expected_folder) -> None:
    """Two finished runs gave the same teacher, history, losses, choice and fusion."""
    for key in (
        "steps",
        "best_epoch",
        "history",
        "loss_first",
        "loss_last",
        "dev_after",
        "dev_fused",
        "fusion",
    ):
        assert done[key] == expected[key], key
    mine, theirs = _weights(params, folder), _weights(params, expected_folder)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)


@pytest.mark.parametrize(
    "stops",
    [
        [2],  # inside the first epoch, before any checkpoint_every save
        [STEPS_PER_EPOCH],  # on an epoch's last batch, before its dev evaluation
        [5, 3],  # twice: inside epoch 2, then inside epoch 3
    ],
)
@pytest.mark.parametrize("eval_before", [True, False])
def test_a_stopped_fine_tuning_ends_where_an_unstopped_one_does(
    tiny_bert_dir, tmp_path, prepared, stops, eval_before
):
    params = _params(tiny_bert_dir, eval_before=eval_before)
    expected = finetune_teacher(params, prepared, tmp_path / "unstopped")
    assert expected["steps"] == EPOCHS * STEPS_PER_EPOCH

    out = tmp_path / "teacher"
    for stop in stops:
        with pytest.raises(InterruptedError):
            finetune_teacher(params, prepared, out, stop_after_steps=stop)
        assert (out / CHECKPOINT_DIR).is_dir()
    done = finetune_teacher(params, prepared, out)
    _same_run(params, done, expected, out, tmp_path / "unstopped")
    assert not (out / CHECKPOINT_DIR).exists()  # the teacher is saved: the checkpoint is gone


def test_a_checkpoint_of_other_settings_or_no_resume_trains_afresh(tiny_bert_dir, tmp_path, prepared, caplog):
    """A checkpoint left by a run of another config is not resumed (it would hand back a teacher
    of the old settings); ``resume=False`` ignores even a matching one."""
    old, new = _params(tiny_bert_dir, lr=1e-3), _params(tiny_bert_dir, lr=3e-4)
    expected = finetune_teacher(new, prepared, tmp_path / "fresh")

    out = tmp_path / "teacher"
    with pytest.raises(InterruptedError):
        finetune_teacher(old, prepared, out, stop_after_steps=5)
    with caplog.at_level(logging.WARNING, logger="d2llm.teachers.finetune"):
        done = finetune_teacher(new, prepared, out)
    assert "made from other data or settings: training afresh" in caplog.text
    _same_run(new, done, expected, out, tmp_path / "fresh")

    with pytest.raises(InterruptedError):
        finetune_teacher(new, prepared, out, stop_after_steps=5)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="d2llm.teachers.finetune"):
        done = finetune_teacher(new, prepared, out, resume=False)
    assert "resumed" not in caplog.text
    _same_run(new, done, expected, out, tmp_path / "fresh")


def test_a_per_task_teacher_resumes_the_part_it_was_training(tiny_bert_dir, tmp_path, prepared):
    """Each part checkpoints in checkpoint/<task>. Stopped every 5 steps of a call, the run stops
    twice in the sym part, then, the sym part finished (and restored from its last checkpoint on
    the next call), twice in the asym part; it ends as the unstopped run does."""
    params = _params(tiny_bert_dir, datasets=("rule", "qa"), per_task=True)
    expected = finetune_teacher(params, prepared, tmp_path / "unstopped")
    out = tmp_path / "teacher"
    parts_seen = []
    for _ in range(10):
        try:
            done = finetune_teacher(params, prepared, out, stop_after_steps=5)
            break
        except InterruptedError:
            parts_seen.append(sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()))
    assert parts_seen == [["sym"], ["sym"], ["asym", "sym"], ["asym", "sym"]]
    assert done["history"] == expected["history"] and done["fusion"] == expected["fusion"]
    for task in ("sym", "asym"):
        mine, theirs = _weights(params, out / task), _weights(params, tmp_path / "unstopped" / task)
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert not (out / CHECKPOINT_DIR).exists()
