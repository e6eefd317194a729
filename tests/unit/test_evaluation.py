"""The three-system evaluation on tiny real models (random BERT, real teacher and student code)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from d2llm.config import Params, TeacherConfig, params_from_dict
from d2llm.errors import ArtifactError
from d2llm.evaluation import metrics as M
from d2llm.evaluation.evaluate import (
    BiEncoderBaseline,
    Bm25System,
    PassageCorpus,
    StudentScorer,
    TeacherScorer,
    evaluate_pair_dataset,
    evaluate_systems,
    format_table,
    load_systems,
)
from d2llm.passages import PassageSpans
from d2llm.search import build_index, search

torch.set_num_threads(1)

NLI = [  # (premise, hypothesis, label_name, split)
    ("a man plays a guitar", "a man plays", "entailment", "test"),
    ("a woman sings in the kitchen", "a woman sings", "entailment", "test"),
    ("a dog runs on the grass", "a cat sleeps", "contradiction", "test"),
    ("the child reads at the table", "a child is reading", "entailment", "test"),
    ("a bird sings in the park", "a horse runs in the field", "neutral", "test"),
    ("a man rides a bike", "a woman cooks food", "contradiction", "test"),
    ("the cat sits on the mat", "the cat sits", "entailment", "train"),
    ("the dog eats food", "a bird sings", "neutral", "train"),
]
STS = [  # (a, b, score 0-5, split)
    ("a man plays a guitar", "a man plays a guitar", 5.0, "test"),
    ("a man plays a guitar", "a person plays the piano", 3.2, "test"),
    ("a dog runs on the grass", "the dog is running on grass", 4.4, "test"),
    ("a cat sleeps on the mat", "a woman cooks food", 0.2, "test"),
    ("children play on the beach", "a child plays on the beach", 4.0, "test"),
    ("the bird sings", "the horse runs", 1.0, "test"),
    ("a man walks", "a man is walking", 4.8, "dev"),
    ("a cat sleeps", "a dog barks loudly", 1.2, "dev"),
    ("the sun is hot", "a car is red", 0.0, "dev"),
]
DOCS = {
    "d1": "a man plays a guitar in the park",
    "d2": "a woman plays the piano in the kitchen",
    "d3": "the dog runs on the grass",
    "d4": "a cat sleeps on the mat",
    "d5": "children play with a ball on the beach",
    "d6": "a man rides a bike on the street",
    "d7": "the bird sings in the park",
    "d8": "a woman cooks food in the kitchen",
}
QUERIES = {"q1": "who plays a guitar", "q2": "a dog on grass", "q3": "cooking food", "q4": "a red car"}
QRELS = [("q1", "d1", 2), ("q1", "d2", 1), ("q2", "d3", 1), ("q3", "d8", 1), ("q3", "d2", 0), ("q4", "d6", 0)]


def _pairs_frame(rows, kind: str) -> pd.DataFrame:
    if kind == "class":
        classes = ["entailment", "neutral", "contradiction"]
        return pd.DataFrame(
            {
                "text_a": [r[0] for r in rows],
                "text_b": [r[1] for r in rows],
                "label": [float(classes.index(r[2])) for r in rows],
                "label_name": [r[2] for r in rows],
                "task": "sym",
                "source": "test",
                "split": [r[3] for r in rows],
                "is_positive": [r[2] == "entailment" for r in rows],
            }
        )
    return pd.DataFrame(
        {
            "text_a": [r[0] for r in rows],
            "text_b": [r[1] for r in rows],
            "label": [r[2] for r in rows],
            "label_name": "",
            "task": "sym",
            "source": "test",
            "split": [r[3] for r in rows],
            "is_positive": [r[2] >= 4.0 for r in rows],
        }
    )


@pytest.fixture()
def prepared(tmp_path):
    root = tmp_path / "prepared"
    (root / "pairs").mkdir(parents=True)
    _pairs_frame(NLI, "class").to_parquet(root / "pairs" / "nli.parquet", index=False)
    _pairs_frame(STS, "score").to_parquet(root / "pairs" / "sts.parquet", index=False)
    ir = root / "ir" / "tiny"
    ir.mkdir(parents=True)
    pd.DataFrame({"doc_id": list(DOCS), "text": list(DOCS.values())}).to_parquet(ir / "corpus.parquet")
    pd.DataFrame({"query_id": list(QUERIES), "text": list(QUERIES.values())}).to_parquet(
        ir / "queries.parquet"
    )
    pd.DataFrame(QRELS, columns=["query_id", "doc_id", "relevance"]).to_parquet(ir / "qrels.parquet")
    return root


def _params(tiny_bert_dir, **evaluation) -> Params:
    return params_from_dict(
        {
            "device": "cpu",
            "student": {
                "backbone": str(tiny_bert_dir),
                "max_length": 32,
                "lora": {"enabled": False},
                "pma": {"num_heads": 4},
                "iem": {"hidden_size": 16, "branch_size": 8},
            },
            "teacher": {
                "kind": "cross_encoder",
                "model": str(tiny_bert_dir),
                "max_length": 64,
                "batch_size": 4,
            },
            "evaluation": {
                "pair_datasets": ["nli", "sts"],
                "ir_datasets": ["tiny"],
                "batch_size": 4,
                "validation_datasets": ["sts"],
                **evaluation,
            },
        }
    )


@pytest.fixture(scope="module")
def models(tiny_bert_dir):
    """Real systems on the tiny random BERT: baseline, cross-encoder teacher, D2LLM student."""
    from d2llm.hub import seed_everything
    from d2llm.student.model import D2LLMStudent
    from d2llm.teachers.factory import load_teacher

    params = _params(tiny_bert_dir)
    seed_everything(0)
    student = D2LLMStudent.from_config(params.student, device="cpu")
    teacher = load_teacher(TeacherConfig(**params.teacher.model_dump()), None, "cpu")
    bi = BiEncoderBaseline.from_ref(str(tiny_bert_dir), max_length=32, batch_size=3, device="cpu")
    return {
        "bm25": Bm25System(),
        "bi-encoder": bi,
        "teacher": TeacherScorer(teacher, 1.0, rerank_depth=5),
        "student": StudentScorer(student, batch_size=4, chunk_size=3),
    }


# --------------------------------------------------------------------------- systems


def test_bi_encoder_is_masked_mean_pooling_cosine(tiny_bert_dir):
    from transformers import AutoModel, AutoTokenizer

    bi = BiEncoderBaseline.from_ref(str(tiny_bert_dir), max_length=32, batch_size=4, device="cpu")
    texts = ["a man plays a guitar in the park", "a dog", "the cat sleeps on the mat"]
    model, tok = AutoModel.from_pretrained(tiny_bert_dir), AutoTokenizer.from_pretrained(tiny_bert_dir)
    with torch.no_grad():  # one text at a time: no padding at all
        expected = torch.stack(
            [model(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0) for t in texts]
        )
    expected = torch.nn.functional.normalize(expected, dim=-1)
    torch.testing.assert_close(bi.encode(texts), expected, rtol=1e-4, atol=1e-5)
    scores = bi.score_pairs(texts, [texts[0], texts[1], texts[0]], "sym")
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[1] == pytest.approx(1.0, abs=1e-5)
    assert scores[2] == pytest.approx(float(expected[2] @ expected[0]), abs=1e-5)
    # Vectors are remembered per text: a later call in another order and with new texts gives
    # the vectors of a one-text-at-a-time encoding, whatever was encoded before.
    more = ["a bird sings", texts[2], texts[0]]
    with torch.no_grad():
        bird = model(**tok(more[0], return_tensors="pt")).last_hidden_state[0].mean(0)
    again = torch.stack([torch.nn.functional.normalize(bird, dim=-1), expected[2], expected[0]])
    torch.testing.assert_close(bi.encode(more), again, rtol=1e-4, atol=1e-5)


def _whole(docs: dict[str, str]) -> PassageCorpus:
    """A collection read one passage per document (every test document fits the window)."""
    texts = list(docs.values())
    return PassageCorpus(list(docs), texts, PassageSpans.one_per_document(texts))


def test_teacher_ranking_reranks_bm25_top_m(models):
    teacher: TeacherScorer = models["teacher"]
    corpus = list(DOCS.values())
    ranking = teacher.rank(["who plays a guitar"], _whole(DOCS), depth=100)[0]
    bm25 = [p for p, _ in Bm25System().rank(["who plays a guitar"], _whole(DOCS), 100)[0]]
    head, tail = ranking[:5], ranking[5:]
    assert {p for p, _ in head} == set(bm25[:5])  # BM25's top 5, re-ordered by the teacher
    direct = teacher.score_pairs(["who plays a guitar"] * 5, [corpus[p] for p, _ in head], "asym")
    np.testing.assert_allclose([s for _, s in head], direct, rtol=1e-5)
    # The rest of BM25's ranking follows in its own order, scored below every re-ranked document,
    # so R@100 counts as deep a ranking as the other systems'.
    assert len(bm25) > 5 and [p for p, _ in tail] == bm25[5:]
    assert [s for _, s in ranking] == sorted((s for _, s in ranking), reverse=True)
    assert len(teacher.rank(["who plays a guitar"], _whole(DOCS), depth=3)[0]) == 3
    # The report says what it did, with no tail where the re-ranked top fills the ranking.
    assert teacher.protocol(100) == "re-ranks BM25 top 5 per query; BM25 ranks 6-100 follow in its order"
    assert teacher.protocol(5) == teacher.protocol(3) == "re-ranks BM25 top 5 per query"


def test_teacher_ranking_can_rerank_the_bi_encoders_top_m(models):
    """``evaluation.teacher_first_stage: bi-encoder``: the candidates are the bi-encoder's top M
    (where they differ from BM25's), re-ordered by the teacher's own scores."""
    bi = models["bi-encoder"]
    teacher = copy.copy(models["teacher"])
    teacher.first_stage = bi
    corpus, query, whole = list(DOCS.values()), "who plays a guitar", _whole(DOCS)
    ranking = teacher.rank([query], whole, depth=100)[0]
    bi_top = {p for p, _ in bi.rank([query], whole, 5)[0]}
    bm25_top = {p for p, _ in Bm25System().rank([query], whole, 5)[0]}
    assert bi_top != bm25_top  # the test tells the two first stages apart
    assert {p for p, _ in ranking[:5]} == bi_top
    direct = teacher.score_pairs([query] * 5, [corpus[p] for p, _ in ranking[:5]], "asym")
    np.testing.assert_allclose([s for _, s in ranking[:5]], direct, rtol=1e-5)
    assert [p for p, _ in ranking[5:]] == [p for p, _ in bi.rank([query], whole, 100)[0][5:]]


def test_student_ranking_is_the_shipped_search_over_an_index(models, tmp_path):
    scorer: StudentScorer = models["student"]
    corpus = pd.DataFrame({"doc_id": list(DOCS), "text": list(DOCS.values())})
    index = build_index(scorer.student, corpus, tmp_path / "index", "v0", batch_size=3)
    ranking = scorer.rank(["who plays a guitar"], _whole(DOCS), depth=4)[0]
    cfg = scorer.search_cfg  # two-stage by default, as `d2llm search` runs
    hits = search(scorer.student, index, "who plays a guitar", 4, cfg.mode, cfg.first_stage, cfg.rerank_depth)
    assert [list(DOCS)[p] for p, _ in ranking] == [h.doc_id for h in hits]
    np.testing.assert_allclose([s for _, s in ranking], [h.score for h in hits], rtol=1e-5, atol=1e-6)


def test_student_ranking_below_the_rerank_depth_follows_the_first_stage(models, tmp_path):
    """Two-stage search re-ranks the first stage's top M documents; deeper lists (R@100) go on
    with the first stage's next documents in its own order, as the teacher's ranking does."""
    from d2llm.search import encode_query, first_stage_documents

    scorer = copy.copy(models["student"])
    scorer.search_cfg = scorer.search_cfg.model_copy(update={"first_stage": "bm25", "rerank_depth": 3})
    corpus = pd.DataFrame({"doc_id": list(DOCS), "text": list(DOCS.values())})
    index = build_index(scorer.student, corpus, tmp_path / "index", "v0", batch_size=3)
    query = "who plays a guitar"
    ranking = scorer.rank([query], _whole(DOCS), depth=len(DOCS))[0]
    assert len(ranking) == len(DOCS)  # as deep as the other systems' rankings
    hits = search(scorer.student, index, query, 3, "two_stage", "bm25", rerank_depth=3)
    assert [list(DOCS)[p] for p, _ in ranking[:3]] == [h.doc_id for h in hits]
    first_stage = first_stage_documents(index, query, encode_query(scorer.student, query), "bm25", len(DOCS))
    assert {p for p, _ in ranking[:3]} == set(first_stage[:3].tolist())
    assert [p for p, _ in ranking[3:]] == first_stage[3:].tolist()
    assert [s for _, s in ranking] == sorted((s for _, s in ranking), reverse=True)
    assert "bm25 first stage top 3 documents" in scorer.protocol()


def test_ir_systems_rank_the_passages_the_shipped_search_reads(models, tiny_bert_dir):
    """A long document whose only match is in its second passage: BM25 and the bi-encoder find it
    by its best passage and not by its first, as the shipped search's aggregation says."""
    from transformers import AutoTokenizer

    from d2llm.config import SearchConfig

    filler = " ".join(["the weather report mentions clouds and light rain"] * 6)
    docs = {"long": f"{filler} a musician plays a guitar on stage", **DOCS}
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    ids, texts = list(docs), list(docs.values())
    by = {
        how: PassageCorpus.split(ids, texts, tokenizer, 32, SearchConfig(aggregation=how))
        for how in ("best", "first")
    }
    assert len(by["best"].spans) > len(docs)  # the long document is several passages
    assert by["best"].describe()["scheme"] == {"window": 30, "stride": 22}
    query = "who plays a guitar"
    for system in (Bm25System(), models["bi-encoder"]):
        best = dict(system.rank([query], by["best"], 100)[0])
        first = dict(system.rank([query], by["first"], 100)[0])
        assert len(best) == len(first) == len(docs)  # documents, each once
        assert best[0] > first[0]  # its second passage matches, its first does not


def test_rank_documents_by_best_first_or_blend_by_hand():
    from d2llm.search import distinct_in_order, rank_documents

    # Documents 0 (passages 0-2), 1 (passage 3), 2 (passages 4-5).
    spans = PassageSpans(
        np.array([0, 0, 0, 1, 2, 2]), np.zeros(6, dtype=np.int64), np.ones(6, dtype=np.int64)
    )
    scores = np.array([0.1, 0.9, 0.2, 0.5, 0.6, 0.3])
    positions = np.arange(6)
    shown, value = rank_documents(positions, scores, spans, 3, "best")
    assert shown.tolist() == [1, 4, 3] and value.tolist() == pytest.approx([0.9, 0.6, 0.5])
    shown, value = rank_documents(positions, scores, spans, 3, "first")
    assert shown.tolist() == [4, 3, 0] and value.tolist() == pytest.approx([0.6, 0.5, 0.1])
    shown, value = rank_documents(positions, scores, spans, 3, "blend", first_weight=0.25)
    assert value.tolist() == pytest.approx([0.75 * 0.9 + 0.25 * 0.1, 0.75 * 0.6 + 0.25 * 0.6, 0.5])
    assert shown.tolist() == [1, 4, 3]  # the best passage is shown with a blended score
    # A first stage's documents, read whole: every passage of each, in position order.
    assert spans.passages_of(np.array([2, 0])).tolist() == [0, 1, 2, 4, 5]
    assert spans.passages_of(np.array([], dtype=np.int64)).tolist() == []
    assert distinct_in_order(spans.doc[[4, 1, 5, 3, 0]]).tolist() == [2, 0, 1]  # best passage first
    with pytest.raises(ValueError, match="first passage"):
        rank_documents(np.array([1, 5]), scores[[1, 5]], spans, 2, "first")


def test_reorder_head_by_hand_plain_and_fused_with_bm25():
    from d2llm.evaluation.evaluate import reorder_head

    row = [(3, 0.9), (0, 0.8), (2, 0.7), (1, 0.6)]  # documents 3, 0, 2 kept (depth 3), then 1
    dense = np.array([0.2, 0.9, 0.5, 0.1])
    lexical = np.array([4.0, 0.0, 1.0, 7.0])
    assert [d for d, _ in reorder_head(row, 3, dense)] == [2, 0, 3, 1]
    # Fused over the kept documents only: z(dense) + 1.0 * z(lexical) on documents 3, 0, 2.
    z = lambda v: (v - v.mean()) / v.std()  # noqa: E731
    fused = z(dense[[3, 0, 2]]) + z(lexical[[3, 0, 2]])
    ranked = reorder_head(row, 3, dense, lexical, 1.0)
    assert [d for d, _ in ranked] == [3, 2, 0, 1]
    np.testing.assert_allclose([s for _, s in ranked[:3]], sorted(fused, reverse=True))
    assert ranked[3][1] < min(fused)  # the rest below every kept document


def test_same_candidates_of_a_full_search_is_the_bi_encoder_fused_over_every_document(prepared, models):
    """With ``search.mode: full`` the student scores (and fuses) every document, so its baseline is
    the bi-encoder ranking every document with the same BM25 fusion, computed here by hand."""
    from d2llm.config import SearchConfig
    from d2llm.evaluation.evaluate import evaluate_ir_dataset
    from d2llm.search import Bm25Ranker, standardised

    cfg = SearchConfig(mode="full", lexical_weight=1.0)
    student = StudentScorer(models["student"].student, batch_size=4, chunk_size=3, search_cfg=cfg)
    systems = {"bi-encoder": models["bi-encoder"], "student": student}
    tables = {
        t: pd.read_parquet(prepared / "ir" / "tiny" / f"{t}.parquet") for t in ("corpus", "queries", "qrels")
    }
    entry = evaluate_ir_dataset("tiny", **tables, systems=systems)
    same = entry["same_candidates"]
    assert same["protocol"] == (
        "the bi-encoder ranking every document, as full search does, fused as the student is: "
        "z(cosine) + 1 z(BM25)"
    )
    docs, ids = list(DOCS.values()), list(DOCS)
    bm25 = Bm25Ranker.build(docs)
    judged = {q for q, _, r in QRELS if r > 0}
    run = {}
    for qid, text in QUERIES.items():
        if qid not in judged:
            continue
        cos = models["bi-encoder"].score_pairs([text] * len(docs), docs, "asym")
        fused = standardised(cos) + standardised(bm25.scores(text))
        run[qid] = {ids[d]: float(fused[d]) for d in range(len(docs))}
    qrels = {}
    for q, d, r in QRELS:
        if q in judged:
            qrels.setdefault(q, {})[d] = r
    per_query, _ = M.ir_per_query(qrels, run)
    expected = 100 * np.mean([v["ndcg@10"] for v in per_query.values()])
    assert same["metrics"]["ndcg@10"] == pytest.approx(expected)
    # The fusion is what moved it: the bi-encoder alone ranks this corpus worse.
    assert entry["metrics"]["bi-encoder"]["ndcg@10"] < same["metrics"]["ndcg@10"]


# --------------------------------------------------------------------------- evaluate_systems


@pytest.fixture()
def saved_models(models, tmp_path):
    """The teacher and student of ``models`` in folders, as the pipeline leaves them."""
    models["teacher"].teacher.save_pretrained(tmp_path / "teacher")
    models["student"].student.save_pretrained(tmp_path / "student")
    return tmp_path / "teacher", tmp_path / "student"


def test_a_stopped_evaluation_scores_only_the_datasets_it_had_not_finished(
    prepared, saved_models, tiny_bert_dir, tmp_path, monkeypatch
):
    """Each finished dataset waits in ``<report>.parts/``: after a stop in the IR dataset the
    next run takes nli and sts from there, scores tiny, and writes the report an unstopped run
    writes; parts made for another student are not reused."""
    import d2llm.evaluation.evaluate as E
    from d2llm.student.model import D2LLMStudent

    params = _params(tiny_bert_dir)
    teacher_dir, student_dir = saved_models
    clean = evaluate_systems(params, prepared, teacher_dir, student_dir, tmp_path / "clean.json")
    assert not (tmp_path / "clean.json.parts").exists()  # removed once the report is written

    out = tmp_path / "reports" / "metrics.json"
    real_ir, real_pairs = E.evaluate_ir_dataset, E.evaluate_pair_dataset
    scored: list[str] = []

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    def run(student=student_dir, stop=False):
        with monkeypatch.context() as patch:
            patch.setattr(
                E,
                "evaluate_pair_dataset",
                lambda name, *a, **k: scored.append(name) or real_pairs(name, *a, **k),
            )
            patch.setattr(
                E,
                "evaluate_ir_dataset",
                stopped if stop else lambda name, **k: scored.append(name) or real_ir(name, **k),
            )
            return evaluate_systems(params, prepared, teacher_dir, student, out)

    with pytest.raises(KeyboardInterrupt):
        run(stop=True)
    assert sorted(p.name for p in (out.parent / "metrics.json.parts").iterdir()) == ["nli.json", "sts.json"]
    scored.clear()
    resumed = run()
    assert scored == ["tiny"]

    def untimed(results):  # when it ran and how long each system took differ, nothing else
        datasets = {n: {k: v for k, v in e.items() if k != "seconds"} for n, e in results["datasets"].items()}
        return {**{k: v for k, v in results.items() if k != "created"}, "datasets": datasets}

    assert untimed(resumed) == untimed(clean)
    assert json.loads(out.read_text()) == resumed and not (out.parent / "metrics.json.parts").exists()

    other = D2LLMStudent.from_pretrained(student_dir)
    with torch.no_grad():
        next(other.iem.parameters()).add_(0.5)
    other.save_pretrained(tmp_path / "student2")
    with pytest.raises(KeyboardInterrupt):
        run(stop=True)
    scored.clear()
    run(student=tmp_path / "student2")
    assert scored == ["nli", "sts", "tiny"]


def test_evaluate_systems_end_to_end(prepared, models, tiny_bert_dir, tmp_path):
    params = _params(tiny_bert_dir)
    out = tmp_path / "reports" / "metrics.json"
    results = evaluate_systems(params, prepared, output=out, systems=models)
    assert json.loads(out.read_text()) == results
    assert results["systems"] == ["bm25", "bi-encoder", "teacher", "student"]

    nli, sts, ir = (results["datasets"][n] for n in ("nli", "sts", "tiny"))
    # Data used: test split only.
    assert (nli["kind"], nli["split"], nli["n_pairs"], nli["main_metric"]) == (
        "pair_classification",
        "test",
        6,
        "ap",
    )
    assert (sts["kind"], sts["n_pairs"], sts["main_metric"]) == ("sts", 6, "spearman")
    assert (ir["n_queries"], ir["n_queries_without_relevant"], ir["n_docs"]) == (3, 1, 8)
    assert ir["teacher_protocol"] == "re-ranks BM25 top 5 per query; BM25 ranks 6-100 follow in its order"
    assert "bm25" not in nli["metrics"] and set(ir["metrics"]) == {"bm25", "bi-encoder", "teacher", "student"}

    # The numbers are the metric functions applied to each system's scores on the test rows.
    test_nli = [r for r in NLI if r[3] == "test"]
    a, b = [r[0] for r in test_nli], [r[1] for r in test_nli]
    positive = np.array([r[2] == "entailment" for r in test_nli])
    for name in ("bi-encoder", "teacher", "student"):
        expected = M.pair_classification_metrics(models[name].score_pairs(a, b, "sym"), positive)
        assert nli["metrics"][name]["ap"] == pytest.approx(expected["ap"])
        assert nli["metrics"][name]["accuracy"] == pytest.approx(expected["accuracy"])
    test_sts = [r for r in STS if r[3] == "test"]
    sts_scores = models["bi-encoder"].score_pairs([r[0] for r in test_sts], [r[1] for r in test_sts], "sym")
    assert sts["metrics"]["bi-encoder"]["spearman"] == pytest.approx(
        M.sts_metrics(sts_scores, [r[2] for r in test_sts])["spearman"]
    )
    # BM25 on this corpus finds q1's grade-2 document first, and q2/q3's only relevant one.
    assert ir["metrics"]["bm25"]["mrr@10"] == pytest.approx(100.0)
    # The bi-encoder re-ranking the student's candidates: here the first stage keeps all 8
    # documents (M = 100), so that is the bi-encoder's own ranking.
    same = ir["same_candidates"]
    assert (
        same["protocol"] == "the bi-encoder re-ranking the student's first stage (cosine top 100 documents)"
    )
    assert same["metrics"] == pytest.approx(ir["metrics"]["bi-encoder"])
    student_gain = ir["metrics"]["student"]["ndcg@10"] - same["metrics"]["ndcg@10"]
    assert same["student_vs"]["delta"] == pytest.approx(student_gain)
    assert "note: tiny: the bi-encoder re-ranking the student's first stage" in format_table(results)

    # Gain recovered and the summary follow from the per-system main metrics.
    for entry in results["datasets"].values():
        main = {s: entry["metrics"][s][entry["main_metric"]] for s in ("bi-encoder", "teacher", "student")}
        assert entry["student_gain_recovered"] == M.gain_recovered(
            main["bi-encoder"], main["teacher"], main["student"], min_gain=1.0
        )
    mains = [
        results["datasets"][n]["metrics"]["student"][results["datasets"][n]["main_metric"]]
        for n in results["datasets"]
    ]
    assert results["summary"]["student"]["mean_main"] == pytest.approx(np.mean(mains))
    # Promotion reads the dev split only (validation); the test numbers are reported apart.
    dev_sts = [r for r in STS if r[3] == "dev"]
    for name in ("bi-encoder", "student"):
        dev_scores = models[name].score_pairs([r[0] for r in dev_sts], [r[1] for r in dev_sts], "sym")
        expected_dev = M.sts_metrics(dev_scores, [r[2] for r in dev_sts])["spearman"]
        assert results["validation"][name] == {
            "sts/spearman": pytest.approx(expected_dev),
            "mean_main": pytest.approx(expected_dev),
        }
    assert results["flat"] == results["validation"]["student"]
    assert results["test_flat"] == {
        "nli/ap": pytest.approx(nli["metrics"]["student"]["ap"]),
        "sts/spearman": pytest.approx(sts["metrics"]["student"]["spearman"]),
        "tiny/ndcg@10": pytest.approx(ir["metrics"]["student"]["ndcg@10"]),
        "mean_main": pytest.approx(np.mean(mains)),
    }

    # Each system's gain over the bi-encoder on the main metric, with a paired-bootstrap interval
    # around it: pairs for AP/Spearman, queries for IR (BM25 included there).
    for name, entry in results["datasets"].items():
        compared = entry["vs_bi_encoder"]
        main = entry["main_metric"]
        assert set(compared) == set(entry["metrics"]) - {"bi-encoder"}
        for system, comparison in compared.items():
            gain = entry["metrics"][system][main] - entry["metrics"]["bi-encoder"][main]
            assert comparison["delta"] == pytest.approx(gain), (name, system)
            assert comparison["ci95"][0] <= comparison["ci95"][1]
            assert comparison["unit"] == ("query" if name == "tiny" else "text_a")
            assert comparison["resamples"] <= params.evaluation.bootstrap_resamples

    table = format_table(results)
    lines = table.splitlines()
    assert lines[0] == (
        "| dataset | metric | bm25 | bi-encoder | teacher | student | recovered "
        "| student vs bi-encoder [95% CI] |"
    )
    assert lines[-1].startswith("note: recovered = (student - bi-encoder) / (teacher - bi-encoder)")
    nli_gain = results["datasets"]["nli"]["vs_bi_encoder"]["student"]
    assert next(x for x in lines if x.startswith("| nli | AP * |")).endswith(
        f"| {nli_gain['delta']:+.2f} [{nli_gain['ci95'][0]:+.2f}, {nli_gain['ci95'][1]:+.2f}]"
        + (" *" if nli_gain["ci95"][0] > 0 or nli_gain["ci95"][1] < 0 else "")
        + " |"
    )
    assert any(line.startswith("| nli | AP * |") for line in lines)
    # This NLI table has no dev split: its accuracy is the best threshold's on the test pairs.
    assert nli["accuracy_threshold"]["oracle"] and any(x.startswith("| nli | Acc (oracle) |") for x in lines)
    assert any(line.startswith("| tiny | R@100 |") for line in lines)
    assert f"{ir['metrics']['bm25']['ndcg@10']:.2f}" in next(
        x for x in lines if x.startswith("| tiny | nDCG@10 *")
    )
    mean_line = lines[-4]  # then the notes on the same candidates, the oracle accuracy and "recovered"
    assert mean_line.startswith("| mean | main * | - |")  # BM25 has no pair-dataset numbers: no mean
    assert results["summary"]["bm25"] == {"mean_main": None, "n_datasets": 1}


def test_max_pairs_and_max_queries_sample_the_test_data(prepared, models, tiny_bert_dir):
    params = _params(tiny_bert_dir, max_pairs=4, max_queries=2, ir_datasets=["tiny"], pair_datasets=["nli"])
    systems = {"bi-encoder": models["bi-encoder"], "bm25": models["bm25"]}
    results = evaluate_systems(params, prepared, systems=systems)
    assert results["datasets"]["nli"]["n_pairs"] == 4
    assert results["datasets"]["tiny"]["n_queries"] == 2
    assert results["datasets"]["nli"]["student_gain_recovered"] is None  # no teacher, no student
    assert results["flat"] == {} and results["test_flat"] == {}


def test_missing_dataset_is_a_clear_error(prepared, models, tiny_bert_dir):
    params = _params(tiny_bert_dir, pair_datasets=["stsb_en"])
    with pytest.raises(ArtifactError, match=r"pair dataset 'stsb_en' not found .* run `d2llm prepare`"):
        evaluate_systems(params, prepared, systems=models)


def test_load_systems_skips_missing_models_with_notes(tiny_bert_dir, tmp_path):
    params = _params(tiny_bert_dir)
    systems, notes = load_systems(params, tmp_path / "no-teacher", None)
    assert set(systems) == {"bm25", "bi-encoder"}
    assert any("teacher skipped" in n and "no-teacher" in n for n in notes)
    assert any("student skipped" in n for n in notes)
    off = _params(tiny_bert_dir, include_teacher=False)
    _, notes = load_systems(off, tmp_path, None)
    assert any("include_teacher is false" in n for n in notes)


def test_load_systems_restores_a_saved_student_and_teacher(tiny_bert_dir, tmp_path, models):
    params = _params(tiny_bert_dir)
    student = models["student"].student
    student.save_pretrained(tmp_path / "student")
    models["teacher"].teacher.save_pretrained(tmp_path / "teacher")
    systems, notes = load_systems(params, tmp_path / "teacher", tmp_path / "student")
    assert notes == [] and set(systems) == {"bm25", "bi-encoder", "teacher", "student"}
    a, b = ["a man plays a guitar", "a dog runs"], ["a man plays", "a cat sleeps"]
    np.testing.assert_allclose(
        systems["student"].score_pairs(a, b, "sym"), models["student"].score_pairs(a, b, "sym"), rtol=1e-5
    )
    np.testing.assert_allclose(
        systems["teacher"].score_pairs(a, b, "sym"), models["teacher"].score_pairs(a, b, "sym"), rtol=1e-5
    )
    assert systems["teacher"].first_stage is not systems["bi-encoder"]  # BM25, the code default
    raw = params.model_dump(mode="json")
    raw["evaluation"]["teacher_first_stage"] = "bi-encoder"
    systems, _ = load_systems(params_from_dict(raw), tmp_path / "teacher", None)
    assert systems["teacher"].first_stage is systems["bi-encoder"]


def test_format_table_marks_missing_values_and_notes():
    results = {
        "systems": ["bi-encoder", "student"],
        "notes": ["teacher skipped: no saved teacher at models/teacher"],
        "datasets": {
            "sts": {
                "kind": "sts",
                "main_metric": "spearman",
                "metrics": {
                    "bi-encoder": {"spearman": 80.0, "pearson": 79.5},
                    "student": {"spearman": 85.25},
                },
                "student_gain_recovered": None,
            }
        },
        "summary": {"bi-encoder": {"mean_main": 80.0}, "student": {"mean_main": 85.25}},
    }
    assert format_table(results).splitlines() == [
        "| dataset | metric | bi-encoder | student | recovered |",
        "| --- | --- | --- | --- | --- |",
        "| sts | Spearman * | 80.00 | 85.25 | - |",
        "| sts | Pearson | 79.50 | - |  |",
        "| mean | main * | 80.00 | 85.25 |  |",
        "note: teacher skipped: no saved teacher at models/teacher",
    ]


# --------------------------------------------------------------------------- CLI


def test_cli_evaluate_prints_the_table_and_writes_json(prepared, tiny_bert_dir, tmp_path, capsys):
    import yaml

    from d2llm.cli import main

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params(tiny_bert_dir).model_dump(mode="json")))
    out = tmp_path / "metrics.json"
    args = ["--params", str(params_file), "evaluate", "--prepared-dir", str(prepared), "--output", str(out)]
    args += ["--teacher-dir", str(tmp_path / "none"), "--student-dir", str(tmp_path / "none")]
    rc = main([*args, "--plot", str(tmp_path / "gains.png")])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "no plot" in printed and not (tmp_path / "gains.png").exists()  # no student, no teacher
    results = json.loads(out.read_text())
    assert results["systems"] == ["bm25", "bi-encoder"]
    assert "| dataset | metric | bm25 | bi-encoder | recovered |\n" in printed  # no student: no gain column
    assert "note: teacher skipped: no saved teacher at" in printed
    assert f"{results['datasets']['sts']['metrics']['bi-encoder']['spearman']:.2f}" in printed


