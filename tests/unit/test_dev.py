"""Dev splits: one metric per dataset kind, whole questions kept, the select/validate cut, the
no-regression guard."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from d2llm.config import params_from_dict
from d2llm.errors import DataError
from d2llm.evaluation.dev import dev_score, in_validate_part, load_dev_set, mean_metric
from d2llm.evaluation.evaluate import validation_sets
from d2llm.teachers.finetune import load_gold
from d2llm.training import load_training_dev_sets, regressions

WHOLE = {"part": "select", "validate_fraction": 0.0}  # nothing is validate: the whole dev split


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
    assert load_dev_set(tmp_path, "qa", None, 0, **WHOLE).metric == "map"
    assert load_dev_set(tmp_path, "nli", None, 0, **WHOLE).metric == "ap"
    sts_dev = load_dev_set(tmp_path, "sts", None, 0, **WHOLE)
    assert sts_dev.metric == "spearman" and sts_dev.name == "sts/spearman"
    assert dev_score(sts_dev, np.arange(6)) == pytest.approx(100.0)
    assert dev_score(sts_dev, -np.arange(6)) == pytest.approx(-100.0)


def test_answer_selection_dev_is_sampled_by_whole_questions(tmp_path):
    _write(tmp_path, "qa", _qa_rows(n_questions=6, per_question=5))
    dev = load_dev_set(tmp_path, "qa", max_pairs=12, seed=3, **WHOLE)
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
        load_dev_set(tmp_path, "nli", None, 0, **WHOLE)


def test_regression_guard_names_the_sets_below_their_start():
    start = {"sick/ap": 80.0, "stsb_en/spearman": 86.0}
    assert regressions({"sick/ap": 84.0, "stsb_en/spearman": 85.8}, start, 0.3) == {}
    assert regressions({"sick/ap": 84.0, "stsb_en/spearman": 85.5}, start, 0.3) == {"stsb_en/spearman": -0.5}
    assert regressions({"sick/ap": 60.0, "stsb_en/spearman": 10.0}, start, None) == {}
    assert mean_metric({"a": 1.0, "b": 3.0, "c": float("nan")}) == 2.0


# --------------------------------------------------------------------------- select / validate


def _prepared_dev(tmp_path, n=400):
    """A QA, an NLI and an STS dataset with big enough dev splits to cut in two."""
    _write(tmp_path, "qa", _qa_rows(n_questions=n // 5, per_question=5))
    _write(tmp_path, "nli", [(f"p{i}", f"h{i}", float(i % 2), "entailment" if i % 2 == 0 else "neutral",
                              "sym", "n", "dev", i % 2 == 0) for i in range(n)])  # fmt: skip
    _write(
        tmp_path,
        "sts",
        [(f"s{i}", f"t{i}", float(i % 6), "", "sym", "s", "dev", i % 6 >= 4) for i in range(n)],
    )
    return tmp_path


def test_select_and_validate_parts_cut_each_dev_split_in_two(tmp_path):
    prepared = _prepared_dev(tmp_path)
    for name in ("qa", "nli", "sts"):
        select = load_dev_set(prepared, name, None, 0, "select", 0.5)
        validate = load_dev_set(prepared, name, None, 0, "validate", 0.5)
        assert set(select.pairs).isdisjoint(validate.pairs)
        assert len(select.pairs) + len(validate.pairs) == 400
        assert 120 < len(validate.pairs) < 280  # about half
        assert (select.part, validate.part) == ("select", "validate")
    # A question's candidates stay together, in one part.
    select_q = {a for a, _ in load_dev_set(prepared, "qa", None, 0, "select", 0.5).pairs}
    validate_q = {a for a, _ in load_dev_set(prepared, "qa", None, 0, "validate", 0.5).pairs}
    assert select_q.isdisjoint(validate_q)


def test_the_cut_is_by_pair_in_either_order_and_independent_of_prepares_hashes():
    df = pd.DataFrame({"text_a": ["a b", "c d"], "text_b": ["c d", "a b"], "task": ["sym", "sym"]})
    assert in_validate_part(df, 0.5).nunique() == 1  # (a, b) and (b, a) are one pair
    # TREC-QA's dev questions are those whose plain hash is < 0.3: the salted cut splits them anyway.
    from d2llm.data.sources import hash_fraction

    questions = [f"what is thing {i} ?" for i in range(2000)]
    low = [q for q in questions if hash_fraction(q) < 0.3]
    part = in_validate_part(pd.DataFrame({"text_a": low, "text_b": "x", "task": "asym"}), 0.5)
    assert 0.4 < part.mean() < 0.6


def test_questions_without_a_right_and_a_wrong_answer_are_not_dev_pairs(tmp_path):
    rows = _qa_rows(n_questions=4, per_question=5)
    rows += [("unanswerable ?", f"c{i}", 0.0, "no", "asym", "qa", "dev", False) for i in range(50)]
    _write(tmp_path, "qa", rows)
    dev = load_dev_set(tmp_path, "qa", max_pairs=20, seed=0, **WHOLE)
    assert "unanswerable ?" not in {a for a, _ in dev.pairs}
    assert len(dev.pairs) == 20  # the budget goes to questions MAP can rank


def test_tuning_and_validation_never_read_the_same_dev_pairs(tmp_path):
    prepared = _prepared_dev(tmp_path)
    sets = {"qa", "nli", "sts"}
    params = params_from_dict({
        "training": {"dev_datasets": sorted(sets), "max_dev_pairs": None},
        "evaluation": {"validation_datasets": sorted(sets), "max_validation_pairs": None},
        "teacher": {"finetune": {"datasets": ["nli"], "max_dev_pairs": None}},
    })  # fmt: skip
    validated = {p for dev in validation_sets(params, prepared) for p in dev.pairs}
    early_stopping = {p for dev in load_training_dev_sets(params, prepared) for p in dev.pairs}
    assert validated and early_stopping and validated.isdisjoint(early_stopping)
    _write(prepared, "nli", [*pd.read_parquet(prepared / "pairs" / "nli.parquet").itertuples(index=False),
                             ("tp", "th", 1.0, "entailment", "sym", "n", "train", True)])  # fmt: skip
    _, teacher_dev = load_gold(params, prepared)  # the teacher's epoch and fusion weights
    assert {p for dev in teacher_dev for p in dev.pairs}.isdisjoint(validated)
