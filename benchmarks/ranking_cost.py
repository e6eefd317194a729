"""Cost per query of ranking N candidate passages: teacher vs student vs two-stage vs bi-encoder.

The cost model of the paper, measured:

- teacher (cross-encoder / LLM judge): N joint forward passes of (query, passage);
- student, full: one query pass + N IEM evaluations on cached passage projections (``W1b e_b``);
- student, two-stage: one query pass + N cosines over cached PMA vectors, then the IEM on the top M;
- bi-encoder: one query pass (mean pooling) + N dot products;
- hybrid (end to end only, when ``search.lexical_weight`` or ``--lexical-weight`` > 0): two-stage
  with the BM25 fusion of ``search.lexical_weight``: the query's BM25 scores over the N
  passages, standardised and added to the IEM's over the re-ranked documents (the BM25 index,
  like the passage vectors, is built before any timing: ``d2llm index`` saves it).

Passage encodings are computed once, before any timing: that is D2LLM's point, passages are
indexed offline. Queries are not: every timed end-to-end call encodes each of its queries (no
encoder here remembers a text it has seen), only the scoring-only timings take query vectors
computed beforehand. Every system returns the top 10. The student paths are ``d2llm.search.search``
on an in-memory index, i.e. exactly what serving runs.

The teacher is timed on at most ``--teacher-max-pairs`` candidates per query and its cost is
extrapolated linearly to N (its cost is N independent forward passes; the JSON marks which
sizes are extrapolated). Candidates are drawn from a pool of real Cranfield + CISI passages,
repeated when N exceeds the pool.

``--iem-formats bfloat16 int8`` adds one system per format, ``student-<format>``: the same student
with its IEM branch layer in that format (``student.iem.inference_dtype``), timed in the same
interleaved run, and reports how far its logits and top 10 move from the float32 student's.

Optionally (on by default) the same run measures what the two-stage shortcut costs in
quality: nDCG@10 of full IEM scoring vs two-stage on Cranfield, and the first stage's recall
of the full top 10 (meaningful for a trained student; an untrained one is labelled as such).

    python -m benchmarks.ranking_cost [--sizes 100 1000 10000] [--student-dir models/student]
"""

from __future__ import annotations

import argparse
import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from d2llm import layout

NAME = "ranking_cost"
SYSTEMS = ("teacher", "student", "two-stage", "bi-encoder")
HYBRID = "hybrid"  # end to end only: two-stage with the BM25 fusion (search.lexical_weight)
VARIANT = "student-{}"  # optional: the student with its IEM branch layer in another format
TOP_K = 10

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=11)
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10_000], help="candidates N")
    p.add_argument("--queries", type=int, default=3, help="Cranfield queries per timed repetition")
    p.add_argument("--rerank-depth", type=int, default=100, help="M, candidates the IEM re-ranks")
    p.add_argument(
        "--lexical-weight", type=float, default=None,
        help="the hybrid system's BM25 weight (default: search.lexical_weight; 0 leaves it out)",
    )  # fmt: skip
    p.add_argument("--teacher-max-pairs", type=int, default=100, help="teacher pairs timed per query")
    p.add_argument("--pool-size", type=int, default=1000, help="distinct passages candidates come from")
    p.add_argument("--pool-datasets", nargs="+", default=["cranfield", "cisi"], help="IR corpora")
    p.add_argument("--student-dir", type=Path, default=layout.STUDENT_DIR, help="trained student, if any")
    p.add_argument("--teacher-dir", type=Path, default=layout.TEACHER_DIR, help="saved teacher, if any")
    p.add_argument("--ndcg-dataset", default="cranfield", help="IR dataset of the full vs two-stage check")
    p.add_argument("--ndcg-queries", type=int, default=None, help="queries of that check (default all)")
    p.add_argument("--no-ndcg", action="store_true", help="skip the full vs two-stage quality check")
    p.add_argument("--batch-size", type=int, default=64, help="passage encoding batch size (untimed)")
    p.add_argument(
        "--iem-formats", nargs="*", default=[], choices=["bfloat16", "int8"],
        help="also time the student with its IEM branch layer in these formats",
    )  # fmt: skip
    common.add_clock_option(p)
    args = p.parse_args(argv)
    for name in ("queries", "rerank_depth", "teacher_max_pairs", "pool_size", "repeats"):
        common.check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    for n in args.sizes:
        common.check_positive("--sizes", n)
    if args.lexical_weight is not None and args.lexical_weight < 0:
        p.error(f"--lexical-weight must be >= 0, got {args.lexical_weight}")
    return args


