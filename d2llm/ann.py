"""The cosine first stage on FAISS: an exact flat index for small corpora, HNSW or IVF for large ones.

Vectors are L2-normalised before they enter FAISS, so inner product is cosine similarity.
Below ``search.ann_min_size`` passages the index is ``IndexFlatIP`` (exact, built in memory on
first use, never saved); from that size on it is the approximate index ``search.ann_index``
names, built once with the search index and saved next to it as ``ann.faiss``:

- ``ivf`` (default): ``IndexIVFFlat``: k-means splits the vectors into ``search.ivf_nlist``
  lists (trained on a seeded sample of ``ivf_train_size`` vectors); a query scans the
  ``ivf_nprobe`` lists whose centroids are nearest. Fast to build, and ``ivf_nprobe`` trades
  query time for recall at search time.
- ``hnsw``: ``IndexHNSWFlat``. ``search.hnsw_ef_search`` trades query time for recall at search
  time; ``hnsw_m`` and ``hnsw_ef_construction`` are fixed at build time. Slow to build (graph
  insertion: minutes of a core per 100k vectors), fast to query.

FAISS is imported only here, inside the functions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from d2llm.errors import ArtifactError, ConfigError

ANN_FILE = "ann.faiss"
# FAISS's k-means warns below 39 training points per centroid: fewer leave the centroids noisy.
MIN_TRAIN_POINTS_PER_LIST = 39


def _import_faiss() -> Any:
    """faiss, without its loader's INFO lines about which CPU build it tried (noise for a search)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


AnnKind = Literal["flat", "hnsw", "ivf"]
ApproximateKind = Literal["hnsw", "ivf"]
APPROXIMATE_KINDS: tuple[ApproximateKind, ...] = ("hnsw", "ivf")


def ann_kind(n_vectors: int, ann_min_size: int, approximate: ApproximateKind = "ivf") -> AnnKind:
    """``approximate`` (``"hnsw"`` or ``"ivf"``) from ``ann_min_size`` vectors on, else ``"flat"`` (exact)."""
    if approximate not in APPROXIMATE_KINDS:
        raise ValueError(f"unknown approximate index {approximate!r}; use one of {APPROXIMATE_KINDS}")
    return approximate if n_vectors >= ann_min_size else "flat"