def test_cli_evaluate_reports_a_missing_dataset_without_traceback(tiny_bert_dir, tmp_path, capsys):
    import yaml

    from d2llm.cli import main

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params(tiny_bert_dir).model_dump(mode="json")))
    rc = main(["--params", str(params_file), "evaluate", "--prepared-dir", str(tmp_path / "empty")])
    assert rc == 1
    assert "error: pair dataset 'nli' not found" in capsys.readouterr().err


class _CountingScorer:
    """Scores a pair by the length of its second text and counts its scoring calls."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def score_pairs(self, text_a, text_b, task):
        self.calls += 1
        return np.array([float(len(b)) for b in text_b])


def test_a_shared_memo_scores_the_same_pairs_once_under_each_datasets_labels():
    rows = [("a man", "a man walks far", 5.0, "test"), ("a dog", "a cat", 1.0, "test"),
            ("the sun", "the sun is up", 4.0, "test")]  # fmt: skip
    sts = _pairs_frame(rows, "score")
    flipped = sts.assign(label=-sts["label"])  # the same pairs under other labels (SICK / SICK-R)
    scorer, memo = _CountingScorer(), {}
    first = evaluate_pair_dataset("a", sts, {"counting": scorer}, memo=memo)
    second = evaluate_pair_dataset("b", flipped, {"counting": scorer}, memo=memo)
    assert scorer.calls == 1
    assert first["metrics"]["counting"]["spearman"] == pytest.approx(100.0)
    assert second["metrics"]["counting"]["spearman"] == pytest.approx(-100.0)
    evaluate_pair_dataset("c", sts, {"counting": scorer})  # no memo: scored again
    assert scorer.calls == 2


class _KeyRecordingStudent:
    """A stand-in student: a text's vector is its length; records the keys it is asked to score with."""

    def __init__(self):
        self.keys = []

    def encode(self, texts, batch_size=64):
        return torch.tensor([[float(len(t)), 1.0] for t in texts])

    def passage_cache(self, vectors):
        return vectors

    def score_vectors(self, e_a, e_b, task):
        self.keys.append(task)
        return (e_a * e_b).sum(-1)