# --------------------------------------------------------------------------- data


def passage_pool(prepared_dir: Path, datasets: Sequence[str], size: int, seed: int) -> list[str]:
    """``size`` distinct passages sampled (seeded) from the named IR corpora."""
    from d2llm.data import load_ir

    texts = list(dict.fromkeys(t for name in datasets for t in load_ir(prepared_dir, name).corpus["text"]))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))[:size]
    return [str(texts[i]) for i in order]


def candidate_positions(n: int, pool_size: int, seed: int) -> np.ndarray:
    """N positions into the pool: a sample without repeats when N fits, else the pool tiled."""
    rng = np.random.default_rng(seed + n)
    if n <= pool_size:
        return rng.permutation(pool_size)[:n]
    tiled = np.tile(np.arange(pool_size), -(-n // pool_size))
    return rng.permutation(tiled)[:n]


def sample_queries(prepared_dir: Path, dataset: str, count: int, seed: int) -> list[str]:
    from d2llm.data import load_ir

    queries = load_ir(prepared_dir, dataset).queries["text"].astype(str).tolist()
    rng = np.random.default_rng(seed)
    return [queries[i] for i in rng.permutation(len(queries))[: min(count, len(queries))]]


# --------------------------------------------------------------------------- the systems


def make_rankers(
    student: Any,
    bi: Any,
    index: Any,
    bi_vectors: Any,
    queries: Sequence[str],
    rerank_depth: int,
    chunk_size: int,
    lexical_weight: float = 0.0,
) -> dict[str, Callable[[], Any]]:
    """Callables that rank one candidate set for every query: student full, two-stage, bi-encoder
    (and hybrid: two-stage fused with BM25, when ``lexical_weight`` > 0)."""
    import torch

    from d2llm.search import search, top_k_positions

    def student_full() -> None:
        for q in queries:
            search(student, index, q, k=TOP_K, mode="full", chunk_size=chunk_size)

    def two_stage() -> None:
        for q in queries:
            search(
                student, index, q, k=TOP_K, mode="two_stage", first_stage="cosine",
                rerank_depth=rerank_depth, chunk_size=chunk_size,
            )  # fmt: skip

    def bi_encoder() -> None:
        for q in queries:
            with torch.inference_mode():
                scores = (bi.encode([q]) @ bi_vectors.T).reshape(-1).numpy()
            top_k_positions(scores, TOP_K)

    def hybrid() -> None:
        for q in queries:
            search(
                student, index, q, k=TOP_K, mode="two_stage", first_stage="cosine",
                rerank_depth=rerank_depth, chunk_size=chunk_size, lexical_weight=lexical_weight,
            )  # fmt: skip

    rankers = {"student": student_full, "two-stage": two_stage, "bi-encoder": bi_encoder}
    return rankers | ({HYBRID: hybrid} if lexical_weight > 0 else {})


def make_scorers(
    student: Any,
    index: Any,
    bi_vectors: Any,
    e_q: Any,
    bi_q: Any,
    rerank_depth: int,
    chunk_size: int,
) -> dict[str, Callable[[], Any]]:
    """Scoring only, on precomputed query vectors: what differs between the systems once the
    query is encoded (N IEM evaluations vs N cosines + M IEM evaluations vs N dot products)."""
    from d2llm.search import cosine_scores, iem_scores, top_k_positions

    def student_full() -> None:
        for i in range(e_q.shape[0]):
            top_k_positions(
                iem_scores(student, e_q[i : i + 1], index.passage_cache, "asym", chunk_size), TOP_K
            )

    def two_stage() -> None:
        for i in range(e_q.shape[0]):
            kept = np.sort(top_k_positions(cosine_scores(e_q[i : i + 1], index.vectors), rerank_depth))
            scores = iem_scores(student, e_q[i : i + 1], index.passage_cache[kept], "asym", chunk_size)
            top_k_positions(scores, TOP_K)

    def bi_encoder() -> None:
        for i in range(bi_q.shape[0]):
            top_k_positions((bi_q[i : i + 1] @ bi_vectors.T).reshape(-1).numpy(), TOP_K)

    return {"student": student_full, "two-stage": two_stage, "bi-encoder": bi_encoder}


def make_encoders(student: Any, bi: Any, queries: Sequence[str]) -> dict[str, Callable[[], Any]]:
    """Query encoding only, one query at a time, as at serving time."""

    def student_encode() -> None:
        for q in queries:
            student.encode([q], batch_size=1)

    def bi_encode() -> None:
        for q in queries:
            bi.encode([q])

    return {"student": student_encode, "bi-encoder": bi_encode}


def make_teacher_ranker(teacher: Any, queries: Sequence[str], passages: Sequence[str]) -> Callable[[], Any]:
    """Ranks ``passages`` for the next query (round-robin over ``queries``) with the teacher."""
    from d2llm.search import top_k_positions
    from d2llm.teachers.base import probabilities

    cycle = itertools.cycle(queries)

    def rank() -> None:
        q = next(cycle)
        out = teacher.score([(q, p) for p in passages], "asym", show_progress=False)
        top_k_positions(probabilities(out.logits).numpy(), TOP_K)

    return rank


# --------------------------------------------------------------------------- quality check


def full_vs_two_stage(
    student: Any,
    prepared_dir: Path,
    dataset: str,
    rerank_depth: int,
    max_queries: int | None,
    seed: int,
    variants: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """nDCG@10 of full IEM scoring vs cosine-first-stage + IEM re-ranking on one IR collection
    (and of full scoring by each student of ``variants``: format -> student)."""
    import torch

    from d2llm.data import load_ir
    from d2llm.evaluation.metrics import ir_metrics, ranking_to_run
    from d2llm.search import SearchIndex, encode_corpus, first_stage_candidates, iem_scores, top_k_positions

    ir = load_ir(prepared_dir, dataset)
    qrels = ir.relevant()
    queries = ir.queries[ir.queries["query_id"].astype(str).isin(qrels)]
    if max_queries is not None and len(queries) > max_queries:
        queries = queries.sample(n=max_queries, random_state=seed).sort_index()
    doc_ids = ir.corpus["doc_id"].astype(str).tolist()
    vectors, cache = encode_corpus(student, ir.corpus["text"].astype(str).tolist(), desc=f"encode {dataset}")
    index = SearchIndex(doc_ids, ir.corpus["text"].astype(str).tolist(), vectors, cache, manifest={})
    qtexts = queries["text"].astype(str).tolist()
    with torch.inference_mode():
        e_q = student.encode(qtexts, batch_size=32)
    variants = variants or {}
    full_run, two_run, kept_fraction = [], [], []
    variant_runs: dict[str, list] = {name: [] for name in variants}
    for i, text in enumerate(qtexts):
        full = iem_scores(student, e_q[i : i + 1], index.passage_cache, "asym")
        full_top = top_k_positions(full, 100)
        full_run.append([(int(p), float(full[p])) for p in full_top])
        for name, other in variants.items():
            low = iem_scores(other, e_q[i : i + 1], index.passage_cache, "asym")
            variant_runs[name].append([(int(p), float(low[p])) for p in top_k_positions(low, 100)])
        kept = np.sort(first_stage_candidates(index, text, e_q[i : i + 1], "cosine", rerank_depth))
        rescored = iem_scores(student, e_q[i : i + 1], index.passage_cache[kept], "asym")
        two_run.append([(int(kept[j]), float(rescored[j])) for j in top_k_positions(rescored, 100)])
        kept_fraction.append(len(set(full_top[:TOP_K].tolist()) & set(kept.tolist())) / TOP_K)
    qids = queries["query_id"].astype(str).tolist()
    wanted = {q: qrels[q] for q in qids}
    full_ndcg = ir_metrics(wanted, ranking_to_run(qids, doc_ids, full_run))["ndcg@10"]
    two_ndcg = ir_metrics(wanted, ranking_to_run(qids, doc_ids, two_run))["ndcg@10"]
    variant_ndcg = {
        name: ir_metrics(wanted, ranking_to_run(qids, doc_ids, run))["ndcg@10"]
        for name, run in variant_runs.items()
    }
    return {
        "dataset": dataset,
        "n_queries": len(qids),
        "n_docs": len(doc_ids),
        "rerank_depth": rerank_depth,
        "ndcg@10_full": full_ndcg,
        "ndcg@10_two_stage": two_ndcg,
        "ndcg@10_difference": two_ndcg - full_ndcg,
        "first_stage_recall@10": float(np.mean(kept_fraction)),
        "ndcg@10_full_by_iem_format": variant_ndcg,
    }


# --------------------------------------------------------------------------- main


def _ratios(end_to_end: dict, scoring: dict, n: str) -> dict[str, float | None]:
    t, c = end_to_end, scoring
    extra = {}
    for system in (s for s in t if s.startswith(VARIANT.format(""))):
        extra[f"{system}/bi-encoder"] = common.ratio(t[system][n], t["bi-encoder"][n])
        extra[f"scoring {system}/bi-encoder"] = common.ratio(c[system][n], c["bi-encoder"][n])
    return extra | {
        "teacher/student": common.ratio(t["teacher"][n], t["student"][n]),
        "teacher/two-stage": common.ratio(t["teacher"][n], t["two-stage"][n]),
        "student/bi-encoder": common.ratio(t["student"][n], t["bi-encoder"][n]),
        "two-stage/bi-encoder": common.ratio(t["two-stage"][n], t["bi-encoder"][n]),
        "scoring student/bi-encoder": common.ratio(c["student"][n], c["bi-encoder"][n]),
        "scoring two-stage/bi-encoder": common.ratio(c["two-stage"][n], c["bi-encoder"][n]),
    }


def _summarise(
    raw: dict[str, list[float]],
    stat: Callable[[list[float]], float],
    sizes: Sequence[int],
    teacher_pairs: dict[int, int],
    n_queries: int,
) -> dict[str, Any]:
    """Seconds per query (end to end, scoring only, query encoding) and ratios, by one statistic."""
    variants = tuple(
        k.split("@")[0] for k in raw if k.startswith(VARIANT.format("")) and k.endswith(f"@{sizes[0]}")
    )
    systems = SYSTEMS[1:] + variants
    end_to_end: dict[str, dict[str, float]] = {s: {} for s in ("teacher", *systems)}
    scoring: dict[str, dict[str, float]] = {s: {} for s in systems}
    for n in sizes:
        for system in systems:
            end_to_end[system][str(n)] = stat(raw[f"{system}@{n}"]) / n_queries
            scoring[system][str(n)] = stat(raw[f"score:{system}@{n}"]) / n_queries
        if f"{HYBRID}@{n}" in raw:
            end_to_end.setdefault(HYBRID, {})[str(n)] = stat(raw[f"{HYBRID}@{n}"]) / n_queries
        # The teacher callable ranks one query per call; its cost scales linearly to N candidates.
        measured = teacher_pairs[n]
        end_to_end["teacher"][str(n)] = stat(raw[f"teacher@{measured}"]) * n / measured
    return {
        "end_to_end": end_to_end,
        "scoring": scoring,
        "encoding": {s: stat(raw[f"encode:{s}"]) / n_queries for s in ("student", "bi-encoder")},
        "ratios": {str(n): _ratios(end_to_end, scoring, str(n)) for n in sizes},
    }


def iem_variant(student: Any, branch_format: str) -> Any:
    """The student with its IEM branch layer in ``branch_format``; shares backbone and tokenizer."""
    import copy

    memo = {id(student.backbone): student.backbone, id(student.tokenizer): student.tokenizer}
    clone = copy.deepcopy(student, memo)
    clone.iem.set_branch_format(branch_format)
    return clone


def score_change(student: Any, other: Any, e_q: Any, cache: Any) -> dict[str, float]:
    """How far ``other``'s IEM logits move from ``student``'s: largest and mean absolute change,
    the largest relative to the logits' spread, and the mean overlap of the two top 10s."""
    from d2llm.search import iem_scores, top_k_positions

    diffs, spreads, overlaps = [], [], []
    for i in range(e_q.shape[0]):
        ref = iem_scores(student, e_q[i : i + 1], cache, "asym")
        low = iem_scores(other, e_q[i : i + 1], cache, "asym")
        diffs.append(np.abs(low - ref))
        spreads.append(float(ref.std()))
        top_ref, top_low = (set(top_k_positions(x, TOP_K).tolist()) for x in (ref, low))
        overlaps.append(len(top_ref & top_low) / len(top_ref))
    diff = np.concatenate(diffs)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_abs_over_std": float(diff.max() / max(min(spreads), 1e-12)),
        "top10_overlap": float(np.mean(overlaps)),
        "n_queries": int(e_q.shape[0]),
        "n_candidates": int(cache.shape[0]),
    }


def measure(args: argparse.Namespace, params: Any) -> dict[str, Any]:
    import torch

    from d2llm.biencoder import MeanPoolEncoder
    from d2llm.search import SearchIndex, encode_corpus

    prepared_dir = args.prepared_dir or params.data.prepared_dir
    student, student_desc = common.load_student(params, args.student_dir)
    teacher, teacher_desc = common.load_teacher(params, args.teacher_dir, task="asym")
    # The plain encoder, not evaluation's BiEncoderBaseline: that one remembers every text it
    # encoded, so the queries encoded below would skip their pass inside the timed calls.
    bi = MeanPoolEncoder.from_ref(
        params.student.backbone, params.student.gguf_file, params.student.trust_remote_code,
        max_length=params.student.max_length, batch_size=args.batch_size, device=params.device,
    )  # fmt: skip
    pool = passage_pool(prepared_dir, args.pool_datasets, args.pool_size, args.seed)
    queries = sample_queries(prepared_dir, args.pool_datasets[0], args.queries, args.seed)

    # Offline part, untimed: every pool passage encoded once by the student and the bi-encoder.
    log.info("encoding %d pool passages (untimed: this is the offline index)", len(pool))
    vectors, cache = encode_corpus(student, pool, batch_size=args.batch_size, desc="student index")
    bi_pool = bi.encode(pool, show_progress=True)

    with torch.inference_mode():
        e_q, bi_q = student.encode(queries, batch_size=8), bi.encode(queries)
    variants = {fmt: iem_variant(student, fmt) for fmt in args.iem_formats}
    timed: dict[str, Callable[[], Any]] = {}
    for system, fn in make_encoders(student, bi, queries).items():
        timed[f"encode:{system}"] = fn
    teacher_pairs: dict[int, int] = {}
    lexical_weight = params.search.lexical_weight if args.lexical_weight is None else args.lexical_weight
    for n in args.sizes:
        pos = candidate_positions(n, len(pool), args.seed)
        index = SearchIndex([str(i) for i in range(n)], [pool[i] for i in pos], vectors[pos], cache[pos], {})
        if lexical_weight > 0:
            index.bm25()  # offline, untimed: `d2llm index` saves it with the vectors
        chunk = params.search.chunk_size
        for system, fn in make_rankers(
            student, bi, index, bi_pool[pos], queries, args.rerank_depth, chunk, lexical_weight
        ).items():
            timed[f"{system}@{n}"] = fn
        scorers = make_scorers(student, index, bi_pool[pos], e_q, bi_q, args.rerank_depth, chunk)
        for system, fn in scorers.items():
            timed[f"score:{system}@{n}"] = fn
        for fmt, other in variants.items():
            rankers = make_rankers(other, bi, index, bi_pool[pos], queries, args.rerank_depth, chunk)
            timed[f"{VARIANT.format(fmt)}@{n}"] = rankers["student"]
            scorers = make_scorers(other, index, bi_pool[pos], e_q, bi_q, args.rerank_depth, chunk)
            timed[f"score:{VARIANT.format(fmt)}@{n}"] = scorers["student"]
        teacher_pairs[n] = min(n, args.teacher_max_pairs)
        key = f"teacher@{teacher_pairs[n]}"
        if key not in timed:  # sizes above the cap share one teacher measurement
            timed[key] = make_teacher_ranker(teacher, queries, [pool[i] for i in pos[: teacher_pairs[n]]])

    log.info("timing %d measurements x %d repetitions, interleaved", len(timed), args.repeats)
    with torch.inference_mode():
        raw = common.interleaved_timings(timed, args.repeats, warmup=1, clock=args.clock)

    stats = {"median": common.median, "best": min}
    tables = {
        stat: _summarise(raw, fn, args.sizes, teacher_pairs, len(queries)) for stat, fn in stats.items()
    }
    pos = candidate_positions(max(args.sizes), len(pool), args.seed)
    changes = {fmt: score_change(student, other, e_q, cache[pos]) for fmt, other in variants.items()}
    quality = None
    if not args.no_ndcg:
        quality = full_vs_two_stage(
            student, prepared_dir, args.ndcg_dataset, args.rerank_depth, args.ndcg_queries, args.seed,
            variants,
        )  # fmt: skip
        quality["student"] = student_desc
    return {
        "sizes": list(args.sizes),
        "queries_per_repetition": len(queries),
        "repeats": args.repeats,
        "clock": args.clock,  # wall or cpu seconds
        "rerank_depth": args.rerank_depth,
        "lexical_weight": lexical_weight,  # the hybrid system's (0: not measured)
        "top_k": TOP_K,
        "pool": {"datasets": list(args.pool_datasets), "distinct_passages": len(pool)},
        "student": student_desc,
        "teacher": teacher_desc,
        "teacher_measured_pairs": {str(n): teacher_pairs[n] for n in args.sizes},
        "teacher_extrapolated": {str(n): teacher_pairs[n] < n for n in args.sizes},
        # median: the figure of record; best: the least disturbed repetition (minimum), a
        # steadier estimate of the intrinsic cost when other jobs share the CPU.
        "seconds_per_query": tables["median"]["end_to_end"],
        "scoring_seconds_per_query": tables["median"]["scoring"],
        "query_encoding_seconds": tables["median"]["encoding"],
        "ratios": tables["median"]["ratios"],
        "best": tables["best"],
        "raw_seconds": raw,
        "full_vs_two_stage": quality,
        "iem_format_score_change": changes,
    }


def _ms(median: float, best: float) -> str:
    return f"{1000 * median:.4g} ({1000 * best:.4g})"


def _x(median: float | None, best: float | None) -> str:
    return "-" if median is None or best is None else f"{median:.3g} ({best:.3g})"


def print_report(results: dict[str, Any]) -> None:
    t, c, r = results["seconds_per_query"], results["scoring_seconds_per_query"], results["ratios"]
    bt, bc, br = (results["best"][k] for k in ("end_to_end", "scoring", "ratios"))
    rows, score_rows = [], []
    for n in results["sizes"]:
        k = str(n)
        mark = " extrap." if results["teacher_extrapolated"][k] else ""
        rows.append(
            [n, _ms(t["teacher"][k], bt["teacher"][k]) + mark]
            + [_ms(t[s][k], bt[s][k]) for s in SYSTEMS[1:]]
            + [
                _x(r[k][q], br[k][q])
                for q in ("teacher/student", "student/bi-encoder", "two-stage/bi-encoder")
            ]
        )
        score_rows.append(
            [n]
            + [_ms(c[s][k], bc[s][k]) for s in SYSTEMS[1:]]
            + [_x(r[k][q], br[k][q]) for q in ("scoring student/bi-encoder", "scoring two-stage/bi-encoder")]
        )
    print(
        f"\nRanking cost per query, end to end, ms: median (best) of {results['repeats']} interleaved "
        f"repetitions; student: {results['student']}"
    )
    header = ["N", "teacher", "student", "two-stage", "bi-encoder", "teacher/student", "student/bi-enc"]
    print(common.format_table([*header, "two-stage/bi-enc"], rows))
    if HYBRID in t:
        hybrid = []
        for n in results["sizes"]:
            h, two = t[HYBRID][str(n)], t["two-stage"][str(n)]
            bh, btwo = bt[HYBRID][str(n)], bt["two-stage"][str(n)]
            hybrid.append([n, _ms(h, bh), _ms(two, btwo), _x(h / two, bh / btwo)])
        print(f"\nHybrid search (two-stage + BM25 fusion, w = {results['lexical_weight']:g}), end to end, ms")
        print(common.format_table(["N", "hybrid", "two-stage", "hybrid/two-stage"], hybrid))
    capped = sorted((n for n, e in results["teacher_extrapolated"].items() if e), key=int)
    if capped:
        measured = results["teacher_measured_pairs"][capped[0]]
        print(
            f"teacher at N={', '.join(capped)}: measured on {measured} pairs per query, extrapolated linearly"
        )
    enc, benc = results["query_encoding_seconds"], results["best"]["encoding"]
    print(
        "\nScoring only, query vector given, ms: median (best); query encoding: "
        f"student {_ms(enc['student'], benc['student'])}, "
        f"bi-encoder {_ms(enc['bi-encoder'], benc['bi-encoder'])}"
    )
    header = ["N", "student IEM", "two-stage", "bi-encoder dot", "student/bi-enc", "two-stage/bi-enc"]
    print(common.format_table(header, score_rows))
    _print_variants(results)
    q = results["full_vs_two_stage"]
    if q:
        print(
            f"\n{q['dataset']} nDCG@10 ({q['n_queries']} queries, {q['student']}): "
            f"full IEM {q['ndcg@10_full']:.2f}, two-stage (cosine top {q['rerank_depth']}) "
            f"{q['ndcg@10_two_stage']:.2f}, difference {q['ndcg@10_difference']:+.2f}; "
            f"first-stage recall@10 {q['first_stage_recall@10']:.3f}"
        )
    print(common.SHARED_MACHINE_NOTE)


def _print_variants(results: dict[str, Any]) -> None:
    t, c, r = results["seconds_per_query"], results["scoring_seconds_per_query"], results["ratios"]
    bt, bc, br = (results["best"][k] for k in ("end_to_end", "scoring", "ratios"))
    q = results.get("full_vs_two_stage") or {}
    for fmt, change in results["iem_format_score_change"].items():
        system = VARIANT.format(fmt)
        rows = [
            [n, _ms(t[system][n], bt[system][n]), _ms(c[system][n], bc[system][n])]
            + [_x(r[n][k], br[n][k]) for k in (f"{system}/bi-encoder", f"scoring {system}/bi-encoder")]
            for n in map(str, results["sizes"])
        ]
        print(
            f"\nStudent with its IEM branch layer in {fmt} (student.iem.inference_dtype), ms: median (best)"
        )
        print(common.format_table(["N", "end to end", "scoring only", "/bi-enc", "scoring /bi-enc"], rows))
        print(
            f"logit change vs float32, {change['n_queries']} queries x {change['n_candidates']} candidates: "
            f"max {change['max_abs']:.3g} (= {change['max_abs_over_std']:.3g} x the logits' std), "
            f"mean {change['mean_abs']:.3g}; top-10 overlap {change['top10_overlap']:.3f}"
        )
        if fmt in q.get("ndcg@10_full_by_iem_format", {}):
            low = q["ndcg@10_full_by_iem_format"][fmt]
            print(f"{q['dataset']} nDCG@10 full IEM: float32 {q['ndcg@10_full']:.2f}, {fmt} {low:.2f}")


def plot(results: dict[str, Any], path: Path) -> Path:
    fig, (left, right) = common.new_figure(11.0, 4.0, ncols=2)
    sizes = results["sizes"]
    for system in SYSTEMS:
        ys = [1000 * results["seconds_per_query"][system][str(n)] for n in sizes]
        style = "--" if system == "teacher" and any(results["teacher_extrapolated"].values()) else "-"
        left.plot(sizes, ys, style, marker="o", label=system)
    for system in SYSTEMS[1:]:
        ys = [1000 * results["scoring_seconds_per_query"][system][str(n)] for n in sizes]
        right.plot(sizes, ys, marker="o", label=system)
    titles = ("End to end (teacher dashed: extrapolated)", "Scoring only (query vector given)")
    for ax, title in zip((left, right), titles, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("candidates per query (N)")
        ax.set_ylabel("ms per query (median)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return common.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv, args, params = common.start(argv, parse_args)
    results = measure(args, params)
    results["plot"] = str(plot(results, args.out_dir / f"{NAME}.png"))
    path = common.write_report(NAME, args.out_dir, argv, results)
    print_report(results)
    print(f"wrote {path} and {results['plot']}")
    return results


if __name__ == "__main__":
    main()
