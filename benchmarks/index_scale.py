"""Index scale: build time, memory and query latency of the first stage at 100k-1M passages.

SYNTHETIC VECTORS: the passage vectors are random unit vectors around random centres (the
shape of real embeddings: dense, overlapping neighbourhoods), written to a memory-mapped .npy
file as ``d2llm index`` writes its vectors. Encoding the passages is the student's cost and is
measured by the other benchmarks; this one measures only what grows with the corpus size.

Per size N, the first stages of ``d2llm.ann`` (the code search uses) named by ``--first-stages``:

- ``exact``: FAISS ``IndexFlatIP`` (what search uses below ``search.ann_min_size``);
- ``hnsw``: FAISS ``IndexHNSWFlat`` with ``search.hnsw_m``, ``hnsw_ef_construction`` and
  ``hnsw_ef_search`` from params (``search.ann_index: hnsw``, from ``ann_min_size`` on);
- ``ivf``: FAISS ``IndexIVFFlat`` with ``search.ivf_nlist``, ``ivf_nprobe`` and
  ``ivf_train_size`` from params (``search.ann_index: ivf``, from ``ann_min_size`` on);

build seconds (wall and CPU; IVF's split into k-means training and adding), peak RSS growth
while building (psutil, sampled every 5 ms), index bytes, and milliseconds per query (one query
at a time, median of interleaved repetitions) for the first stage alone and followed by the IEM
re-ranking of its top M (``search.rerank_depth``) with a random IEM of ``student.iem`` sizes
over synthetic cached projections; next to them the full IEM over all N cached projections
(``search.mode: full``; ``--no-full-iem`` leaves it out). Recall@10 of each approximate index
against the exact top 10, over ``--recall-queries`` queries, says what the approximation
costs; for IVF also at each nprobe of ``--ivf-nprobes`` (the query-time trade-off). The load
average is recorded at each step: the machine may be shared.

With ``--bm25-datasets`` (IR collections of ``data.prepared_dir``), the same sizes also measure
the passages' BM25 index that ``d2llm index`` saves for hybrid and BM25-first-stage search:
build, save and (memory-mapped) load seconds, folder size, and milliseconds per query of
scoring all N passages. REAL TEXT, REPEATED: the collections' documents cut into 36-word
passages (about the preset's 48-token window), tiled to N, and their queries (so the
vocabulary stays the collections', and posting lists grow with N).

    python -m benchmarks.index_scale [--sizes 100000 1000000] [--dim 384] [--queries 50]
        [--first-stages exact hnsw ivf] [--no-full-iem] [--ivf-nprobes 1 2 4 8 16 32 64]
        [--bm25-datasets cranfield cisi cacm]

``--first-stages exact ivf`` leaves out HNSW, whose build is the one part that takes long at
1M vectors on a few cores; recall needs ``exact`` among the first stages.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

NAME = "index_scale"
FIRST_STAGES = ("exact", "hnsw", "ivf")
SYSTEMS = (*FIRST_STAGES, *(f"{kind}+iem" for kind in FIRST_STAGES), "full-iem")
APPROXIMATE = ("hnsw", "ivf")
SYNTHETIC_NOTE = (
    "synthetic vectors (random unit vectors around random centres), not encoded text: "
    "encoding cost is excluded; build, memory and query figures are the index's own"
)

BM25_NOTE = (
    "BM25: real text, repeated: the documents of {} cut into 36-word passages, tiled to N, and their queries"
)

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="passages N")
    p.add_argument("--dim", type=int, default=384, help="vector size d (all-MiniLM-L6-v2: 384)")
    p.add_argument("--clusters", type=int, default=1000, help="centres the vectors are drawn around")
    p.add_argument("--queries", type=int, default=50, help="queries timed per repetition")
    p.add_argument("--work-dir", type=Path, help="where the .npy files go (default: a temporary folder)")
    p.add_argument(
        "--first-stages", nargs="+", choices=FIRST_STAGES, default=list(FIRST_STAGES),
        help="first-stage indexes to build and time (default: all three)",
    )  # fmt: skip
    p.add_argument("--recall-queries", type=int, default=200, help="queries recall@10 is measured on")
    p.add_argument(
        "--ivf-nprobes", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64],
        help="nprobe values whose IVF recall@10 and latency are reported besides search.ivf_nprobe",
    )  # fmt: skip
    p.add_argument("--no-full-iem", action="store_true", help="leave out the full IEM over all N")
    p.add_argument(
        "--bm25-datasets", nargs="*", default=[],
        help="also measure the saved BM25 index over these prepared IR collections' texts, tiled to N",
    )  # fmt: skip
    common.add_clock_option(p)
    args = p.parse_args(argv)
    for name in ("dim", "clusters", "queries", "repeats", "recall_queries"):
        common.check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    for n in args.sizes:
        common.check_positive("--sizes", n)
    for nprobe in args.ivf_nprobes:
        common.check_positive("--ivf-nprobes", nprobe)
    return args


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them)."""
    return [round(x, 2) for x in os.getloadavg()]