def test_the_student_is_scored_with_each_test_sets_family_and_others_with_the_task_kind():
    """SICK (classes: nli) and SICK-R (scores: sts) are the same pairs: the student is scored
    once per family (a per-family student has a branch for each), every other system once."""
    from d2llm.evaluation.evaluate import StudentScorer

    rows = [("a man", "a man walks", "entailment", "test"), ("a dog", "a cat", "contradiction", "test")]
    nli = _pairs_frame(rows, "class")
    sts = nli.assign(label=[4.5, 1.0], label_name="")
    student, other, memo = _KeyRecordingStudent(), _CountingScorer(), {}
    systems = {"counting": other, "student": StudentScorer(student)}
    evaluate_pair_dataset("sick", nli, systems, memo=memo)
    evaluate_pair_dataset("sick_r", sts, systems, memo=memo)
    assert student.keys == ["nli", "sts"]
    assert other.calls == 1  # the cosine-like scorer has no branches: its scores are reused

    # The paper's two-branch IEM scores both with sym: the student's scores are reused too.
    from d2llm.student.iem import IEM

    student.keys, student.iem, memo = [], IEM(2, branches="task"), {}
    evaluate_pair_dataset("sick", nli, systems, memo=memo)
    evaluate_pair_dataset("sick_r", sts, systems, memo=memo)
    assert student.keys == ["sym"]


