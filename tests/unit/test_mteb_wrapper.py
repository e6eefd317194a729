"""The mteb wrapper on the real student (tiny random BERT), with small local tasks (no mteb needed)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from d2llm.config import StudentConfig
from d2llm.errors import ModelError
from d2llm.evaluation.metrics import spearman
from d2llm.mteb_wrapper import D2LLMMtebModel, task_kind
from d2llm.search import build_index, search

torch.set_num_threads(1)

STS_TASK = SimpleNamespace(name="LocalSTS", type="STS")
RETRIEVAL_TASK = SimpleNamespace(name="LocalRetrieval", type="Retrieval")
STS_PAIRS = [
    ("a man plays a guitar", "a man plays a guitar", 5.0),
    ("a man plays a guitar", "a person plays the piano", 3.0),
    ("a dog runs on the grass", "the dog is running", 4.2),
    ("a cat sleeps on the mat", "a woman cooks food", 0.4),
    ("children play on the beach", "a child plays on the beach", 4.0),
    ("the bird sings", "the horse runs", 1.0),
]
DOCS = [
    "a man plays a guitar in the park",
    "a woman plays the piano in the kitchen",
    "the dog runs on the grass",
    "a cat sleeps on the mat",
    "a woman cooks food in the kitchen",
]


@pytest.fixture(scope="module")
def student(tiny_bert_dir):
    from d2llm.hub import seed_everything
    from d2llm.student.model import D2LLMStudent

    seed_everything(0)
    cfg = StudentConfig(
        backbone=str(tiny_bert_dir),
        max_length=32,
        lora={"enabled": False},
        pma={"num_heads": 4},
        iem={"hidden_size": 16, "branch_size": 8},
    )
    return D2LLMStudent.from_config(cfg, device="cpu")


def test_task_kinds():
    assert task_kind("STS") == "sts" and task_kind("PairClassification") == "nli"
    assert task_kind("Retrieval") == task_kind("Reranking") == "asym"
    with pytest.raises(ModelError, match="'Classification' has no IEM branch"):
        task_kind("Classification")


def test_encode_accepts_lists_and_mteb_dataloaders(student):
    from torch.utils.data import DataLoader

    model = D2LLMMtebModel(student, batch_size=2)
    texts = [p[0] for p in STS_PAIRS]
    from_list = model.encode(texts, task_metadata=STS_TASK, hf_split="test", hf_subset="default")
    loader = DataLoader([{"text": t} for t in texts], batch_size=4)  # batches like {"text": [...]}
    from_loader = model.encode(loader, task_metadata=STS_TASK, hf_split="test", hf_subset="default")
    assert isinstance(from_list, np.ndarray) and from_list.dtype == np.float32
    assert from_list.shape == (len(texts), student.dim)
    np.testing.assert_allclose(from_loader, from_list, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_list, student.encode(texts).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="'text' field"):
        model.encode(DataLoader([{"image": 1}], batch_size=1), task_metadata=STS_TASK)


def test_sts_similarity_uses_the_sym_branch(student):
    model = D2LLMMtebModel(student)
    a = model.encode([p[0] for p in STS_PAIRS], task_metadata=STS_TASK)
    b = model.encode([p[1] for p in STS_PAIRS], task_metadata=STS_TASK)
    pairwise = model.similarity_pairwise(a, b)
    ea, eb = torch.from_numpy(a), torch.from_numpy(b)
    with torch.no_grad():
        sym = student.score_vectors(ea, eb, "sym").numpy()
        asym = student.score_vectors(ea, eb, "asym").numpy()
    np.testing.assert_allclose(pairwise, sym, rtol=1e-5, atol=1e-6)
    assert not np.allclose(pairwise, asym)  # the branches differ, so the branch choice matters
    # The matrix form agrees with the pairwise form on its diagonal.
    np.testing.assert_allclose(np.diag(model.similarity(a, b)), sym, rtol=1e-5, atol=1e-6)


def test_local_sts_task_scored_like_mteb_equals_student_scoring(student):
    """mteb's STS evaluator: encode both sides, similarity_pairwise, Spearman with gold."""
    model = D2LLMMtebModel(student, task_types={"LocalSTS": "STS"})
    a = model.encode([p[0] for p in STS_PAIRS], task_name="LocalSTS")
    b = model.encode([p[1] for p in STS_PAIRS], task_name="LocalSTS")
    gold = [p[2] for p in STS_PAIRS]
    via_mteb = spearman(model.similarity_pairwise(a, b), gold)
    direct = spearman(student.score([(p[0], p[1]) for p in STS_PAIRS], "sym").numpy(), gold)
    assert via_mteb == pytest.approx(direct)


def test_local_retrieval_task_ranks_like_search(student, tmp_path):
    model = D2LLMMtebModel(student)
    queries = ["who plays a guitar", "cooking in the kitchen"]
    q = model.encode(queries, task_metadata=RETRIEVAL_TASK, prompt_type="query")
    d = model.encode(DOCS, task_metadata=RETRIEVAL_TASK, prompt_type="passage")
    sims = model.similarity(q, d)
    assert sims.shape == (2, len(DOCS))
    index = build_index(
        student, pd.DataFrame({"doc_id": [str(i) for i in range(len(DOCS))], "text": DOCS}), tmp_path, "v"
    )
    for row, query in zip(sims, queries, strict=True):
        hits = search(student, index, query, k=len(DOCS), mode="full")
        assert [int(h.doc_id) for h in hits] == np.argsort(-row, kind="stable").tolist()
        np.testing.assert_allclose(np.sort(row)[::-1], [h.score for h in hits], rtol=1e-5, atol=1e-6)
    # 1-d inputs are single rows.
    np.testing.assert_allclose(model.similarity(q[0], d), sims[:1], rtol=1e-5, atol=1e-6)


def test_similarity_needs_a_scored_task_type(student):
    model = D2LLMMtebModel(student)
    vec = model.encode(["a dog"])
    with pytest.raises(ModelError, match="call encode"):
        model.similarity(vec, vec)
    model.encode(["a dog"], task_metadata=SimpleNamespace(name="Banking77", type="Classification"))
    with pytest.raises(ModelError, match="no IEM branch"):
        model.similarity_pairwise(vec, vec)
    model.encode(["a dog"], task_metadata=STS_TASK)
    with pytest.raises(ValueError, match="equal row counts"):
        model.similarity_pairwise(np.vstack([vec, vec]), vec)


def test_task_name_without_mteb_or_mapping_is_a_clear_error(student, monkeypatch):
    monkeypatch.setitem(sys.modules, "mteb", None)  # as if mteb were not installed
    model = D2LLMMtebModel(student)
    with pytest.raises(ModelError, match=r"install mteb .* or pass task_types"):
        model.encode(["a dog"], task_name="STSBenchmark")
