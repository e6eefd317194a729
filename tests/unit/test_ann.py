"""The FAISS first stage: exact below ``search.ann_min_size``, HNSW above, recall against exact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from d2llm.ann import ANN_FILE, VectorIndex, ann_kind
from d2llm.config import SearchConfig


def _clustered(n: int, n_queries: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors and queries around the same random centres, noise as large as the centres:
    the shape of real embeddings (dense, overlapping neighbourhoods)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))

    def draw(count: int) -> np.ndarray:
        points = centres[rng.integers(0, clusters, size=count)] + rng.normal(size=(count, dim))
        return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)

    return draw(n), draw(n_queries)


def _exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def test_ann_kind_switches_at_the_configured_size():
    assert ann_kind(99, ann_min_size=100) == "flat"
    assert ann_kind(100, ann_min_size=100) == "hnsw"


def test_hnsw_recall_at_10_of_the_exact_ranking(tmp_path):
    """20k x 64 clustered vectors: HNSW top-10 holds >= 99% of the exact top-10."""
    vectors, queries = _clustered(20_000, 200, 64, clusters=200, seed=0)
    cfg = SearchConfig()
    hnsw = VectorIndex.build(vectors, "hnsw", cfg.hnsw_m, cfg.hnsw_ef_construction, cfg.hnsw_ef_search)
    exact = _exact_top(vectors, queries, 10)
    found, _ = hnsw.search(queries, 10)
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.99, recall

    # Saved and loaded, it answers the same; a tiny efSearch is measurably worse (the knob works).
    hnsw.save(tmp_path / ANN_FILE)
    loaded = VectorIndex.load(tmp_path / ANN_FILE, ef_search=cfg.hnsw_ef_search)
    assert loaded.kind == "hnsw" and np.array_equal(loaded.search(queries, 10)[0], found)
    loaded.set_ef_search(1)
    narrow = loaded.search(queries, 1)[0][:, 0]
    assert np.mean(narrow == exact[:, 0]) < recall


def test_flat_index_is_exact():
    vectors, queries = _clustered(3_000, 20, 32, clusters=30, seed=2)
    flat = VectorIndex.build(vectors * 3.0, "flat", chunk_rows=1000)  # normalised on the way in
    positions, cosines = flat.search(queries, 5)
    assert np.array_equal(positions, _exact_top(vectors, queries, 5))
    np.testing.assert_allclose(cosines, np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :5], rtol=1e-5)
    with pytest.raises(ValueError, match="depth"):
        flat.search(queries, 0)


def test_search_index_uses_hnsw_from_ann_min_size(tmp_path):
    """Above the threshold the index saves ann.faiss and two-stage search goes through it."""
    from test_search import DOCS, HashStudent

    from d2llm.search import build_index, load_index, search

    student = HashStudent()
    corpus = pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(DOCS))], "text": DOCS})
    small = build_index(student, corpus, tmp_path / "small", "v", search_cfg=SearchConfig())
    assert small.manifest["first_stage_ann"] == "flat" and not (tmp_path / "small" / ANN_FILE).exists()
    big = build_index(student, corpus, tmp_path / "big", "v", search_cfg=SearchConfig(ann_min_size=len(DOCS)))
    assert big.manifest["first_stage_ann"] == "hnsw" and (tmp_path / "big" / ANN_FILE).exists()
    loaded = load_index(tmp_path / "big", student, ef_search=64)
    assert loaded.ann is not None and loaded.ann.kind == "hnsw" and len(loaded.ann) == len(DOCS)
    for query in ("a man plays a guitar", "the dog runs"):
        exact = search(student, small, query, k=3, mode="two_stage", rerank_depth=5)
        approx = search(student, loaded, query, k=3, mode="two_stage", rerank_depth=5)
        assert [h.doc_id for h in approx] == [h.doc_id for h in exact]  # 12 vectors: HNSW is exact