class _TableScorer:
    """Scores each pair from a fixed {(a, b): score} table."""

    def __init__(self, name, table):
        self.name, self.table = name, table

    def score_pairs(self, text_a, text_b, task):
        return np.array([self.table[(a, b)] for a, b in zip(text_a, text_b, strict=True)])


def test_answer_selection_gains_are_bootstrapped_over_questions():
    # Four questions, one right answer among three candidates each (plus one question with only
    # wrong answers, which MAP leaves out): the student ranks every right answer first, the
    # bi-encoder only for q1 and q2.
    rows, student, bi = [], {}, {}
    for q in ("q1", "q2", "q3", "q4", "q5"):
        for j, right in enumerate((q != "q5", False, False)):
            pair = (q, f"{q} answer {j}")
            rows.append({"text_a": q, "text_b": pair[1], "label": float(right), "is_positive": right})
            student[pair] = 1.0 if right else 0.1 * j
            bi[pair] = (1.0 if right else 0.1 * j) if q in ("q1", "q2") else (0.0 if right else 0.5 + j)
    test = pd.DataFrame(rows).assign(label_name=lambda d: np.where(d["is_positive"], "yes", "no"))
    test = test.assign(task="asym", source="test", split="test")
    systems = {"bi-encoder": _TableScorer("bi-encoder", bi), "student": _TableScorer("student", student)}
    entry = evaluate_pair_dataset("qa", test, systems, resamples=500, seed=0)
    assert entry["main_metric"] == "map"
    assert entry["metrics"]["student"]["map"] == pytest.approx(100.0)
    assert entry["metrics"]["bi-encoder"]["map"] == pytest.approx(100.0 * (1 + 1 + 1 / 3 + 1 / 3) / 4)
    gain = entry["vs_bi_encoder"]["student"]
    assert (gain["unit"], gain["n_units"]) == ("question", 4)
    assert gain["delta"] == pytest.approx(100.0 * (2 / 3 + 2 / 3) / 4)
    # The per-question gains are 0, 0, 66.7, 66.7: a resample's mean lies in [0, 66.7].
    assert 0.0 <= gain["ci95"][0] < gain["delta"] < gain["ci95"][1] <= 100.0 * 2 / 3 + 1e-9

    assert "vs_bi_encoder" not in evaluate_pair_dataset("qa", test, systems)  # resamples 0: none


