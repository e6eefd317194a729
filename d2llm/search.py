"""The corpus index and search with the student: full IEM scoring or two-stage re-ranking.

D2LLM's point is that passages are encoded once, offline: the index stores, per document, the
PMA vector ``e_b`` and the IEM's passage projection ``W1b e_b``. A query then costs one
encoder pass plus cheap IEM evaluations over the cached projections.

- ``mode="full"``: every passage gets its IEM score, in chunks of ``chunk_size`` rows so that
  memory stays flat for any corpus size.
- ``mode="two_stage"``: a first stage (cosine of PMA vectors, or BM25) keeps the top
  ``rerank_depth`` (M) passages and only those get the IEM. ``first_stage_recall`` measures
  what this costs: the fraction of full-IEM top-k documents that survive the first stage.

An index is bound to one student and one corpus: the manifest records a fingerprint of the
student's weights and a hash of the corpus, and ``load_index`` refuses a stale index.

Index layout (``out_dir``): ``index.safetensors`` (``vectors [N, d]``, ``passage_cache [N, h]``),
``corpus.parquet`` (``doc_id, text`` in index order), ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from d2llm.errors import ArtifactError

if TYPE_CHECKING:
    import pandas as pd
    import torch

INDEX_FORMAT_VERSION = 1
TENSORS_FILE = "index.safetensors"
CORPUS_FILE = "corpus.parquet"
MANIFEST_FILE = "manifest.json"


class SearchHit(NamedTuple):
    doc_id: str
    score: float
    text: str


# --------------------------------------------------------------------------- hashing


def corpus_hash(doc_ids: Iterable[str], texts: Iterable[str]) -> str:
    """sha256 over (doc id, text) in order; separators keep "ab"+"c" apart from "a"+"bc"."""
    h = hashlib.sha256()
    for doc_id, text in zip(doc_ids, texts, strict=True):
        h.update(str(doc_id).encode("utf-8") + b"\x1f" + str(text).encode("utf-8") + b"\x1e")
    return h.hexdigest()


def student_fingerprint(student: Any) -> str:
    """sha256 of the student's weights (names, dtypes, shapes and bytes, sorted by name).

    These are exactly the tensors ``save_pretrained`` writes, so a retrained or re-loaded
    different checkpoint gives a different fingerprint, and the same checkpoint the same one.
    """
    import torch

    h = hashlib.sha256()
    state = student.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            # Raw bytes, whatever the dtype (bf16 has no numpy equivalent).
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- BM25


class Bm25Ranker:
    """BM25 (bm25s) over a fixed list of texts; scores every document of the corpus."""

    def __init__(self, texts: Sequence[str]):
        import bm25s

        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        tokens = bm25s.tokenize(list(texts), stopwords="en", show_progress=False)
        self.retriever.index(tokens, show_progress=False)
        self.size = len(texts)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document (0 where no query term occurs)."""
        terms = self._bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        if not terms:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(terms), dtype=np.float32)

    def top(self, query: str, k: int) -> np.ndarray:
        """Corpus positions of the top-k documents, best first (ties: lower position first)."""
        return top_k_positions(self.scores(query), k)


