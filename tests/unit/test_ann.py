"""The FAISS first stage: exact below ``search.ann_min_size``, HNSW or IVF above, recall against exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from d2llm.ann import ANN_FILE, MIN_TRAIN_POINTS_PER_LIST, VectorIndex, ann_kind, ivf_list_count
from d2llm.config import SearchConfig, load_params
from d2llm.errors import ArtifactError, ConfigError


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


def _recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))


def test_ann_kind_switches_at_the_configured_size():
    assert ann_kind(99, ann_min_size=100) == "flat"
    assert ann_kind(100, ann_min_size=100) == "ivf"  # the default: SearchConfig().ann_index
    assert SearchConfig().ann_index == "ivf"
    assert ann_kind(100, ann_min_size=100, approximate="hnsw") == "hnsw"
    assert ann_kind(99, ann_min_size=100, approximate="ivf") == "flat"
    assert ann_kind(100, ann_min_size=100, approximate="ivf") == "ivf"
    with pytest.raises(ValueError, match="unknown approximate index 'lsh'"):
        ann_kind(100, ann_min_size=100, approximate="lsh")


def test_hnsw_recall_at_10_of_the_exact_ranking(tmp_path):
    """20k x 64 clustered vectors: HNSW top-10 holds >= 99% of the exact top-10."""
    vectors, queries = _clustered(20_000, 200, 64, clusters=200, seed=0)
    cfg = SearchConfig()
    hnsw = VectorIndex.build(vectors, "hnsw", cfg.hnsw_m, cfg.hnsw_ef_construction, cfg.hnsw_ef_search)
    exact = _exact_top(vectors, queries, 10)
    found, _ = hnsw.search(queries, 10)
    recall = _recall_at_10(found, exact)
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
    hnsw = SearchConfig(ann_min_size=len(DOCS), ann_index="hnsw")
    big = build_index(student, corpus, tmp_path / "big", "v", search_cfg=hnsw)
    assert big.manifest["first_stage_ann"] == "hnsw" and (tmp_path / "big" / ANN_FILE).exists()
    assert big.manifest["first_stage_ann_params"] == {"hnsw_m": 32, "hnsw_ef_construction": 200}
    loaded = load_index(tmp_path / "big", student, ef_search=64)
    assert loaded.ann is not None and loaded.ann.kind == "hnsw" and len(loaded.ann) == len(DOCS)
    for query in ("a man plays a guitar", "the dog runs"):
        exact = search(student, small, query, k=3, mode="two_stage", rerank_depth=5)
        approx = search(student, loaded, query, k=3, mode="two_stage", rerank_depth=5)
        assert [h.doc_id for h in approx] == [h.doc_id for h in exact]  # 12 vectors: HNSW is exact


def test_ivf_recall_at_10_of_the_exact_ranking(tmp_path):
    """20k x 64 clustered vectors, default nlist (clamped to 512) and nprobe: >= 99% of the exact top-10."""
    vectors, queries = _clustered(20_000, 200, 64, clusters=200, seed=0)
    cfg = SearchConfig()
    ivf = VectorIndex.build(
        vectors, "ivf", ivf_nlist=cfg.ivf_nlist, ivf_nprobe=cfg.ivf_nprobe, ivf_train_size=cfg.ivf_train_size
    )
    assert ivf.kind == "ivf" and len(ivf) == 20_000
    assert ivf.nlist == 20_000 // MIN_TRAIN_POINTS_PER_LIST  # 4*sqrt(N) = 566 lists want 22k training points
    exact = _exact_top(vectors, queries, 10)
    found, cosines = ivf.search(queries, 10)
    recall = _recall_at_10(found, exact)
    assert recall >= 0.99, recall
    np.testing.assert_allclose(cosines[:, 0], np.max(queries @ vectors[found[:, 0]].T, axis=1), rtol=1e-5)

    # Saved and loaded, it is recognised as IVF and answers the same; one probed list is
    # measurably worse (the knob works at search time).
    ivf.save(tmp_path / ANN_FILE)
    loaded = VectorIndex.load(tmp_path / ANN_FILE, nprobe=cfg.ivf_nprobe)
    assert loaded.kind == "ivf" and loaded.nlist == ivf.nlist
    assert np.array_equal(loaded.search(queries, 10)[0], found)
    loaded.set_nprobe(1)
    assert _recall_at_10(loaded.search(queries, 10)[0], exact) < recall


def test_ivf_trains_on_a_seeded_sample_and_adds_in_chunks():
    """A 2 000-vector sample trains the lists (so nlist is clamped to 2000 / 39); all 8 000 are added.
    The same seed gives the same index."""
    vectors, queries = _clustered(8_000, 20, 32, clusters=40, seed=3)

    def build(seed: int) -> VectorIndex:
        return VectorIndex.build(vectors, "ivf", chunk_rows=1_500, ivf_train_size=2_000, seed=seed)

    first, again = build(0), build(0)
    assert len(first) == 8_000 and first.nlist == 2_000 // MIN_TRAIN_POINTS_PER_LIST
    assert np.array_equal(first.search(queries, 10)[0], again.search(queries, 10)[0])
    # Every vector is in some list: scanning all lists is the exact search.
    first.set_nprobe(first.nlist)
    assert np.array_equal(first.search(queries, 10)[0], _exact_top(vectors, queries, 10))


def test_ivf_with_few_probed_vectors_pads_missing_hits_with_minus_one():
    """nprobe=1 over ~40-vector lists cannot fill a depth of 200: the rest are -1, as with HNSW."""
    vectors, queries = _clustered(2_000, 5, 16, clusters=50, seed=4)
    ivf = VectorIndex.build(vectors, "ivf", ivf_nlist=50, ivf_nprobe=1)
    positions, _ = ivf.search(queries, 200)
    assert positions.shape == (5, 200) and (positions == -1).any()
    for row in positions:
        hits = row[row >= 0]
        assert len(set(hits)) == len(hits) > 0 and (row[len(hits) :] == -1).all()


def test_ivf_list_count_rule_and_clamp():
    assert ivf_list_count(1_000_000, 200_000) == 4_000  # ~4*sqrt(N)
    assert ivf_list_count(1_000_000, 100_000) == 100_000 // MIN_TRAIN_POINTS_PER_LIST  # clamped
    assert ivf_list_count(12, 12) == 1  # a tiny corpus: one list (exact)
    assert ivf_list_count(1_000_000, 200_000, nlist=1_000) == 1_000
    with pytest.raises(ConfigError, match=r"ivf_nlist=100 needs at least 3900 training vectors .* only 2000"):
        ivf_list_count(2_000, 2_000, nlist=100)


def test_a_corpus_too_small_for_the_configured_nlist_is_a_clear_error():
    vectors, _ = _clustered(1_000, 1, 16, clusters=10, seed=5)
    with pytest.raises(ConfigError, match=r"search\.ivf_nlist to <= 25"):
        VectorIndex.build(vectors, "ivf", ivf_nlist=100)


def test_load_refuses_a_faiss_index_d2llm_does_not_build(tmp_path):
    import faiss

    faiss.write_index(faiss.IndexFlatL2(8), str(tmp_path / ANN_FILE))
    with pytest.raises(ArtifactError, match=r"IndexFlatL2.*rebuild it with `d2llm index`"):
        VectorIndex.load(tmp_path / ANN_FILE)


def test_ivf_config_is_validated():
    root = Path(__file__).resolve().parents[2] / "params.yaml"
    params = load_params(root, {"search.ann_index": "ivf", "search.ivf_nlist": 1000})
    assert params.search.ann_index == "ivf" and params.search.ivf_nlist == 1000
    with pytest.raises(ConfigError, match=r"search\.ann_index"):
        load_params(root, {"search.ann_index": "lsh"})
    for key, bad in (("ivf_nlist", 0), ("ivf_nprobe", 0), ("ivf_train_size", 10)):
        with pytest.raises(ConfigError, match=rf"search\.{key}"):
            load_params(root, {f"search.{key}": bad})
    with pytest.raises(ConfigError, match=r"ivf_nlist=1000 needs search\.ivf_train_size >= 39000"):
        load_params(root, {"search.ivf_nlist": 1000, "search.ivf_train_size": 20_000})


def test_search_index_uses_ivf_when_configured(tmp_path):
    """ann_index: ivf saves an IVF ann.faiss, the manifest says so with its lists, and search uses it."""
    from test_search import DOCS, HashStudent

    from d2llm.search import build_index, load_index, search

    student = HashStudent()
    corpus = pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(DOCS))], "text": DOCS})
    exact_index = build_index(student, corpus, tmp_path / "exact", "v", search_cfg=SearchConfig())
    cfg = SearchConfig(ann_min_size=len(DOCS), ann_index="ivf")
    built = build_index(student, corpus, tmp_path / "ivf", "v", search_cfg=cfg)
    assert built.manifest["first_stage_ann"] == "ivf"
    assert built.manifest["first_stage_ann_params"] == {"ivf_nlist": 1, "ivf_train_size": len(DOCS)}
    loaded = load_index(tmp_path / "ivf", student, nprobe=4)
    assert loaded.ann is not None and loaded.ann.kind == "ivf" and len(loaded.ann) == len(DOCS)
    for query in ("a man plays a guitar", "the dog runs"):
        exact = search(student, exact_index, query, k=3, mode="two_stage", rerank_depth=5)
        approx = search(student, loaded, query, k=3, mode="two_stage", rerank_depth=5)
        assert [h.doc_id for h in approx] == [h.doc_id for h in exact]  # 12 vectors, one list: exact


def test_cli_builds_and_searches_an_ivf_first_stage(tiny_bert_dir, tmp_path, capsys):
    """`d2llm index` with search.ann_index: ivf saves and reports an IVF index; `d2llm search`
    loads it with search.ivf_nprobe and ranks as the library does."""
    import json

    from test_search import DOCS, save_cli_inputs

    from d2llm.cli import main
    from d2llm.search import load_index, search

    search_cfg = {"ann_min_size": 1, "ann_index": "ivf", "ivf_nprobe": 1, "rerank_depth": 4}
    params_file, student = save_cli_inputs(tmp_path, tiny_bert_dir, search_cfg)
    pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(DOCS))], "text": DOCS}).to_csv(
        tmp_path / "docs.csv", index=False
    )

    common = ["--params", str(params_file)]
    index_args = ["index", "--student-dir", str(tmp_path / "student"), "--corpus", str(tmp_path / "docs.csv")]
    assert main([*common, *index_args, "--out-dir", str(tmp_path / "index")]) == 0
    assert "(first stage: ivf)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["first_stage_ann"] == "ivf" and (tmp_path / "index" / ANN_FILE).exists()

    query = "a man plays a guitar"
    search_args = ["search", query, "-k", "2", "--mode", "two_stage"]
    search_args += ["--index-dir", str(tmp_path / "index"), "--student-dir", str(tmp_path / "student")]
    assert main(common + search_args) == 0
    shown = [line.split()[2] for line in capsys.readouterr().out.strip().splitlines()]
    index = load_index(tmp_path / "index", student, nprobe=1)
    assert index.ann is not None and index.ann.kind == "ivf"
    expected = search(student, index, query, k=2, mode="two_stage", rerank_depth=4)
    assert shown == [hit.doc_id for hit in expected] and len(shown) == 2