def test_pair_gains_are_bootstrapped_over_premises_each_with_all_of_its_pairs():
    """SICK pairs a premise with several hypotheses: the bootstrap units are the distinct
    ``text_a`` (3 here, for 7 pairs), and the report says so."""
    rows = [("p1", "h1", "entailment"), ("p1", "h2", "neutral"), ("p1", "h3", "contradiction"),
            ("p2", "h1", "entailment"), ("p2", "h4", "neutral"), ("p3", "h2", "entailment"),
            ("p3", "h5", "contradiction")]  # fmt: skip
    test = _pairs_frame([(*r, "test") for r in rows], "class")
    student = {(a, b): 1.0 if name == "entailment" else 0.2 for a, b, name in rows}
    bi = {(a, b): 0.6 if b in ("h1", "h2") else 0.4 for a, b, _ in rows}
    systems = {"bi-encoder": _TableScorer("bi-encoder", bi), "student": _TableScorer("student", student)}
    gain = evaluate_pair_dataset("sick", test, systems, resamples=200, seed=0)["vs_bi_encoder"]["student"]
    assert (gain["unit"], gain["n_units"]) == ("text_a", 3)
    sts = test.assign(label=[4.8, 3.0, 1.0, 4.5, 2.5, 4.9, 0.5], label_name="")
    gain = evaluate_pair_dataset("sick_r", sts, systems, resamples=200, seed=0)["vs_bi_encoder"]["student"]
    assert (gain["unit"], gain["n_units"]) == ("text_a", 3)


