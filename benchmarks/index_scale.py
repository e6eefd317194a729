"""Index scale: build time, memory and query latency of the first stage at 100k-1M passages.

SYNTHETIC VECTORS: the passage vectors are random unit vectors around random centres (the
shape of real embeddings: dense, overlapping neighbourhoods), written to a memory-mapped .npy
file as ``d2llm index`` writes its vectors. Encoding the passages is the student's cost and is
measured by the other benchmarks; this one measures only what grows with the corpus size.

Per size N, both first stages of ``d2llm.ann`` (the code search uses):

- ``exact``: FAISS ``IndexFlatIP`` (what search uses below ``search.ann_min_size``);
- ``hnsw``: FAISS ``IndexHNSWFlat`` with ``search.hnsw_m``, ``hnsw_ef_construction`` and
  ``hnsw_ef_search`` from params (what search uses from ``ann_min_size`` on);

build seconds, peak RSS growth while building (psutil, sampled every 5 ms), index bytes, and
milliseconds per query (one query at a time, median of interleaved repetitions) for the first
stage alone and followed by the IEM re-ranking of its top M (``search.rerank_depth``) with a
random IEM of ``student.iem`` sizes over synthetic cached projections; next to them the full
IEM over all N cached projections (``search.mode: full``). Recall@10 of HNSW against the exact
top 10 says what the approximation costs.

    python -m benchmarks.index_scale [--sizes 100000 1000000] [--dim 384] [--queries 50]
        [--first-stages exact hnsw]

``--first-stages exact`` measures the exact index alone (and the full IEM): HNSW's build is the
one part that takes long at 1M vectors on a few cores; its systems and recall are then left out.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

NAME = "index_scale"
SYSTEMS = ("exact", "hnsw", "exact+iem", "hnsw+iem", "full-iem")
FIRST_STAGES = ("exact", "hnsw")
SYNTHETIC_NOTE = (
    "synthetic vectors (random unit vectors around random centres), not encoded text: "
    "encoding cost is excluded; build, memory and query figures are the index's own"
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
        help="first-stage indexes to build and time (default: both)",
    )  # fmt: skip
    args = p.parse_args(argv)
    for name in ("dim", "clusters", "queries", "repeats"):
        common.check_positive(f"--{name}", getattr(args, name))
    for n in args.sizes:
        common.check_positive("--sizes", n)
    return args


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
    """Build one first-stage index; its seconds, peak RSS growth and size in bytes."""
    from benchmarks.training_throughput import PeakRSS
    from d2llm.ann import VectorIndex

    s = params.search
    with PeakRSS() as memory:
        before = memory.current()
        start = time.perf_counter()
        index = VectorIndex.build(vectors, kind, s.hnsw_m, s.hnsw_ef_construction, s.hnsw_ef_search)
        seconds = time.perf_counter() - start
    path = work_dir / f"{kind}.faiss"
    index.save(path)
    size = path.stat().st_size
    path.unlink()
    return index, {
        "build_seconds": seconds,
        "build_peak_rss_growth_mib": (memory.peak - before) / 2**20,
        "index_mib": size / 2**20,
    }


def measure_size(n: int, args: argparse.Namespace, params: Any, work_dir: Path) -> dict[str, Any]:
    import torch

    from d2llm.search import iem_scores, top_k_positions
    from d2llm.student.iem import IEM

    s, k, depth = params.search, 10, params.search.rerank_depth
    log.info("N=%d: writing %d synthetic %d-d vectors", n, n, args.dim)
    vectors = synthetic_vectors(work_dir / f"vectors-{n}.npy", n, args.dim, args.clusters, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    queries = np.asarray(vectors[rng.choice(n, size=args.queries, replace=False)])
    queries = (queries + 0.5 * rng.normal(size=queries.shape) / np.sqrt(args.dim)).astype(np.float32)
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

    results: dict[str, Any] = {"n": n}
    indexes = {}
    for kind in args.first_stages:
        log.info("N=%d: building the %s index", n, kind)
        indexes[kind], results[kind] = build("flat" if kind == "exact" else kind, vectors, params, work_dir)

    q_tensors = [torch.from_numpy(q.reshape(1, -1)) for q in queries]

    def first_stage(kind: str, depth_: int) -> list[np.ndarray]:
        return [indexes[kind].search(q, depth_)[0][0] for q in queries]

    def rerank(kind: str) -> None:
        for q, e_q in zip(queries, q_tensors, strict=True):
            positions = np.sort(indexes[kind].search(q, depth)[0][0])
            top_k_positions(iem_scores(scorer, e_q, cache[positions], "asym", s.chunk_size), k)

    def full() -> None:
        for e_q in q_tensors:
            top_k_positions(iem_scores(scorer, e_q, cache, "asym", s.chunk_size), k)

    systems = {
        "exact": lambda: first_stage("exact", k),
        "hnsw": lambda: first_stage("hnsw", k),
        "exact+iem": lambda: rerank("exact"),
        "hnsw+iem": lambda: rerank("hnsw"),
        "full-iem": full,
    }
    systems = {name: run for name, run in systems.items() if name.split("+")[0] in (*indexes, "full-iem")}
    with torch.inference_mode():
        raw = common.interleaved_timings(systems, args.repeats)
    results["query_ms"] = {name: 1000 * common.median(t) / args.queries for name, t in raw.items()}
    results["raw_seconds"] = raw
    results["hnsw_recall@10"] = None
    if len(indexes) == len(FIRST_STAGES):
        exact_top, hnsw_top = first_stage("exact", k), first_stage("hnsw", k)
        pairs = zip(hnsw_top, exact_top, strict=True)
        overlaps = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in pairs]
        results["hnsw_recall@10"] = float(np.mean(overlaps))
    results["vectors_mib"] = n * args.dim * 4 / 2**20
    results["cache_mib"] = n * cache.shape[1] * 4 / 2**20
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import faiss

    argv, args, params = common.start(argv, parse_args)
    faiss.omp_set_num_threads(args.threads)  # FAISS gets the same threads as torch
    s = params.search
    by_size = []
    with tempfile.TemporaryDirectory(prefix="d2llm-index-scale-", dir=args.work_dir) as tmp:
        for n in args.sizes:
            by_size.append(measure_size(n, args, params, Path(tmp)))
    results = {
        "data": SYNTHETIC_NOTE,
        "dim": args.dim,
        "clusters": args.clusters,
        "n_queries": args.queries,
        "repeats": args.repeats,
        "rerank_depth": s.rerank_depth,
        "hnsw": {"m": s.hnsw_m, "ef_construction": s.hnsw_ef_construction, "ef_search": s.hnsw_ef_search},
        "iem": params.student.iem.model_dump(),
        "sizes": by_size,
    }
    path = common.write_report(NAME, args.out_dir, argv, results)
    header = ["N", "build exact s", "build hnsw s", "hnsw RSS+ MiB", "hnsw MiB", "recall@10"]
    header += [f"{name} ms" for name in SYSTEMS]
    rows = [
        [
            r["n"],
            r.get("exact", {}).get("build_seconds"),
            r.get("hnsw", {}).get("build_seconds"),
            r.get("hnsw", {}).get("build_peak_rss_growth_mib"),
            r.get("hnsw", {}).get("index_mib"),
            r["hnsw_recall@10"],
            *(r["query_ms"].get(name) for name in SYSTEMS),
        ]
        for r in by_size
    ]
    print(f"{SYNTHETIC_NOTE}\n")
    print(common.format_table(header, rows))
    print(f"\nwritten to {path}")
    return results


if __name__ == "__main__":
    main()
