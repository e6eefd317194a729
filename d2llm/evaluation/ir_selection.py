"""Choose the IR settings on an IR dev collection (``evaluation.ir_dev_dataset``: CACM).

The IR test collections (Cranfield, CISI) have no dev split, so nothing IR may be chosen on
them. ``select_ir_settings`` measures, on the dev collection only:

1. the passage scheme of the shipped search: ``search.passage_window``, ``passage_stride`` and
   how a document scores by its passages (``search.aggregation``, ``first_weight``), with the
   bi-encoder (the cosine first stage every system shares, and where the student starts);
2. the teacher's IR protocol: its first stage (``evaluation.teacher_first_stage``), its
   re-rank depth (``evaluation.teacher_rerank_depth``) and its fusion weight on IR
   (``evaluation.ir_fusion_weight``), with the scheme chosen in 1;
3. with one or more saved students, the shipped search's first stage, depth and BM25 weight
   (``search.first_stage``, ``search.rerank_depth``, ``search.lexical_weight``), with the scheme
   chosen in 1:
   each setting's nDCG@10 is averaged over the students (seeds of one recipe), with full IEM
   scoring beside them for reference. The bi-encoder re-ranking the same first stage is listed
   too, so that what a first stage adds is not read as the student's gain.

Each choice maximises nDCG@10 on the dev collection; ties go to the cheaper setting (the first
of the grid). The report lists every grid point, so a choice can be read next to its neighbours.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from d2llm.data.tables import load_ir
from d2llm.errors import ArtifactError, ConfigError
from d2llm.evaluation import metrics as M
from d2llm.evaluation.evaluate import (
    IR_DEPTH,
    BiEncoderBaseline,
    Bm25System,
    PassageCorpus,
    Ranking,
    lexical_document_scores,
    load_student_scorer,
    reorder_head,
)
from d2llm.search import top_k_positions
from d2llm.teachers.base import log_odds
from d2llm.teachers.fusion import GRID

if TYPE_CHECKING:
    from d2llm.config import Params
    from d2llm.data.tables import IRDataset

log = logging.getLogger(__name__)

WINDOWS: tuple[int | None, ...] = (None, 48, 32)  # None: the student's whole input
STRIDE_SHARES = (0.75, 0.5)  # of the window
AGGREGATIONS: tuple[tuple[str, float], ...] = (("best", 0.5), ("first", 0.5), ("blend", 0.5))
DEPTHS = (10, 20, 50)
FIRST_STAGES = ("bi-encoder", "bm25")
STUDENT_FIRST_STAGES = ("cosine", "bm25")  # cosine: the student's own PMA vectors
STUDENT_DEPTHS = (10, 20, 30, 50, 100)  # documents
LEXICAL_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)  # search.lexical_weight (0: the IEM alone)


def _ndcg(dataset: IRDataset, qids: list[str], doc_ids: list[str], ranking: Ranking) -> float:
    per_query, no_relevant = M.ir_per_query(dataset.relevant(), M.ranking_to_run(qids, doc_ids, ranking))
    return M.ir_summary(per_query, no_relevant, M.ranking_to_run(qids, doc_ids, ranking))["ndcg@10"]


def _judged(dataset: IRDataset) -> tuple[list[str], list[str]]:
    relevant = dataset.relevant()
    queries = dataset.queries[dataset.queries["query_id"].astype(str).isin(relevant)]
    return queries["query_id"].astype(str).tolist(), queries["text"].astype(str).tolist()


def passage_schemes(params: Params, dataset: IRDataset, encoder: BiEncoderBaseline) -> list[dict[str, Any]]:
    """nDCG@10 of the bi-encoder (and BM25) on the dev collection for each passage scheme."""
    from d2llm.passages import passage_window

    qids, qtexts = _judged(dataset)
    doc_ids = dataset.corpus["doc_id"].astype(str).tolist()
    docs = dataset.corpus["text"].astype(str).tolist()
    room = passage_window(encoder.tokenizer, params.student.max_length, None)
    rows = []
    for window in WINDOWS:
        if window is not None and window > room:  # the student would truncate such passages
            continue
        size = room if window is None else window
        for share in STRIDE_SHARES:
            stride = max(1, int(size * share))
            for aggregation, weight in AGGREGATIONS:
                cfg = params.search.model_copy(
                    update={"passage_window": window, "passage_stride": stride,
                            "aggregation": aggregation, "first_weight": weight}
                )  # fmt: skip
                corpus = PassageCorpus.split(doc_ids, docs, encoder.tokenizer, params.student.max_length, cfg)
                row = {"window": window, "stride": stride, "aggregation": aggregation, "first_weight": weight}
                row["passages"] = len(corpus.spans)
                row["bi-encoder"] = _ndcg(dataset, qids, doc_ids, encoder.rank(qtexts, corpus, IR_DEPTH))
                row["bm25"] = _ndcg(dataset, qids, doc_ids, Bm25System().rank(qtexts, corpus, IR_DEPTH))
                log.info("passage scheme %s: bi-encoder nDCG@10 %.2f", row, row["bi-encoder"])
                rows.append(row)
    return rows


def teacher_protocols(
    params: Params, dataset: IRDataset, corpus: PassageCorpus, systems: dict[str, Any], teacher: Any
) -> list[dict[str, Any]]:
    """nDCG@10 of the teacher re-ranking each first stage's top M, raw and fused at each weight.

    The teacher scores each (query, document) once, at the deepest M; shallower depths and the
    weights reuse those scores.
    """
    qids, qtexts = _judged(dataset)
    doc_ids = corpus.doc_ids
    encoder: BiEncoderBaseline = systems["bi-encoder"]
    cosines = encoder.passage_cosines(qtexts, corpus)
    doc_cos = np.stack([corpus.document_scores(row) for row in cosines])  # [Q, D]
    weights = teacher.fusion.for_dataset(dataset.name, "asym") if teacher.fusion is not None else None
    rows = []
    for first_name in FIRST_STAGES:
        first = systems[first_name].rank(qtexts, corpus, max(IR_DEPTH, max(DEPTHS)))
        deepest = [[d for d, _ in row[: max(DEPTHS)]] for row in first]
        pairs = [(q, corpus.docs[d]) for q, cand in zip(qtexts, deepest, strict=True) for d in cand]
        logits = teacher.teacher.score(pairs, "asym", show_progress=True).logits
        odds_all = log_odds(logits)
        per_query, start = [], 0
        for i, cand in enumerate(deepest):
            per_query.append((odds_all[start : start + len(cand)], doc_cos[i, cand]))
            start += len(cand)
        for depth in DEPTHS:
            for w in (None, *GRID) if weights is not None else (None,):
                ranking = []
                for (odds, cos), row in zip(per_query, first, strict=True):
                    odds_m, cos_m = odds[:depth], cos[:depth]
                    score = odds_m if w is None else replace(weights, weight=w).log_odds(odds_m, cos_m)
                    head = [(int(row[i][0]), float(score[i])) for i in top_k_positions(score, IR_DEPTH)]
                    tail = [(int(d), -1e9 - i) for i, (d, _) in enumerate(row[depth:IR_DEPTH])]
                    ranking.append(head + tail)
                value = _ndcg(dataset, qids, doc_ids, ranking)
                rows.append({"first_stage": first_name, "depth": depth, "fusion_weight": w, "teacher": value})
        rows.append(
            {
                "first_stage": first_name,
                "depth": 0,
                "fusion_weight": None,
                "teacher": _ndcg(dataset, qids, doc_ids, first),
            }
        )  # fmt: skip  (depth 0: the first stage alone)
    return rows


def student_protocols(
    params: Params, dataset: IRDataset, corpus: PassageCorpus, students: list[Any], encoder: BiEncoderBaseline
) -> list[dict[str, Any]]:
    """nDCG@10 of the shipped search per first stage, depth (documents) and BM25 weight
    (``search.lexical_weight``), each student's and their mean; depth 0 is full scoring.
    ``bi-encoder`` is the bi-encoder re-ranking the same candidates (for ``cosine``, the student's
    own vectors pick them), fused with BM25 at the same weight."""
    qids, qtexts = _judged(dataset)
    doc_cos = np.stack([corpus.document_scores(row) for row in encoder.passage_cosines(qtexts, corpus)])
    lexical = lexical_document_scores(qtexts, corpus)
    grid = [
        (f, d, w)
        for f, d in [(None, 0), *product(STUDENT_FIRST_STAGES, STUDENT_DEPTHS)]
        for w in LEXICAL_WEIGHTS
    ]
    values: dict[tuple[str | None, int, float], list[float]] = {key: [] for key in grid}
    bi_values: dict[tuple[str | None, int, float], list[float]] = {key: [] for key in grid}
    for number, scorer in enumerate(students):
        with tempfile.TemporaryDirectory(prefix="d2llm-ir-select-") as tmp:
            index = scorer.index(corpus, tmp)
            for key in tqdm(grid, desc=f"student {number + 1} of {len(students)}: search settings"):
                first_stage, depth, weight = key
                update: dict[str, Any] = {"mode": "full"} if depth == 0 else {"mode": "two_stage"}
                if depth:
                    update.update(first_stage=first_stage, rerank_depth=depth)
                cfg = scorer.search_cfg.model_copy(update={**update, "lexical_weight": weight})
                ranking = scorer.rank_index(index, qtexts, IR_DEPTH, cfg)
                values[key].append(_ndcg(dataset, qids, corpus.doc_ids, ranking))
                if depth:
                    bi = [
                        reorder_head(row, depth, doc_cos[i], lexical[i], weight)
                        for i, row in enumerate(ranking)
                    ]
                    bi_values[key].append(_ndcg(dataset, qids, corpus.doc_ids, bi))
    rows = []
    for key in grid:
        first_stage, depth, weight = key
        row = {"first_stage": first_stage, "depth": depth, "lexical_weight": weight}
        row.update(student=float(np.mean(values[key])), per_student=values[key])
        if depth:
            row["bi-encoder"] = float(np.mean(bi_values[key]))
        rows.append(row)
    return rows


def select_ir_settings(
    params: Params,
    prepared_dir: str | Path,
    teacher_dir: str | Path | None = None,
    student_dirs: list[str | Path] | None = None,
) -> dict[str, Any]:
    """Measure the grids on ``evaluation.ir_dev_dataset`` and return the report with the choices."""
    from d2llm.evaluation.evaluate import load_systems

    name = params.evaluation.ir_dev_dataset
    if name in params.evaluation.ir_datasets:
        raise ConfigError(
            f"evaluation.ir_dev_dataset {name!r} is also a test collection (evaluation.ir_datasets): "
            "IR settings must be chosen on a collection the report does not test on"
        )
    missing = [str(d) for d in student_dirs or [] if not Path(d).is_dir()]
    if missing:  # before the grids, which take minutes
        raise ArtifactError(f"no saved student at {', '.join(missing)}")
    dataset = load_ir(prepared_dir, name)
    evaluation = params.evaluation.model_copy(update={"include_teacher": teacher_dir is not None})
    systems, notes = load_systems(params.model_copy(update={"evaluation": evaluation}), teacher_dir, None)
    encoder: BiEncoderBaseline = systems["bi-encoder"]
    schemes = passage_schemes(params, dataset, encoder)
    best = max(schemes, key=lambda r: r["bi-encoder"])  # max() keeps the first of equals
    report: dict[str, Any] = {
        "dev_collection": name,
        "queries": len(_judged(dataset)[0]),
        "documents": len(dataset.corpus),
        "passage_schemes": schemes,
        "chosen": {
            "search.passage_window": best["window"],
            "search.passage_stride": best["stride"],
            "search.aggregation": best["aggregation"],
            "search.first_weight": best["first_weight"],
        },
        "notes": notes,
    }
    cfg = params.search.model_copy(
        update={"passage_window": best["window"], "passage_stride": best["stride"],
                "aggregation": best["aggregation"], "first_weight": best["first_weight"]}
    )  # fmt: skip
    corpus = PassageCorpus.split(
        dataset.corpus["doc_id"].astype(str).tolist(),
        dataset.corpus["text"].astype(str).tolist(),
        encoder.tokenizer,
        params.student.max_length,
        cfg,
    )
    if "teacher" in systems:
        rows = teacher_protocols(params, dataset, corpus, systems, systems["teacher"])
        report["teacher_protocols"] = rows
        reranked = [r for r in rows if r["depth"] > 0]
        chosen = max(reranked, key=lambda r: r["teacher"])
        report["chosen"].update(
            {
                "evaluation.teacher_first_stage": chosen["first_stage"],
                "evaluation.teacher_rerank_depth": chosen["depth"],
                "evaluation.ir_fusion_weight": chosen["fusion_weight"],
            }
        )
    if student_dirs:
        students = [load_student_scorer(params, d, cfg) for d in student_dirs]
        rows = student_protocols(params, dataset, corpus, students, encoder)
        report["student_protocols"] = rows
        report["students"] = [str(d) for d in student_dirs]
        chosen = max((r for r in rows if r["depth"] > 0), key=lambda r: r["student"])
        report["chosen"].update(
            {
                "search.first_stage": chosen["first_stage"],
                "search.rerank_depth": chosen["depth"],
                "search.lexical_weight": chosen["lexical_weight"],
            }
        )
    return report


def format_report(report: dict[str, Any]) -> str:
    """The grids as markdown tables, and the chosen settings as `-S` overrides."""
    lines = [
        f"IR settings chosen on {report['dev_collection']} ({report['queries']} judged queries, "
        f"{report['documents']} documents), nDCG@10:",
        "",
        "| window | stride | aggregation | passages | bi-encoder | BM25 |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["passage_schemes"]:
        window = "max" if r["window"] is None else r["window"]
        how = r["aggregation"] + (f" {r['first_weight']}" if r["aggregation"] == "blend" else "")
        cells = [window, r["stride"], how, r["passages"], f"{r['bi-encoder']:.2f}", f"{r['bm25']:.2f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if "teacher_protocols" in report:
        lines += ["", "| teacher first stage | depth | fusion w | teacher |", "|---|---|---|---|"]
        for r in report["teacher_protocols"]:
            depth = "first stage alone" if r["depth"] == 0 else r["depth"]
            w = "raw" if r["fusion_weight"] is None else r["fusion_weight"]
            lines.append(f"| {r['first_stage']} | {depth} | {w} | {r['teacher']:.2f} |")
    if "student_protocols" in report:
        n = len(report["students"])
        head = (
            f"| student first stage | depth (docs) | BM25 weight | student (mean of {n}) | bi-encoder, same |"
        )
        lines += ["", head, "|---|---|---|---|---|"]
        for r in report["student_protocols"]:
            first, depth = ("full", "all") if r["depth"] == 0 else (r["first_stage"], r["depth"])
            bi = f"{r['bi-encoder']:.2f}" if "bi-encoder" in r else "-"
            lines.append(f"| {first} | {depth} | {r['lexical_weight']:g} | {r['student']:.2f} | {bi} |")
    overrides = " ".join(f"-S {k}={'null' if v is None else v}" for k, v in report["chosen"].items())
    lines += ["", f"chosen: {overrides}"]
    return "\n".join(lines)