def test_accuracy_threshold_is_chosen_on_the_dev_split():
    """On dev, entailments score 0.9 and 0.8, the rest 0.6 and 0.4: threshold 0.8. On test the
    entailments score 0.9 and 0.7: the best test threshold (0.7) would give 100%, the dev
    threshold gives 75%. Without a dev split the test-chosen figure is kept, marked an oracle."""
    rows = [("a", "b", "entailment", "dev"), ("c", "d", "entailment", "dev"), ("e", "f", "neutral", "dev"),
            ("g", "h", "contradiction", "dev"), ("i", "j", "entailment", "test"),
            ("k", "l", "entailment", "test"), ("m", "n", "neutral", "test"),
            ("o", "p", "contradiction", "test")]  # fmt: skip
    table = dict(zip([(r[0], r[1]) for r in rows], [0.9, 0.8, 0.6, 0.4, 0.9, 0.7, 0.6, 0.5], strict=True))
    systems = {"bi-encoder": _TableScorer("bi-encoder", table)}
    pairs = _pairs_frame(rows, "class")
    entry = evaluate_pair_dataset("sick", pairs, systems)
    metrics = entry["metrics"]["bi-encoder"]
    assert (metrics["accuracy"], metrics["threshold"], metrics["n_pairs"]) == (75.0, 0.8, 4)
    assert entry["accuracy_threshold"] == {"split": "dev", "oracle": False, "n_pairs": 4}
    results = {"systems": ["bi-encoder"], "datasets": {"sick": entry}, "summary": {}}
    assert "| sick | Acc | 75.00 |  |" in format_table(results).splitlines()

    oracle = evaluate_pair_dataset("sick", pairs[pairs["split"] == "test"], systems)
    assert (oracle["metrics"]["bi-encoder"]["accuracy"], oracle["metrics"]["bi-encoder"]["threshold"]) == (
        100.0,
        0.7,
    )
    assert oracle["accuracy_threshold"]["oracle"] is True
    table_lines = format_table({**results, "datasets": {"sick": oracle}}).splitlines()
    assert "| sick | Acc (oracle) | 100.00 |  |" in table_lines
    assert any(
        line.startswith("note: Acc (oracle) = accuracy at the best threshold on the test")
        for line in table_lines
    )


