"""The corpus index (round trip, stale-index refusal) and full / two-stage search.

``HashStudent`` is a small stand-in with the student's API (encode, passage_cache, score_vectors,
score_matrix): hashed bag-of-words vectors fed to the project's real IEM. It computes real
scores on real vectors, so search results can be checked against brute-force pair scoring.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from d2llm.errors import ArtifactError
from d2llm.search import (
    Bm25Ranker,
    build_index,
    corpus_hash,
    first_stage_recall,
    load_index,
    search,
    student_fingerprint,
    top_k_positions,
)
from d2llm.student.iem import IEM

torch.set_num_threads(1)

DOCS = [
    "a man plays a guitar in the park",
    "a woman plays the piano in the kitchen",
    "the dog runs on the grass",
    "a cat sleeps on the mat",
    "children play with a ball on the beach",
    "a man rides a bike on the street",
    "the bird sings in the park",
    "a woman cooks food in the kitchen",
    "the horse runs in the field",
    "a child reads at the table",
    "two dogs play in the water",
    "an old man walks with a dog",
]
QUERIES = ["who plays a guitar", "a dog running on grass", "cooking in a kitchen", "bird"]


class HashStudent(nn.Module):
    """Stand-in student: mean of hashed word embeddings (the "PMA vector") + the real IEM."""

    def __init__(self, dim: int = 16, buckets: int = 101, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.buckets = buckets
        self.emb = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.iem = IEM(dim, hidden_size=32, branch_size=16)

    def encode(self, texts: list[str], batch_size: int = 32, show_progress: bool = False) -> torch.Tensor:
        ids, offsets = [], []
        for text in texts:
            offsets.append(len(ids))
            ids.extend(zlib.crc32(w.encode()) % self.buckets for w in (text.lower().split() or [""]))
        return self.emb(torch.tensor(ids), torch.tensor(offsets))

    def passage_cache(self, e_b: torch.Tensor) -> torch.Tensor:
        return self.iem.passage_cache(e_b)

    def score_vectors(self, e_a: torch.Tensor, e_b: torch.Tensor, task: str) -> torch.Tensor:
        return self.iem(e_a, e_b, task)[0]

    def score_matrix(self, e_a: torch.Tensor, cache_b: torch.Tensor, task: str, chunk_size: int = 65_536):
        return self.iem.score_matrix(e_a, cache_b, task, chunk_size)


@pytest.fixture()
def corpus() -> pd.DataFrame:
    return pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(DOCS))], "text": DOCS})


@pytest.fixture()
def student() -> HashStudent:
    return HashStudent().eval()


@pytest.fixture()
def built(tmp_path, student, corpus):
    out = tmp_path / "index"
    return out, build_index(student, corpus, out, model_version="test-v1", batch_size=5)


# --------------------------------------------------------------------------- hashing


def test_corpus_hash_separates_fields_and_follows_order():
    assert corpus_hash(["ab"], ["c"]) != corpus_hash(["a"], ["bc"])
    assert corpus_hash(["a", "b"], ["x", "y"]) != corpus_hash(["b", "a"], ["y", "x"])
    assert corpus_hash(["a"], ["x"]) == corpus_hash(["a"], ["x"])


def test_fingerprint_follows_the_weights(student):
    copy = HashStudent(seed=5)
    assert student_fingerprint(copy) != student_fingerprint(student)
    copy.load_state_dict(student.state_dict())
    assert student_fingerprint(copy) == student_fingerprint(student)
    with torch.no_grad():
        copy.iem.out.bias.add_(1e-6)
    assert student_fingerprint(copy) != student_fingerprint(student)


# --------------------------------------------------------------------------- index round trip


def test_index_round_trip(built, student, corpus):
    out, index = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_version"] == "test-v1"
    assert manifest["n_docs"] == len(DOCS) and manifest["n_passages"] == len(DOCS)
    assert manifest["passages"] is None  # a stand-in without a tokenizer: each text is one passage
    assert manifest["vector_dim"] == 16 and manifest["cache_dim"] == 32
    assert manifest["corpus_hash"] == corpus_hash(corpus["doc_id"], corpus["text"])
    assert manifest["student_fingerprint"] == student_fingerprint(student)
    assert manifest["created"].endswith("Z")

    loaded = load_index(out, student, expected_corpus_hash=manifest["corpus_hash"])
    assert loaded.doc_ids == corpus["doc_id"].tolist() and loaded.texts == DOCS
    torch.testing.assert_close(loaded.vectors, index.vectors)
    torch.testing.assert_close(loaded.passage_cache, index.passage_cache)
    # The stored vectors are the student's, computed in batches of 5 with the same result.
    torch.testing.assert_close(loaded.vectors, student.encode(DOCS).detach())
    torch.testing.assert_close(loaded.passage_cache, student.passage_cache(student.encode(DOCS)).detach())


def test_stale_index_is_refused_for_a_changed_corpus(built, student, corpus):
    out, index = built
    changed = corpus.copy()
    changed.loc[3, "text"] = "a cat sits on the mat"
    new_hash = corpus_hash(changed["doc_id"], changed["text"])
    with pytest.raises(ArtifactError, match="stale index") as err:
        load_index(out, student, expected_corpus_hash=new_hash)
    assert index.manifest["corpus_hash"][:16] in str(err.value) and new_hash[:16] in str(err.value)


def test_stale_index_is_refused_for_a_changed_model(built):
    out, index = built
    other = HashStudent(seed=1)
    with pytest.raises(ArtifactError, match="stale index") as err:
        load_index(out, other)
    message = str(err.value)
    assert index.manifest["student_fingerprint"][:16] in message
    assert student_fingerprint(other)[:16] in message and "test-v1" in message


def test_tampered_or_incomplete_index_is_refused(built, student):
    out, _ = built
    stored = pd.read_parquet(out / "corpus.parquet")
    stored.loc[0, "text"] = "edited by hand"
    stored.to_parquet(out / "corpus.parquet", index=False)
    with pytest.raises(ArtifactError, match="corrupt"):
        load_index(out, student)
    (out / "vectors.npy").unlink()
    with pytest.raises(ArtifactError, match=r"vectors.npy is missing"):
        load_index(out, student)
    # An index written by an older format is refused with the way out, not misread.
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"format_version": 1}))
    with pytest.raises(ArtifactError, match=r"has format 1, this code reads format 2: rebuild it"):
        load_index(out, student)


def test_build_index_checks_the_corpus(tmp_path, student):
    with pytest.raises(ArtifactError, match="not unique"):
        build_index(student, pd.DataFrame({"doc_id": ["a", "a"], "text": ["x", "y"]}), tmp_path / "i", "v")
    with pytest.raises(ArtifactError, match="lacks column"):
        build_index(student, pd.DataFrame({"id": ["a"], "text": ["x"]}), tmp_path / "i", "v")


# --------------------------------------------------------------------------- search


def _brute_force(student, query: str) -> np.ndarray:
    """IEM logit of the query against every document, pair by pair, no cache, no chunks."""
    with torch.no_grad():
        e_q, e_d = student.encode([query]), student.encode(DOCS)
        return student.score_vectors(e_q.expand(len(DOCS), -1), e_d, "asym").numpy()


@pytest.mark.parametrize("query", QUERIES)
def test_full_search_equals_brute_force_pair_scoring(built, student, query):
    _, index = built
    expected = _brute_force(student, query)
    hits = search(student, index, query, k=len(DOCS), mode="full")
    assert [h.doc_id for h in hits] == [f"d{p}" for p in top_k_positions(expected, len(DOCS))]
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected)[::-1], rtol=1e-5, atol=1e-6)
    assert hits[0].text == DOCS[int(hits[0].doc_id[1:])]


@pytest.mark.parametrize("query", QUERIES)
def test_chunked_and_unchunked_search_agree(built, student, query):
    _, index = built
    whole = search(student, index, query, k=5, mode="full", chunk_size=10_000)
    for chunk in (1, 3, 5):
        chunked = search(student, index, query, k=5, mode="full", chunk_size=chunk)
        assert [h.doc_id for h in chunked] == [h.doc_id for h in whole]
        np.testing.assert_allclose([h.score for h in chunked], [h.score for h in whole], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first_stage", ["cosine", "bm25"])
@pytest.mark.parametrize("query", QUERIES)
def test_two_stage_with_depth_equal_to_corpus_is_full_search(built, student, query, first_stage):
    _, index = built
    full = search(student, index, query, k=6, mode="full")
    two = search(
        student, index, query, k=6, mode="two_stage", first_stage=first_stage, rerank_depth=len(DOCS)
    )
    assert [h.doc_id for h in two] == [h.doc_id for h in full]
    np.testing.assert_allclose([h.score for h in two], [h.score for h in full], rtol=1e-5, atol=1e-6)


def test_two_stage_only_returns_first_stage_candidates(built, student):
    _, index = built
    query = "a man plays a guitar"
    bm25_top = {f"d{p}" for p in Bm25Ranker.build(DOCS).top(query, 3)}
    hits = search(student, index, query, k=3, mode="two_stage", first_stage="bm25", rerank_depth=3)
    assert len(hits) == 3 and {h.doc_id for h in hits} == bm25_top
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Asked for more documents than M, it re-ranks that many: k documents come back.
    deeper = search(student, index, query, k=5, mode="two_stage", first_stage="bm25", rerank_depth=3)
    assert len(deeper) == 5 and {h.doc_id for h in deeper} == {
        f"d{p}" for p in Bm25Ranker.build(DOCS).top(query, 5)
    }


@pytest.mark.parametrize("mode", ["full", "two_stage"])
def test_hybrid_search_fuses_standardised_iem_and_bm25_by_hand(built, student, mode):
    """``lexical_weight`` w: a document scores z(IEM) + w * z(BM25), each standardised over the
    documents scored (here every document: M = the corpus)."""
    _, index = built
    query = "a man plays a guitar in the kitchen"
    iem = {h.doc_id: h.score for h in search(student, index, query, k=len(DOCS), mode="full")}
    bm25 = dict(zip([f"d{i}" for i in range(len(DOCS))], Bm25Ranker.build(DOCS).scores(query), strict=True))
    ids = list(iem)
    z_iem = (np.array([iem[d] for d in ids]) - np.mean(list(iem.values()))) / np.std(list(iem.values()))
    b = np.array([bm25[d] for d in ids], dtype=np.float64)
    expected = dict(zip(ids, z_iem + 0.5 * (b - b.mean()) / b.std(), strict=True))
    hits = search(student, index, query, k=4, mode=mode, rerank_depth=len(DOCS), lexical_weight=0.5)
    best4 = sorted(expected, key=lambda d: -expected[d])[:4]
    assert [h.doc_id for h in hits] == best4
    np.testing.assert_allclose([h.score for h in hits], [expected[d] for d in best4], rtol=1e-5, atol=1e-6)
    assert best4 != sorted(iem, key=lambda d: -iem[d])[:4]  # BM25 moved the ranking
    plain = search(student, index, query, k=4, mode=mode, rerank_depth=len(DOCS))
    assert plain == search(student, index, query, k=4, mode=mode, rerank_depth=len(DOCS), lexical_weight=0.0)
    with pytest.raises(ValueError, match="lexical_weight"):
        search(student, index, query, mode=mode, lexical_weight=-1.0)


def test_first_stage_recall(built, student):
    _, index = built
    perfect = first_stage_recall(student, index, QUERIES, k=3, first_stage="cosine", rerank_depth=len(DOCS))
    assert perfect["recall"] == 1.0 and perfect["n_queries"] == len(QUERIES)
    # With M = 2, by hand: |full top-3 ∩ cosine top-2| / 3 per query, averaged.
    expected = []
    for q in QUERIES:
        full_top = {h.doc_id for h in search(student, index, q, k=3, mode="full")}
        with torch.no_grad():
            e_q = student.encode([q])
        cos = torch.nn.functional.cosine_similarity(e_q, index.vectors).numpy()
        kept = {f"d{p}" for p in top_k_positions(cos, 2)}
        expected.append(len(full_top & kept) / 3)
    measured = first_stage_recall(student, index, QUERIES, k=3, first_stage="cosine", rerank_depth=2)
    assert measured["recall"] == pytest.approx(np.mean(expected))
    assert measured["recall"] <= 2 / 3 + 1e-9  # 2 kept documents can hold at most 2 of 3


def test_search_rejects_bad_arguments(built, student):
    _, index = built
    with pytest.raises(ValueError, match="unknown search mode"):
        search(student, index, "dog", mode="fast")
    with pytest.raises(ValueError, match="unknown first stage"):
        search(student, index, "dog", mode="two_stage", first_stage="splade")
    with pytest.raises(ValueError, match="k must be"):
        search(student, index, "dog", k=0)


def test_bm25_ranker():
    bm25 = Bm25Ranker.build(DOCS)
    assert bm25.top("guitar", 1).tolist() == [0]
    assert bm25.top("piano kitchen", 2).tolist()[0] == 1
    assert not bm25.scores("zebra").any()  # no known term: every score is 0
    assert top_k_positions(np.array([0.5, 0.9, 0.5, 0.1]), 3).tolist() == [1, 0, 2]  # ties by position


def test_bm25_saved_and_loaded_scores_alike(tmp_path):
    built = Bm25Ranker.build(DOCS)
    built.save(tmp_path / "bm25")
    loaded = Bm25Ranker.load(tmp_path / "bm25")
    assert loaded.size == len(DOCS)
    for query in ("guitar", "piano kitchen", "zebra", "a dog in the garden"):
        np.testing.assert_array_equal(loaded.scores(query), built.scores(query))


def test_index_saves_its_bm25_and_search_reads_it(built, student, monkeypatch):
    out, index = built
    assert json.loads((out / "manifest.json").read_text())["bm25"] == "bm25"
    loaded = load_index(out, student)
    assert loaded.bm25_index is not None and loaded.bm25_index.size == len(DOCS)
    expected = [(h.doc_id, h.score) for h in search(student, index, "piano kitchen", k=4, lexical_weight=1.5)]

    def no_rebuild(texts):
        raise AssertionError("a saved index rebuilt its BM25")

    monkeypatch.setattr(Bm25Ranker, "build", staticmethod(no_rebuild))
    hits = search(student, loaded, "piano kitchen", k=4, lexical_weight=1.5)
    assert [h.doc_id for h in hits] == [d for d, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], rtol=1e-5)
    bm25_first = search(student, loaded, "guitar", k=2, mode="two_stage", first_stage="bm25", rerank_depth=2)
    assert "d0" in {h.doc_id for h in bm25_first}


def test_index_without_saved_bm25_builds_it_on_use_or_is_refused(built, student):
    out, index = built
    expected = [h.doc_id for h in search(student, index, "piano kitchen", k=4, lexical_weight=1.5)]
    shutil.rmtree(out / "bm25")
    # The manifest names the folder: its absence is an incomplete index, not a silent rebuild.
    with pytest.raises(ArtifactError, match=r"bm25/ is missing"):
        load_index(out, student)
    # An index written before BM25 was saved (no "bm25" in its manifest) builds it on first use.
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["bm25"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    older = load_index(out, student)
    assert older.bm25_index is None
    assert [h.doc_id for h in search(student, older, "piano kitchen", k=4, lexical_weight=1.5)] == expected
    assert older.bm25_index is not None and older.bm25_index.size == len(DOCS)


def test_index_with_a_bm25_of_another_corpus_is_refused(built, student):
    out, _ = built
    shutil.rmtree(out / "bm25")
    Bm25Ranker.build(DOCS[:3]).save(out / "bm25")
    with pytest.raises(ArtifactError, match=r"corrupt: bm25/ holds 3 passages, not 12"):
        load_index(out, student)


# --------------------------------------------------------------------------- with the real student


@pytest.mark.parametrize("lora", [False, True])
def test_index_built_in_memory_loads_for_the_saved_and_reloaded_student(
    tiny_bert_dir, tmp_path, corpus, lora
):
    """Training builds the index from the in-memory student; serving reloads the student from disk."""
    from d2llm.config import StudentConfig
    from d2llm.hub import seed_everything
    from d2llm.student.model import D2LLMStudent

    seed_everything(0)
    cfg = StudentConfig(
        backbone=str(tiny_bert_dir),
        max_length=32,
        lora={"enabled": lora, "r": 2, "alpha": 2},
        pma={"num_heads": 4},
        iem={"hidden_size": 16, "branch_size": 8},
    )
    trained = D2LLMStudent.from_config(cfg, device="cpu")
    with torch.no_grad():  # as if trained: heads differ from a fresh initialisation
        trained.iem.out.bias.add_(0.5)
    built = build_index(trained, corpus, tmp_path / "index", model_version="v1", batch_size=4)
    reloaded = D2LLMStudent.from_pretrained(trained.save_pretrained(tmp_path / "student"))

    index = load_index(tmp_path / "index", reloaded)
    torch.testing.assert_close(index.passage_cache, built.passage_cache)
    before = search(trained, built, "a man plays a guitar", k=3)
    after = search(reloaded, index, "a man plays a guitar", k=3)
    assert [h.doc_id for h in after] == [h.doc_id for h in before]

    with torch.no_grad():
        reloaded.iem.out.bias.add_(0.1)  # a retrained student must not reuse the old index
    with pytest.raises(ArtifactError, match="stale index"):
        load_index(tmp_path / "index", reloaded)


def save_cli_inputs(tmp_path: Path, tiny_bert_dir: Path, search_cfg: dict | None = None):
    """A params.yaml (tiny student, ``search_cfg``) and a seeded tiny student saved in
    ``tmp_path/student``, as the CLI tests read them: ``(params file, student)``."""
    import yaml

    from d2llm.config import params_from_dict
    from d2llm.hub import seed_everything
    from d2llm.student.model import D2LLMStudent

    student_cfg = {
        "backbone": str(tiny_bert_dir),
        "max_length": 32,
        "lora": {"enabled": False},
        "pma": {"num_heads": 4},
        "iem": {"hidden_size": 16, "branch_size": 8},
    }
    params = params_from_dict({"device": "cpu", "student": student_cfg, "search": search_cfg or {}})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    seed_everything(0)
    student = D2LLMStudent.from_config(params.student, device="cpu")
    student.save_pretrained(tmp_path / "student")
    return params_file, student


def test_cli_searches_a_file_of_queries_with_json_output(tiny_bert_dir, tmp_path, corpus, capsys):
    """``--queries FILE`` runs every non-blank line through one loaded model; ``--json`` prints one
    object per hit, the same hits and scores as ``search`` gives for each query."""
    from d2llm.cli import main

    params_file, student = save_cli_inputs(tmp_path, tiny_bert_dir)
    build_index(student, corpus, tmp_path / "index", model_version="test-v1", batch_size=5)
    queries = ["a man plays a guitar", "a dog in the garden"]
    (tmp_path / "queries.txt").write_text(f"{queries[0]}\n\n  {queries[1]}  \n", encoding="utf-8")
    common = ["--params", str(params_file), "search", "-k", "3", "--mode", "full", "--lexical-weight", "0.5"]
    common += ["--index-dir", str(tmp_path / "index"), "--student-dir", str(tmp_path / "student")]
    assert main([*common, "--queries", str(tmp_path / "queries.txt"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    index = load_index(tmp_path / "index", student)
    expected = [
        (q, rank, hit)
        for q in queries
        for rank, hit in enumerate(search(student, index, q, k=3, mode="full", lexical_weight=0.5), start=1)
    ]
    assert len(rows) == len(expected) == 6
    for row, (query, rank, hit) in zip(rows, expected, strict=True):
        assert (row["query"], row["rank"], row["doc_id"], row["passage"]) == (query, rank, hit.doc_id, 0)
        assert row["score"] == pytest.approx(hit.score) and row["text"] == hit.text
    # The table form heads each query's hits with the query.
    assert main([*common, "--queries", str(tmp_path / "queries.txt")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"query: {queries[0]}" and lines[4] == f"query: {queries[1]}" and len(lines) == 8
    # One query or a file, not neither nor both; an empty file is refused before the model loads.
    assert main(common) == 1
    assert "give one query, or --queries FILE" in capsys.readouterr().err
    assert main([*common, "dog", "--queries", str(tmp_path / "queries.txt")]) == 1
    assert "not both" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    assert main([*common, "--queries", str(tmp_path / "empty.txt")]) == 1
    assert "no query in it" in capsys.readouterr().err
    assert main([*common, "--queries", str(tmp_path / "missing.txt")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_cli_index_and_search(tiny_bert_dir, tmp_path, corpus, capsys):
    from d2llm.cli import main

    params_file, student = save_cli_inputs(tmp_path, tiny_bert_dir)
    (tmp_path / "prepared" / "ir" / "toy").mkdir(parents=True)
    corpus.to_parquet(tmp_path / "prepared" / "ir" / "toy" / "corpus.parquet")

    common = ["--params", str(params_file)]
    index_args = ["index", "--student-dir", str(tmp_path / "student"), "--dataset", "toy"]
    index_args += ["--prepared-dir", str(tmp_path / "prepared"), "--out-dir", str(tmp_path / "index")]
    assert main(common + index_args) == 0
    assert f"indexed {len(DOCS)} documents of toy" in capsys.readouterr().out

    search_args = ["search", "a man plays a guitar", "-k", "3", "--mode", "full"]
    search_args += ["--index-dir", str(tmp_path / "index"), "--student-dir", str(tmp_path / "student")]
    assert main(common + search_args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    index = load_index(tmp_path / "index", student)
    expected = search(student, index, "a man plays a guitar", k=3, mode="full")
    assert len(lines) == 3
    for rank, (line, hit) in enumerate(zip(lines, expected, strict=True), start=1):
        shown_rank, score, doc_id = line.split()[:3]
        assert int(shown_rank) == rank
        assert doc_id == hit.doc_id and float(score) == pytest.approx(hit.score, abs=1e-4)

    # A missing index is a clear error, not a traceback.
    missing = [
        "search",
        "dog",
        "--index-dir",
        str(tmp_path / "nope"),
        "--student-dir",
        str(tmp_path / "student"),
    ]
    assert main(common + missing) == 1
    assert "is incomplete: manifest.json is missing" in capsys.readouterr().err
