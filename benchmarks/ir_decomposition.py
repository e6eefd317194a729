"""Where the student's IR ranking comes from: its vectors, or its interaction module.

With ``student.iem.residual: cosine`` the student scores a (query, passage) pair as
``z = head + scale * cos``: the IEM's MLP (the interaction it learned from the teacher) plus its
learnable multiple of the cosine of its own PMA vectors. For each IR collection this prints
nDCG@10 and MRR@10 of

- the bi-encoder the student starts from (cosine of mean-pooled vectors),
- the student's vectors alone (cosine of its PMA vectors, every passage),
- the student as shipped (``search``: cosine first stage, every passage of its top
  ``search.rerank_depth`` documents re-ranked by ``z``), and
- the same re-ranking with the interaction scaled, ``w * head + scale * cos`` for each ``--weights``
  value (``w = 1`` is the shipped score, ``w = 0`` the vectors' own order within the first stage).

A student below its bi-encoder whose vectors alone are already as far below has lost the ground
in its vectors (training moved the backbone and pooling), not in the IEM. The first collection
should be the IR dev collection (``evaluation.ir_dev_dataset``); read the test collections only
to understand a result, never to choose.

    python -m benchmarks.ir_decomposition --student-dir models/student --datasets cacm cranfield cisi
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from d2llm import layout

Ranking = list[list[tuple[int, float]]]

DEFAULT_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--student-dir", type=Path, default=layout.STUDENT_DIR, help="trained student")
    p.add_argument(
        "--datasets", nargs="+", default=None, help="IR collections (default: dev, then test ones)"
    )
    p.add_argument(
        "--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS), help="interaction weights w"
    )
    return p.parse_args(argv)


def _summary(relevant: Any, qids: list[str], doc_ids: list[str], ranking: Ranking) -> dict[str, float]:
    from d2llm.evaluation import metrics as M

    run = M.ranking_to_run(qids, doc_ids, ranking)
    per_query, no_relevant = M.ir_per_query(relevant, run)
    s = M.ir_summary(per_query, no_relevant, run)
    return {"ndcg@10": s["ndcg@10"], "mrr@10": s["mrr@10"]}


def _measure(args: argparse.Namespace, params: Any) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from d2llm.data.tables import load_ir
    from d2llm.evaluation.evaluate import IR_DEPTH, ir_passages, load_systems
    from d2llm.search import encode_corpus

    ev = params.evaluation
    names = args.datasets or list(dict.fromkeys([ev.ir_dev_dataset, *ev.ir_datasets]))
    params = params.model_copy(update={"evaluation": ev.model_copy(update={"include_teacher": False})})
    systems, _ = load_systems(params, None, args.student_dir)
    if "student" not in systems:
        raise SystemExit(f"no saved student at {args.student_dir}")
    encoder, shipped = systems["bi-encoder"], systems["student"]
    student = shipped.student
    if student.iem.residual != "cosine":
        raise SystemExit("the decomposition needs a student with student.iem.residual: cosine")
    scale = float(student.iem.cosine_scale)
    split = ir_passages(params)
    depth = params.search.rerank_depth
    prepared = args.prepared_dir or params.data.prepared_dir
    results: dict[str, Any] = {}
    for name in names:
        dataset = load_ir(prepared, name)
        relevant = dataset.relevant()
        queries = dataset.queries[dataset.queries["query_id"].astype(str).isin(relevant)]
        qids, qtexts = queries["query_id"].astype(str).tolist(), queries["text"].astype(str).tolist()
        doc_ids = dataset.corpus["doc_id"].astype(str).tolist()
        corpus = split(doc_ids, dataset.corpus["text"].astype(str).tolist())

        summary = partial(_summary, relevant, qids, doc_ids)
        passages, _ = encode_corpus(student, corpus.passages, params.evaluation.batch_size, desc="passages")
        vectors, _ = encode_corpus(student, qtexts, params.evaluation.batch_size, desc="queries")
        with torch.inference_mode():
            z = student.score_matrix(vectors, student.passage_cache(passages), "asym").float().numpy()
            cos = (F.normalize(vectors.float(), dim=-1) @ F.normalize(passages.float(), dim=-1).T).numpy()
        head = z - scale * cos
        # The cosine first stage: every passage of the top `depth` documents by their best passage.
        kept_docs = [[d for d, _ in corpus.rank(c, depth)] for c in cos]
        first = [np.flatnonzero(np.isin(corpus.spans.doc, docs)) for docs in kept_docs]
        row = {
            "bi-encoder": summary(encoder.rank(qtexts, corpus, IR_DEPTH)),
            "student vectors": summary([corpus.rank(c, IR_DEPTH) for c in cos]),
            "student (shipped search)": summary(shipped.rank(qtexts, corpus, IR_DEPTH)),
        }
        for w in args.weights:
            ranking = []
            for i, kept in enumerate(first):
                scores = np.full(cos.shape[1], -1e9)  # below every candidate: ranked after them
                scores[kept] = w * head[i, kept] + scale * cos[i, kept]
                ranking.append(corpus.rank(scores, IR_DEPTH))
            row[f"w={w:g}"] = summary(ranking)
        results[name] = {"queries": len(qids), "passages": len(corpus.passages), "systems": row}
    return {"student_dir": str(args.student_dir), "cosine_scale": scale, "rerank_depth": depth,
            "datasets": results}  # fmt: skip


def _print(report: dict[str, Any]) -> None:
    datasets = report["datasets"]
    systems = list(next(iter(datasets.values()))["systems"]) if datasets else []
    rows = [[s, *(round(d["systems"][s]["ndcg@10"], 2) for d in datasets.values())] for s in systems]
    print(f"nDCG@10; interaction weight w: w * head + {report['cosine_scale']:.2f} * cos on the first stage")
    print(common.format_table(["system", *datasets], rows))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run("ir_decomposition", argv, parse_args, _measure, _print)


if __name__ == "__main__":
    main()