def top_k_positions(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, descending; ties broken by position (deterministic)."""
    scores = np.asarray(scores, dtype=np.float64)
    k = min(k, scores.size)
    order = np.lexsort((np.arange(scores.size), -scores))
    return order[:k]


# --------------------------------------------------------------------------- the index


@dataclass
class SearchIndex:
    doc_ids: list[str]
    texts: list[str]
    vectors: torch.Tensor  # [N, d] PMA vectors
    passage_cache: torch.Tensor  # [N, h] W1b e_b
    manifest: dict[str, Any]
    _bm25: Bm25Ranker | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def bm25(self) -> Bm25Ranker:
        """Built on first use: only BM25 first-stage searches pay for it."""
        if self._bm25 is None:
            self._bm25 = Bm25Ranker(self.texts)
        return self._bm25


def encode_corpus(student: Any, texts: Sequence[str], batch_size: int = 64, desc: str = "encode corpus"):
    """PMA vectors and cached IEM passage projections for ``texts``, on CPU.

    Texts go to ``student.encode`` in blocks of ``16 * batch_size`` (it batches them by length
    inside a block); the progress bar counts blocks.
    """
    import torch
    from tqdm.auto import tqdm

    block = 16 * batch_size
    vectors, caches = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), block), desc=desc, unit="block", leave=False):
            e_b = student.encode(list(texts[start : start + block]), batch_size=batch_size)
            vectors.append(e_b.float().cpu())
            caches.append(student.passage_cache(e_b).float().cpu())
    if not vectors:
        raise ArtifactError("cannot index an empty corpus")
    return torch.cat(vectors), torch.cat(caches)


def build_index(
    student: Any,
    corpus_df: pd.DataFrame,
    out_dir: str | Path,
    model_version: str,
    batch_size: int = 64,
) -> SearchIndex:
    """Encode the corpus once and write the index (tensors, corpus, manifest) to ``out_dir``."""
    from safetensors.torch import save_file

    missing = {"doc_id", "text"} - set(corpus_df.columns)
    if missing:
        raise ArtifactError(f"corpus table lacks column(s) {sorted(missing)}; needs doc_id, text")
    doc_ids = [str(d) for d in corpus_df["doc_id"]]
    if len(set(doc_ids)) != len(doc_ids):
        raise ArtifactError("corpus doc_id values are not unique")
    texts = [str(t) for t in corpus_df["text"]]
    vectors, cache = encode_corpus(student, texts, batch_size=batch_size)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"vectors": vectors.contiguous(), "passage_cache": cache.contiguous()}, out_dir / TENSORS_FILE)
    _corpus_frame(doc_ids, texts).to_parquet(out_dir / CORPUS_FILE, index=False)
    manifest = {
        "format_version": INDEX_FORMAT_VERSION,
        "model_version": model_version,
        "student_fingerprint": student_fingerprint(student),
        "corpus_hash": corpus_hash(doc_ids, texts),
        "n_docs": len(doc_ids),
        "vector_dim": int(vectors.shape[1]),
        "cache_dim": int(cache.shape[1]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return SearchIndex(doc_ids, texts, vectors, cache, manifest)


def _corpus_frame(doc_ids: list[str], texts: list[str]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({"doc_id": doc_ids, "text": texts})


def load_index(index_dir: str | Path, student: Any, expected_corpus_hash: str | None = None) -> SearchIndex:
    """Load an index and refuse it if it was built by another student or for another corpus.

    Checks: the student's fingerprint equals the manifest's; the stored corpus still hashes to
    the manifest's hash; and, when given, ``expected_corpus_hash`` (the corpus the caller
    searches now) equals it too. Each refusal names both values.
    """
    import pandas as pd
    from safetensors.torch import load_file

    index_dir = Path(index_dir)
    manifest_path = index_dir / MANIFEST_FILE
    for required in (manifest_path, index_dir / TENSORS_FILE, index_dir / CORPUS_FILE):
        if not required.exists():
            raise ArtifactError(
                f"index at {index_dir} is incomplete: {required.name} is missing (run `d2llm index`)"
            )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise ArtifactError(
            f"index at {index_dir} has format {manifest.get('format_version')}, "
            f"this code reads format {INDEX_FORMAT_VERSION}: rebuild it"
        )

    current = student_fingerprint(student)
    if current != manifest["student_fingerprint"]:
        raise ArtifactError(
            f"stale index at {index_dir}: built for student {manifest['student_fingerprint'][:16]}… "
            f"(model version {manifest.get('model_version')!r}) but the loaded student is {current[:16]}…; "
            "rebuild the index with `d2llm index`"
        )
    corpus = pd.read_parquet(index_dir / CORPUS_FILE)
    doc_ids, texts = corpus["doc_id"].astype(str).tolist(), corpus["text"].astype(str).tolist()
    stored = corpus_hash(doc_ids, texts)
    if stored != manifest["corpus_hash"]:
        raise ArtifactError(
            f"index at {index_dir} is corrupt: its corpus hashes to {stored[:16]}… "
            f"but the manifest says {manifest['corpus_hash'][:16]}…"
        )
    if expected_corpus_hash is not None and expected_corpus_hash != manifest["corpus_hash"]:
        raise ArtifactError(
            f"stale index at {index_dir}: built for corpus {manifest['corpus_hash'][:16]}… but the current "
            f"corpus is {expected_corpus_hash[:16]}…; rebuild the index with `d2llm index`"
        )
    tensors = load_file(index_dir / TENSORS_FILE)
    vectors, cache = tensors["vectors"], tensors["passage_cache"]
    if vectors.shape[0] != len(doc_ids) or cache.shape[0] != len(doc_ids):
        raise ArtifactError(
            f"index at {index_dir} is corrupt: {len(doc_ids)} documents but "
            f"{vectors.shape[0]} vectors and {cache.shape[0]} cached projections"
        )
    return SearchIndex(doc_ids, texts, vectors, cache, manifest)


# --------------------------------------------------------------------------- scoring


def iem_scores(
    student: Any, e_q: torch.Tensor, cache: torch.Tensor, task: str = "asym", chunk_size: int = 4096
) -> np.ndarray:
    """IEM logits of one query vector ``e_q [1, d]`` against cached passages, ``chunk_size`` at a time."""
    import torch

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = []
    with torch.inference_mode():
        for start in range(0, cache.shape[0], chunk_size):
            z = student.score_matrix(e_q, cache[start : start + chunk_size], task)
            out.append(z.reshape(-1).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def cosine_scores(e_q: torch.Tensor, vectors: torch.Tensor) -> np.ndarray:
    import torch.nn.functional as F

    q = F.normalize(e_q.float().reshape(1, -1), dim=-1)
    return (F.normalize(vectors.float(), dim=-1) @ q.T).reshape(-1).cpu().numpy()


def first_stage_candidates(
    index: SearchIndex, query: str, e_q: torch.Tensor, first_stage: Literal["bm25", "cosine"], depth: int
) -> np.ndarray:
    """Corpus positions kept by the first stage, best first."""
    if first_stage == "cosine":
        return top_k_positions(cosine_scores(e_q, index.vectors), depth)
    if first_stage == "bm25":
        return index.bm25().top(query, depth)
    raise ValueError(f"unknown first stage {first_stage!r}; use 'bm25' or 'cosine'")


def _encode_query(student: Any, query: str):
    import torch

    with torch.inference_mode():
        return student.encode([query], batch_size=1).float().cpu()


def search(
    student: Any,
    index: SearchIndex,
    query: str,
    k: int = 10,
    mode: Literal["full", "two_stage"] = "full",
    first_stage: Literal["bm25", "cosine"] = "cosine",
    rerank_depth: int = 100,
    chunk_size: int = 4096,
) -> list[SearchHit]:
    """The top ``k`` passages for ``query`` by the student's IEM logit (asym branch)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    e_q = _encode_query(student, query)
    if mode == "full":
        positions = np.arange(len(index))
        scores = iem_scores(student, e_q, index.passage_cache, "asym", chunk_size)
    elif mode == "two_stage":
        if rerank_depth < 1:
            raise ValueError(f"rerank_depth must be >= 1, got {rerank_depth}")
        # Sorted positions: the re-ranking then breaks ties exactly as full scoring does.
        positions = np.sort(first_stage_candidates(index, query, e_q, first_stage, rerank_depth))
        cache = index.passage_cache[positions]
        scores = iem_scores(student, e_q, cache, "asym", chunk_size)
    else:
        raise ValueError(f"unknown search mode {mode!r}; use 'full' or 'two_stage'")
    hits = []
    for i in top_k_positions(scores, k):
        p = positions[i]
        hits.append(SearchHit(index.doc_ids[p], float(scores[i]), index.texts[p]))
    return hits


def first_stage_recall(
    student: Any,
    index: SearchIndex,
    queries: Sequence[str],
    k: int = 10,
    first_stage: Literal["bm25", "cosine"] = "cosine",
    rerank_depth: int = 100,
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Recall lost by the first stage: mean fraction of the full-IEM top-k inside its top M.

    1.0 means two-stage search returns what full search returns, for these queries.
    """
    from tqdm.auto import tqdm

    if not queries:
        raise ValueError("first_stage_recall needs at least one query")
    fractions = []
    for query in tqdm(queries, desc=f"first-stage recall ({first_stage}@{rerank_depth})", leave=False):
        e_q = _encode_query(student, query)
        full = iem_scores(student, e_q, index.passage_cache, "asym", chunk_size)
        full_top = set(top_k_positions(full, k).tolist())
        kept = set(first_stage_candidates(index, query, e_q, first_stage, rerank_depth).tolist())
        fractions.append(len(full_top & kept) / len(full_top))
    return {
        "recall": float(np.mean(fractions)),
        "min": float(np.min(fractions)),
        "k": k,
        "rerank_depth": rerank_depth,
        "first_stage": first_stage,
        "n_queries": len(fractions),
    }