def synthetic_vectors(
    path: Path, n: int, dim: int, clusters: int, seed: int, chunk: int = 65_536
) -> np.ndarray:
    """``n`` unit vectors written chunk by chunk to a .npy memmap; returned memory-mapped."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = centres[rng.integers(0, clusters, size=stop - start)]
        block = block + rng.normal(size=block.shape).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def passage_caches(iem: Any, vectors: np.ndarray, path: Path, chunk: int = 65_536) -> Any:
    """The IEM's cached passage projections of ``vectors``, through a .npy memmap, as a tensor."""
    import torch

    out = None
    with torch.inference_mode():
        for start in range(0, vectors.shape[0], chunk):
            block = iem.passage_cache(torch.from_numpy(np.array(vectors[start : start + chunk])))  # a copy
            if out is None:
                out = np.lib.format.open_memmap(
                    path, mode="w+", dtype=np.float32, shape=(vectors.shape[0], block.shape[1])
                )
            out[start : start + block.shape[0]] = block.numpy()
    assert out is not None
    out.flush()
    del out
    return torch.from_numpy(np.load(path, mmap_mode="c"))


class _IEMScorer:
    """The slice of the student's API that ``d2llm.search.iem_scores`` uses."""

    def __init__(self, iem: Any) -> None:
        self.iem = iem

    def score_matrix(self, e_a: Any, cache_b: Any, task: str, chunk_size: int = 65_536) -> Any:
        return self.iem.score_matrix(e_a, cache_b, task, chunk_size)


