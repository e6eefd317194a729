"""`d2llm ir-select` with students: the shipped search's first stage and depth chosen on the IR dev
collection, averaged over seeds, next to the bi-encoder re-ranking the same candidates."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from d2llm.config import Params, params_from_dict
from d2llm.errors import ArtifactError, ConfigError
from d2llm.evaluation.ir_selection import (
    LEXICAL_WEIGHTS,
    STUDENT_DEPTHS,
    STUDENT_FIRST_STAGES,
    format_report,
    select_ir_settings,
)

torch.set_num_threads(1)

SUBJECTS = ["man", "woman", "child", "dog", "cat"]
ACTIONS = ["plays a guitar", "rides a bike", "eats food", "sleeps on the mat", "runs in the park"]
N_DOCS = 30  # fewer than the deepest depths: there every first stage keeps every document


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An IR dev collection (``devir``) of short and long documents, with judged queries."""
    root = tmp_path_factory.mktemp("prepared")
    folder = root / "ir" / "devir"
    folder.mkdir(parents=True)
    docs = []
    for i in range(N_DOCS):
        sentence = f"a {SUBJECTS[i % 5]} {ACTIONS[(i // 5) % 5]}"
        docs.append(
            sentence if i % 3 else " ".join([f"the {SUBJECTS[(i + 1) % 5]} waits"] * 8) + f" {sentence}"
        )
    pd.DataFrame({"doc_id": [f"d{i}" for i in range(N_DOCS)], "text": docs}).to_parquet(
        folder / "corpus.parquet"
    )
    queries = [f"who {ACTIONS[i]}" for i in range(5)]
    pd.DataFrame({"query_id": [f"q{i}" for i in range(5)], "text": queries}).to_parquet(
        folder / "queries.parquet"
    )
    qrels = [(f"q{a}", f"d{i}", 1) for i in range(N_DOCS) for a in range(5) if (i // 5) % 5 == a]
    pd.DataFrame(qrels, columns=["query_id", "doc_id", "relevance"]).to_parquet(folder / "qrels.parquet")
    return root


def _params(tiny_bert_dir: Path) -> Params:
    return params_from_dict(
        {
            "device": "cpu",
            "student": {
                "backbone": str(tiny_bert_dir),
                "max_length": 32,
                "lora": {"enabled": False},
                "pma": {"num_heads": 4},
                "iem": {"hidden_size": 16, "branch_size": 8, "residual": "cosine"},
            },
            "evaluation": {
                "ir_dev_dataset": "devir",
                "ir_datasets": [],
                "pair_datasets": [],
                "batch_size": 8,
            },
        }
    )


@pytest.fixture(scope="module")
def students(tiny_bert_dir, tmp_path_factory) -> list[Path]:
    """Two saved students of one recipe, two seeds."""
    from d2llm.hub import seed_everything
    from d2llm.student.model import D2LLMStudent

    root = tmp_path_factory.mktemp("students")
    out = []
    for seed in (0, 1):
        seed_everything(seed)
        student = D2LLMStudent.from_config(_params(tiny_bert_dir).student, device="cpu")
        with torch.no_grad():  # a head that adds to the cosine, as a trained one does
            student.iem.out.weight.normal_(0.0, 1.0)
        out.append(student.save_pretrained(root / f"seed{seed}"))
    return out


def test_ir_select_chooses_the_students_first_stage_and_depth_on_the_dev_collection(
    tiny_bert_dir, prepared, students
):
    report = select_ir_settings(_params(tiny_bert_dir), prepared, None, students)
    rows = report["student_protocols"]
    assert report["students"] == [str(s) for s in students]
    grid = [(r["first_stage"], r["depth"], r["lexical_weight"]) for r in rows]
    settings = [(None, 0)] + [(f, d) for f in STUDENT_FIRST_STAGES for d in STUDENT_DEPTHS]
    assert grid == [(f, d, w) for f, d in settings for w in LEXICAL_WEIGHTS]
    by = {key: r for key, r in zip(grid, rows, strict=True)}
    for row in rows:  # each setting: the mean over the seeds, which differ
        assert len(row["per_student"]) == 2
        assert row["student"] == pytest.approx(sum(row["per_student"]) / 2)
    assert by[(None, 0, 0.0)]["per_student"][0] != by[(None, 0, 0.0)]["per_student"][1]
    # Keeping at least every document, two-stage search is full scoring (at each BM25 weight),
    # and the bi-encoder re-ranking every document unfused is its own ranking of the chosen scheme.
    scheme = max(report["passage_schemes"], key=lambda r: r["bi-encoder"])
    for first_stage in STUDENT_FIRST_STAGES:
        for depth in (d for d in STUDENT_DEPTHS if d >= N_DOCS):
            for w in LEXICAL_WEIGHTS:
                full = by[(None, 0, w)]["per_student"]
                assert by[(first_stage, depth, w)]["per_student"] == pytest.approx(full)
            assert by[(first_stage, depth, 0.0)]["bi-encoder"] == pytest.approx(scheme["bi-encoder"])
    assert by[(None, 0, 1.0)]["student"] != by[(None, 0, 0.0)]["student"]  # BM25 moves the ranking
    chosen = max((r for r in rows if r["depth"]), key=lambda r: r["student"])  # the first of equals
    assert report["chosen"]["search.first_stage"] == chosen["first_stage"]
    assert report["chosen"]["search.rerank_depth"] == chosen["depth"]
    assert report["chosen"]["search.lexical_weight"] == chosen["lexical_weight"]
    text = format_report(report)
    assert "| student first stage | depth (docs) | BM25 weight | student (mean of 2) |" in text
    assert f"-S search.rerank_depth={chosen['depth']}" in text


def test_ir_select_refuses_a_missing_student_and_a_test_collection(tiny_bert_dir, prepared, tmp_path):
    params = _params(tiny_bert_dir)
    with pytest.raises(ArtifactError, match="no saved student"):
        select_ir_settings(params, prepared, None, [tmp_path / "nowhere"])
    as_test = params.model_copy(
        update={"evaluation": params.evaluation.model_copy(update={"ir_datasets": ["devir"]})}
    )
    with pytest.raises(ConfigError, match="also a test collection"):
        select_ir_settings(as_test, prepared, None, [])