class _CountingTeacher:
    """A teacher stand-in: logits from the second text's length; counts its scoring calls."""

    def __init__(self):
        self.calls = 0

    def score(self, pairs, task, show_progress=False):
        from types import SimpleNamespace

        self.calls += 1
        z = torch.tensor([float(len(b)) for _, b in pairs])
        return SimpleNamespace(logits=torch.stack([z, -z], dim=1))


def test_dev_thresholds_cost_the_teacher_one_pass_over_the_dev_pairs_only():
    """The fused and the raw teacher share one memo of raw logits; the dev pairs are scored by
    every system before the test pairs, so SICK's test scoring is still reused by the raw view
    and by SICK-R: two teacher passes in all (dev, test), not four."""
    rows = [("a man", "a man walks", "entailment", "dev"), ("a dog", "a cat", "neutral", "dev"),
            ("the sun", "the sun is up", "entailment", "test"),
            ("a car", "a tree", "contradiction", "test")]  # fmt: skip
    nli = _pairs_frame(rows, "class")
    sts = nli.assign(label=[4.5, 1.0, 4.8, 0.3], label_name="")
    teacher = _CountingTeacher()
    fused = TeacherScorer(teacher)
    raw = copy.copy(fused)
    raw.name = "teacher-raw"
    systems, memo = {"teacher": fused, "teacher-raw": raw}, {}
    evaluate_pair_dataset("sick", nli, systems, memo=memo)
    evaluate_pair_dataset("sick_r", sts, systems, memo=memo)
    assert teacher.calls == 2