def build(kind: str, vectors: np.ndarray, params: Any, work_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Build one first-stage index as ``d2llm.search.build_vector_index`` does, timing its two
    steps (training: IVF's k-means, nothing for the others; adding); its peak RSS growth and size."""
    from benchmarks.training_throughput import PeakRSS
    from d2llm.ann import VectorIndex

    s = params.search
    load_before = load_average()
    with PeakRSS() as memory:
        before = memory.current()
        wall, cpu = time.perf_counter(), time.process_time()
        index = VectorIndex.trained(
            vectors,
            kind,
            s.hnsw_m,
            s.hnsw_ef_construction,
            ivf_nlist=s.ivf_nlist,
            ivf_train_size=s.ivf_train_size,
        )
        train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
        index.add(vectors)
        seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    index.set_ef_search(s.hnsw_ef_search)
    index.set_nprobe(s.ivf_nprobe)
    path = work_dir / f"{kind}.faiss"
    index.save(path)
    size = path.stat().st_size
    path.unlink()
    return index, {
        "build_seconds": seconds,
        "build_cpu_seconds": cpu_seconds,
        "train_seconds": train_wall,
        "train_cpu_seconds": train_cpu,
        "add_seconds": seconds - train_wall,
        "build_peak_rss_growth_mib": (memory.peak - before) / 2**20,
        "index_mib": size / 2**20,
        "nlist": index.nlist,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def noisy_queries(vectors: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` data vectors plus small noise (a query close to, not equal to, a passage)."""
    picked = np.asarray(vectors[np.sort(rng.choice(vectors.shape[0], size=count, replace=False))])
    return (picked + 0.5 * rng.normal(size=picked.shape) / np.sqrt(picked.shape[1])).astype(np.float32)


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row of ``exact`` (top 10) found in the same row of ``found``."""
    pairs = zip(found, exact, strict=True)
    return float(np.mean([len(set(a.tolist()) & set(b.tolist()) - {-1}) / b.size for a, b in pairs]))


def nprobe_sweep(
    ivf: Any, queries: np.ndarray, exact_top: np.ndarray, nprobes: Sequence[int], repeats: int, clock: str
) -> list[dict[str, float]]:
    """IVF recall@10 and ms per single query (``clock``) at each nprobe; the index's nprobe is restored."""
    now = common.CLOCKS[clock]
    configured, rows = int(ivf.faiss_index.nprobe), []
    try:
        for nprobe in nprobes:
            ivf.set_nprobe(nprobe)
            seconds = []
            for _ in range(repeats):
                start = now()
                found = np.stack([ivf.search(q, 10)[0][0] for q in queries])
                seconds.append(now() - start)
            ms = 1000 * common.median(seconds) / len(queries)
            recall = recall_at_10(found, exact_top)
            scanned = int(ivf.faiss_index.nprobe)  # nprobe above nlist scans every list
            rows.append({"nprobe": nprobe, "lists_scanned": scanned, "recall@10": recall, "ms": ms})
    finally:
        ivf.set_nprobe(configured)
    return rows


def measure_size(n: int, args: argparse.Namespace, params: Any, work_dir: Path) -> dict[str, Any]:
    import torch

    from d2llm.search import iem_scores, top_k_positions
    from d2llm.student.iem import IEM

    s, k, depth = params.search, 10, params.search.rerank_depth
    results: dict[str, Any] = {"n": n, "load_average_start": load_average()}
    log.info("N=%d: writing %d synthetic %d-d vectors", n, n, args.dim)
    vectors = synthetic_vectors(work_dir / f"vectors-{n}.npy", n, args.dim, args.clusters, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    queries = noisy_queries(vectors, min(args.queries, n), rng)
    iem_cfg = params.student.iem
    iem = IEM(
        args.dim,
        hidden_size=iem_cfg.hidden_size,
        branch_size=iem_cfg.branch_size,
        residual=iem_cfg.residual,
        cosine_scale=iem_cfg.cosine_scale,
    ).eval()
    scorer = _IEMScorer(iem)
    cache = passage_caches(iem, vectors, work_dir / f"cache-{n}.npy")

    indexes = {}
    for kind in args.first_stages:
        log.info("N=%d: building the %s index", n, kind)
        indexes[kind], results[kind] = build("flat" if kind == "exact" else kind, vectors, params, work_dir)
        log.info("N=%d: %s built: %s", n, kind, results[kind])  # in the log even if a later step fails

    q_tensors = [torch.from_numpy(q.reshape(1, -1)) for q in queries]

    def first_stage(kind: str) -> list[np.ndarray]:
        return [indexes[kind].search(q, k)[0][0] for q in queries]

    def rerank(kind: str) -> None:
        for q, e_q in zip(queries, q_tensors, strict=True):
            positions = indexes[kind].search(q, depth)[0][0]
            positions = np.sort(positions[positions >= 0])  # as search does: -1 marks a missing hit
            top_k_positions(iem_scores(scorer, e_q, cache[positions], "asym", s.chunk_size), k)

    def full() -> None:
        for e_q in q_tensors:
            top_k_positions(iem_scores(scorer, e_q, cache, "asym", s.chunk_size), k)

    systems: dict[str, Any] = {}
    for kind in indexes:
        systems[kind] = lambda kind=kind: first_stage(kind)
        systems[f"{kind}+iem"] = lambda kind=kind: rerank(kind)
    if not args.no_full_iem:
        systems["full-iem"] = full
    log.info("N=%d: timing %s", n, ", ".join(systems))
    results["load_average_before_queries"] = load_average()
    with torch.inference_mode():
        raw = common.interleaved_timings(systems, args.repeats, clock=args.clock)
    results["load_average_after_queries"] = load_average()
    results["query_ms"] = {name: 1000 * common.median(t) / len(queries) for name, t in raw.items()}
    results["raw_seconds"] = raw
    results.update(measure_recall(indexes, vectors, args, rng))
    results["vectors_mib"] = n * args.dim * 4 / 2**20
    results["cache_mib"] = n * cache.shape[1] * 4 / 2**20
    results["load_average_end"] = load_average()
    return results


PASSAGE_WORDS = 36  # about the preset's 48-token passage window (search.passage_window)


def bm25_texts(prepared_dir: Path, datasets: Sequence[str]) -> tuple[list[str], list[str]]:
    """Passage-sized texts (consecutive ``PASSAGE_WORDS``-word pieces of the documents) and the
    queries of the named prepared IR collections."""
    from d2llm.data import load_ir

    passages, queries = [], []
    for name in datasets:
        ir = load_ir(prepared_dir, name)
        for doc in ir.corpus["text"].astype(str):
            words = doc.split()
            passages += [" ".join(words[i : i + PASSAGE_WORDS]) for i in range(0, len(words), PASSAGE_WORDS)]
        queries += ir.queries["text"].astype(str).tolist()
    return passages, queries


def measure_bm25(
    n: int, docs: Sequence[str], queries: Sequence[str], args: argparse.Namespace, work_dir: Path
) -> dict[str, Any]:
    """Build, save, load (memory-mapped) and query the BM25 index of ``n`` passages (``docs`` tiled)."""
    from benchmarks.training_throughput import PeakRSS
    from d2llm.search import Bm25Ranker

    texts = [docs[i % len(docs)] for i in range(n)]
    folder = work_dir / f"bm25-{n}"
    with PeakRSS() as memory:
        before = memory.current()
        start = time.perf_counter()
        built = Bm25Ranker.build(texts)
        build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    built.save(folder)
    save_seconds = time.perf_counter() - start
    del built, texts
    start = time.perf_counter()
    loaded = Bm25Ranker.load(folder)
    load_seconds = time.perf_counter() - start
    asked = list(queries[: args.queries])

    def score() -> None:
        for q in asked:
            loaded.scores(q)

    raw = common.interleaved_timings({"bm25": score}, args.repeats, clock=args.clock)["bm25"]
    return {
        "texts": n,
        "build_seconds": build_seconds,
        "build_peak_rss_growth_mib": (memory.peak - before) / 2**20,
        "save_seconds": save_seconds,
        "load_seconds": load_seconds,
        "folder_mib": sum(f.stat().st_size for f in folder.iterdir()) / 2**20,
        "query_ms": 1000 * common.median(raw) / len(asked),
        "raw_seconds": raw,
    }


def measure_recall(
    indexes: dict[str, Any], vectors: np.ndarray, args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, Any]:
    """Recall@10 of each approximate index against the exact one (None without ``exact``), and
    the IVF nprobe sweep, on their own ``--recall-queries`` queries."""
    recall: dict[str, float | None] = {kind: None for kind in APPROXIMATE if kind in indexes}
    sweep: list[dict[str, float]] = []
    if "exact" in indexes and recall:
        queries = noisy_queries(vectors, min(args.recall_queries, vectors.shape[0]), rng)
        exact_top = indexes["exact"].search(queries, 10)[0]  # one batched exact search
        for kind in recall:
            recall[kind] = recall_at_10(indexes[kind].search(queries, 10)[0], exact_top)
        if "ivf" in indexes and args.ivf_nprobes:
            timing = (args.repeats, args.clock)
            sweep = nprobe_sweep(indexes["ivf"], queries, exact_top, args.ivf_nprobes, *timing)
    return {"recall@10": recall, "ivf_nprobe_sweep": sweep}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import faiss

    argv, args, params = common.start(argv, parse_args)
    faiss.omp_set_num_threads(args.threads)  # FAISS gets the same threads as torch
    s = params.search
    by_size = []
    texts = bm25_texts(args.prepared_dir or params.data.prepared_dir, args.bm25_datasets)
    with tempfile.TemporaryDirectory(prefix="d2llm-index-scale-", dir=args.work_dir) as tmp:
        for n in args.sizes:
            by_size.append(measure_size(n, args, params, Path(tmp)))
            if args.bm25_datasets:
                log.info("N=%d: the BM25 index of %d tiled texts", n, n)
                by_size[-1]["bm25"] = measure_bm25(n, *texts, args, Path(tmp))
    results = {
        "data": SYNTHETIC_NOTE,
        "dim": args.dim,
        "clusters": args.clusters,
        "n_queries": args.queries,
        "n_recall_queries": args.recall_queries,
        "repeats": args.repeats,
        "threads": args.threads,
        "clock": args.clock,
        "rerank_depth": s.rerank_depth,
        "hnsw": {"m": s.hnsw_m, "ef_construction": s.hnsw_ef_construction, "ef_search": s.hnsw_ef_search},
        "ivf": {"nlist": s.ivf_nlist, "nprobe": s.ivf_nprobe, "train_size": s.ivf_train_size},
        "iem": params.student.iem.model_dump(),
        "bm25_data": BM25_NOTE.format(", ".join(args.bm25_datasets)) if args.bm25_datasets else None,
        "sizes": by_size,
    }
    path = common.write_report(NAME, args.out_dir, argv, results)
    print(f"{SYNTHETIC_NOTE}\n")
    if results["bm25_data"]:
        print(f"{results['bm25_data']}\n")
    print_tables(by_size)
    print(f"\nwritten to {path}")
    return results


def print_tables(by_size: list[dict[str, Any]]) -> None:
    """Builds (one row per size and index), query latencies, and the IVF nprobe sweep."""
    header = ["N", "index", "build s", "build CPU s", "train s", "add s", "RSS+ MiB", "MiB", "nlist", "load"]
    keys = ("build_seconds", "build_cpu_seconds", "train_seconds", "add_seconds")
    keys += ("build_peak_rss_growth_mib", "index_mib", "nlist")
    rows = [
        [r["n"], kind, *(r[kind][key] for key in keys), r[kind]["load_average_before"][0]]
        for r in by_size
        for kind in FIRST_STAGES
        if kind in r
    ]
    print(common.format_table(header, rows))
    header = ["N", *(f"recall@10 {kind}" for kind in APPROXIMATE), *(f"{name} ms" for name in SYSTEMS)]
    rows = [
        [
            r["n"],
            *(r["recall@10"].get(kind) for kind in APPROXIMATE),
            *(r["query_ms"].get(name) for name in SYSTEMS),
            r["load_average_before_queries"][0],
        ]
        for r in by_size
    ]
    print("\n" + common.format_table([*header, "load"], rows))
    bm25 = [r["bm25"] for r in by_size if "bm25" in r]
    if bm25:
        keys = ("texts", "build_seconds", "build_peak_rss_growth_mib", "save_seconds", "load_seconds")
        keys += ("folder_mib", "query_ms")
        header = ["N", "BM25 build s", "RSS+ MiB", "save s", "load s", "MiB", "query ms"]
        print("\n" + common.format_table(header, [[row[k] for k in keys] for row in bm25]))
    sweep = [[r["n"], *row.values()] for r in by_size for row in r["ivf_nprobe_sweep"]]
    if sweep:
        print("\n" + common.format_table(["N", "nprobe", "lists scanned", "recall@10 ivf", "ivf ms"], sweep))


if __name__ == "__main__":
    main()
