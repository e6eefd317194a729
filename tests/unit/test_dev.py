"""Dev splits: one metric per dataset kind, whole questions kept, the no-regression guard."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from d2llm.errors import DataError
from d2llm.evaluation.dev import dev_score, load_dev_set, mean_metric
from d2llm.training import regressions


def _write(prepared, name, rows):
    cols = ["text_a", "text_b", "label", "label_name", "task", "source", "split", "is_positive"]
    (prepared / "pairs").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=cols).to_parquet(prepared / "pairs" / f"{name}.parquet")


def _qa_rows(n_questions=6, per_question=5):
    rows = []
    for q in range(n_questions):
        for c in range(per_question):
            right = c == q % per_question
            rows.append((f"question {q} ?", f"answer {q}-{c} .", float(right), "yes" if right else "no",
                         "asym", "qa", "dev", right))  # fmt: skip
    return rows


def test_each_dataset_kind_gets_its_metric(tmp_path):
    _write(tmp_path, "qa", _qa_rows())
    nli = [("a", f"b{i}", 0.0 if i % 2 else 1.0, "entailment" if not i % 2 else "neutral", "sym", "n", "dev",
            not i % 2) for i in range(6)]  # fmt: skip
    _write(tmp_path, "nli", nli)
    sts = [("a", f"b{i}", float(i), "", "sym", "s", "dev", i >= 4) for i in range(6)]
    _write(tmp_path, "sts", sts)
    assert load_dev_set(tmp_path, "qa", None, 0).metric == "map"
    assert load_dev_set(tmp_path, "nli", None, 0).metric == "ap"
    sts_dev = load_dev_set(tmp_path, "sts", None, 0)
    assert sts_dev.metric == "spearman" and sts_dev.name == "sts/spearman"
    assert dev_score(sts_dev, np.arange(6)) == pytest.approx(100.0)
    assert dev_score(sts_dev, -np.arange(6)) == pytest.approx(-100.0)


def test_answer_selection_dev_is_sampled_by_whole_questions(tmp_path):
    _write(tmp_path, "qa", _qa_rows(n_questions=6, per_question=5))
    dev = load_dev_set(tmp_path, "qa", max_pairs=12, seed=3)
    questions = [a for a, _ in dev.pairs]
    assert len(dev.pairs) == 10  # two whole questions of five candidates fit under 12 pairs
    assert all(questions.count(q) == 5 for q in set(questions))
    # A scorer that finds each question's right answer gets MAP 100.
    assert dev_score(dev, dev.gold) == pytest.approx(100.0)


def test_a_dev_split_with_one_class_is_a_clear_error(tmp_path):
    rows = [
        ("a", "b", 0.0, "entailment", "sym", "n", "dev", True),
        ("c", "d", 0.0, "entailment", "sym", "n", "dev", True),
    ]
    _write(tmp_path, "nli", rows)
    with pytest.raises(DataError, match="only one class"):
        load_dev_set(tmp_path, "nli", None, 0)


def test_regression_guard_names_the_sets_below_their_start():
    start = {"sick/ap": 80.0, "stsb_en/spearman": 86.0}
    assert regressions({"sick/ap": 84.0, "stsb_en/spearman": 85.8}, start, 0.3) == {}
    assert regressions({"sick/ap": 84.0, "stsb_en/spearman": 85.5}, start, 0.3) == {"stsb_en/spearman": -0.5}
    assert regressions({"sick/ap": 60.0, "stsb_en/spearman": 10.0}, start, None) == {}
    assert mean_metric({"a": 1.0, "b": 3.0, "c": float("nan")}) == 2.0
