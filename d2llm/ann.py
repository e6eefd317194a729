"""The cosine first stage on FAISS: an exact flat index for small corpora, HNSW for large ones.

Vectors are L2-normalised before they enter FAISS, so inner product is cosine similarity.
Below ``search.ann_min_size`` passages the index is ``IndexFlatIP`` (exact, built in memory on
first use, never saved); from that size on it is ``IndexHNSWFlat`` (approximate, built once with
the search index and saved next to it as ``ann.faiss``). ``search.hnsw_ef_search`` trades query
time for recall at search time; ``hnsw_m`` and ``hnsw_ef_construction`` are fixed at build time.
FAISS is imported only here, inside the functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

ANN_FILE = "ann.faiss"


def _import_faiss() -> Any:
    """faiss, without its loader's INFO lines about which CPU build it tried (noise for a search)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


AnnKind = Literal["flat", "hnsw"]


def ann_kind(n_vectors: int, ann_min_size: int) -> AnnKind:
    """``"hnsw"`` from ``ann_min_size`` vectors on, ``"flat"`` (exact) below."""
    return "hnsw" if n_vectors >= ann_min_size else "flat"


def _unit_rows(block: Any) -> np.ndarray:
    rows = np.ascontiguousarray(np.asarray(block, dtype=np.float32))
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


@dataclass
class VectorIndex:
    """Top-k cosine search over a fixed set of vectors (positions are row numbers)."""

    faiss_index: Any
    kind: AnnKind

    @classmethod
    def build(
        cls,
        vectors: Any,
        kind: AnnKind,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        chunk_rows: int = 65_536,
    ) -> VectorIndex:
        """Add ``vectors [N, d]`` (numpy, memmap or torch on CPU) ``chunk_rows`` at a time."""
        faiss = _import_faiss()

        dim = int(vectors.shape[1])
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
        else:
            raise ValueError(f"unknown ANN kind {kind!r}; use 'flat' or 'hnsw'")
        for start in range(0, int(vectors.shape[0]), chunk_rows):
            block = vectors[start : start + chunk_rows]
            index.add(_unit_rows(block.numpy() if hasattr(block, "numpy") else block))
        result = cls(index, kind)
        result.set_ef_search(ef_search)
        return result

    def set_ef_search(self, ef_search: int) -> None:
        """Candidates HNSW explores per query (higher: better recall, slower); no-op for flat."""
        if ef_search < 1:
            raise ValueError(f"ef_search must be >= 1, got {ef_search}")
        if self.kind == "hnsw":
            self.faiss_index.hnsw.efSearch = ef_search

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def search(self, queries: Any, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """``(positions [Q, k], cosines [Q, k])``, best first, ``k = min(depth, N)``.

        HNSW may return fewer than ``k`` hits for a query; missing slots hold position -1.
        """
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        q = np.asarray(queries.numpy() if hasattr(queries, "numpy") else queries, dtype=np.float32)
        k = min(depth, len(self))
        if self.kind == "hnsw":
            # efSearch below k would cap the result list; raise it for this query only.
            previous = self.faiss_index.hnsw.efSearch
            self.faiss_index.hnsw.efSearch = max(previous, k)
            try:
                scores, positions = self.faiss_index.search(_unit_rows(q.reshape(-1, q.shape[-1])), k)
            finally:
                self.faiss_index.hnsw.efSearch = previous
        else:
            scores, positions = self.faiss_index.search(_unit_rows(q.reshape(-1, q.shape[-1])), k)
        return positions, scores

    def save(self, path: str | Path) -> None:
        faiss = _import_faiss()

        faiss.write_index(self.faiss_index, str(path))

    @classmethod
    def load(cls, path: str | Path, ef_search: int = 128) -> VectorIndex:
        faiss = _import_faiss()

        index = faiss.read_index(str(path))
        kind: AnnKind = "hnsw" if hasattr(index, "hnsw") else "flat"
        result = cls(index, kind)
        result.set_ef_search(ef_search)
        return result