def ivf_list_count(n_vectors: int, n_train: int, nlist: int | None = None) -> int:
    """IVF lists for ``n_vectors`` trained on ``n_train``: ``nlist``, or ~4*sqrt(n_vectors).

    The rule of thumb is clamped so that k-means has ``MIN_TRAIN_POINTS_PER_LIST`` training
    points per list (and at least one list); an explicit ``nlist`` that the training sample
    cannot support is an error, not a silent change of the configured index.
    """
    if n_train < 1:
        raise ValueError(f"IVF needs at least one training vector, got {n_train}")
    supported = max(1, n_train // MIN_TRAIN_POINTS_PER_LIST)
    if nlist is None:
        return max(1, min(round(4 * math.sqrt(n_vectors)), supported))
    if nlist < 1:
        raise ValueError(f"ivf_nlist must be >= 1, got {nlist}")
    if nlist > supported:
        raise ConfigError(
            f"ivf_nlist={nlist} needs at least {nlist * MIN_TRAIN_POINTS_PER_LIST} training vectors "
            f"({MIN_TRAIN_POINTS_PER_LIST} per list) but only {n_train} are available: lower "
            f"search.ivf_nlist to <= {supported}, set it to null (a rule of thumb), or raise "
            "search.ivf_train_size / search.ann_min_size"
        )
    return nlist


def _unit_rows(block: Any) -> np.ndarray:
    rows = np.ascontiguousarray(np.asarray(block, dtype=np.float32))
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def _as_numpy(block: Any) -> Any:
    return block.numpy() if hasattr(block, "numpy") else block


def training_sample(vectors: Any, size: int, seed: int) -> np.ndarray:
    """``min(size, N)`` unit rows of ``vectors``, drawn without replacement by ``seed``.

    Rows are read in position order, so a memory-mapped file is read forward once; only the
    sample is in memory.
    """
    n = int(vectors.shape[0])
    if size >= n:
        rows = np.arange(n)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return _unit_rows(_as_numpy(vectors)[rows])


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
        *,
        ivf_nlist: int | None = None,
        ivf_nprobe: int = 32,
        ivf_train_size: int = 200_000,
        seed: int = 0,
    ) -> VectorIndex:
        """The index of ``kind`` over ``vectors [N, d]`` (numpy, memmap or torch on CPU).

        ``trained`` then ``add``: IVF trains its k-means on a seeded sample of
        ``ivf_train_size`` vectors, and vectors are added ``chunk_rows`` at a time, so memory
        holds the sample and one chunk besides the index, never the whole input.
        """
        ivf = {"ivf_nlist": ivf_nlist, "ivf_train_size": ivf_train_size, "seed": seed}
        index = cls.trained(vectors, kind, hnsw_m, ef_construction, **ivf)
        index.add(vectors, chunk_rows)
        index.set_ef_search(ef_search)
        index.set_nprobe(ivf_nprobe)
        return index

    @classmethod
    def trained(
        cls,
        vectors: Any,
        kind: AnnKind,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        *,
        ivf_nlist: int | None = None,
        ivf_train_size: int = 200_000,
        seed: int = 0,
    ) -> VectorIndex:
        """An index of ``kind`` holding no vectors yet, ready for ``add``.

        Only IVF learns from ``vectors`` here (its k-means lists, on a sample); flat and HNSW
        need no training and only read the vector size.
        """
        faiss = _import_faiss()

        dim = int(vectors.shape[1])
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
        elif kind == "ivf":
            index = _trained_ivf(faiss, vectors, ivf_nlist, ivf_train_size, seed)
        else:
            raise ValueError(f"unknown ANN kind {kind!r}; use 'flat', 'hnsw' or 'ivf'")
        return cls(index, kind)

    def add(self, vectors: Any, chunk_rows: int = 65_536) -> None:
        """Append ``vectors`` (normalised here) ``chunk_rows`` at a time; positions continue."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        for start in range(0, int(vectors.shape[0]), chunk_rows):
            self.faiss_index.add(_unit_rows(_as_numpy(vectors[start : start + chunk_rows])))

    def set_ef_search(self, ef_search: int) -> None:
        """Candidates HNSW explores per query (higher: better recall, slower); no-op otherwise."""
        if ef_search < 1:
            raise ValueError(f"ef_search must be >= 1, got {ef_search}")
        if self.kind == "hnsw":
            self.faiss_index.hnsw.efSearch = ef_search

    def set_nprobe(self, nprobe: int) -> None:
        """IVF lists scanned per query (higher: better recall, slower); no-op otherwise.

        Above the index's list count it scans every list (exact, at the cost of a flat scan).
        """
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if self.kind == "ivf":
            self.faiss_index.nprobe = min(nprobe, int(self.faiss_index.nlist))

    @property
    def nlist(self) -> int | None:
        """The IVF index's list count; None for other kinds."""
        return int(self.faiss_index.nlist) if self.kind == "ivf" else None

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def search(self, queries: Any, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """``(positions [Q, k], cosines [Q, k])``, best first, ``k = min(depth, N)``.

        HNSW, and IVF when its ``nprobe`` lists hold fewer than ``k`` vectors, may return fewer
        than ``k`` hits for a query; missing slots hold position -1.
        """
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        q = np.asarray(_as_numpy(queries), dtype=np.float32)
        q = _unit_rows(q.reshape(-1, q.shape[-1]))
        k = min(depth, len(self))
        if self.kind == "hnsw":
            # efSearch below k would cap the result list; raise it for this query only.
            previous = self.faiss_index.hnsw.efSearch
            self.faiss_index.hnsw.efSearch = max(previous, k)
            try:
                scores, positions = self.faiss_index.search(q, k)
            finally:
                self.faiss_index.hnsw.efSearch = previous
        else:
            scores, positions = self.faiss_index.search(q, k)
        return positions, scores

    def save(self, path: str | Path) -> None:
        faiss = _import_faiss()

        faiss.write_index(self.faiss_index, str(path))

    @classmethod
    def load(cls, path: str | Path, ef_search: int = 128, nprobe: int = 32) -> VectorIndex:
        """A saved index; its kind is read from the FAISS index type."""
        faiss = _import_faiss()

        index = faiss.read_index(str(path))
        result = cls(index, _kind_of(faiss, index, path))
        result.set_ef_search(ef_search)
        result.set_nprobe(nprobe)
        return result


def _kind_of(faiss: Any, index: Any, path: str | Path) -> AnnKind:
    if isinstance(index, faiss.IndexHNSWFlat):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(index, faiss.IndexFlatIP):
        return "flat"
    raise ArtifactError(
        f"{path} holds a FAISS {type(index).__name__}, not one d2llm builds "
        "(IndexFlatIP, IndexHNSWFlat or IndexIVFFlat): rebuild it with `d2llm index`"
    )


def _trained_ivf(faiss: Any, vectors: Any, nlist: int | None, train_size: int, seed: int) -> Any:
    """An empty ``IndexIVFFlat`` (inner product) whose k-means lists are trained on a sample."""
    if train_size < 1:
        raise ValueError(f"ivf_train_size must be >= 1, got {train_size}")
    sample = training_sample(vectors, train_size, seed)
    lists = ivf_list_count(int(vectors.shape[0]), len(sample), nlist)
    quantizer = faiss.IndexFlatIP(sample.shape[1])
    index = faiss.IndexIVFFlat(quantizer, sample.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    # k-means itself uses at most cp.max_points_per_centroid (256) points per list of the sample.
    index.train(sample)
    return index
