"""The corpus index and search with the student: full IEM scoring or two-stage re-ranking.

D2LLM's point is that passages are encoded once, offline: the index stores, per passage, the
PMA vector ``e_b`` and the IEM's passage projection ``W1b e_b``. A query then costs one
encoder pass plus cheap IEM evaluations over the cached projections.

Documents longer than the student's input are split into overlapping passages
(``d2llm.passages``, window and stride in ``search``); a document scores by its best passage
and search returns documents, each with that passage. Nothing is truncated.

- ``mode="full"``: every passage gets its IEM score, in chunks of ``chunk_size`` rows so that
  memory stays flat for any corpus size.
- ``mode="two_stage"``: a first stage (cosine of PMA vectors on FAISS, or BM25) ranks passages;
  a document ranks by its best one, and the top ``rerank_depth`` (M) *documents* are kept
  (at least ``k``: a search for k documents re-ranks k). Every passage of those documents gets
  the IEM, so a kept document is read whole, as full scoring reads it. The cosine first stage is
  exact (FAISS flat) below ``search.ann_min_size`` passages and FAISS HNSW or IVF
  (``search.ann_index``) from there on (``d2llm.ann``). ``first_stage_recall`` measures what
  the first stage costs: the fraction of full-IEM top-k documents that survive it.

- ``lexical_weight`` > 0 (``search.lexical_weight``): hybrid scoring. A document's score is
  ``z(IEM) + lexical_weight * z(BM25)``, its IEM score (by ``aggregation``) and its best passage's
  BM25 score each standardised over the documents scored for this query. Lexical and dense
  evidence disagree where each is weak (rare terms, paraphrase), so the sum ranks better than
  either on collections of technical abstracts (docs/results.md); 0 is the IEM alone.

An index is bound to one student and one corpus: the manifest records a fingerprint of the
student's weights and a hash of the corpus, and ``load_index`` refuses a stale index.

Index layout (``out_dir``): ``vectors.npy [P, d]`` and ``passage_cache.npy [P, h]`` (float32,
written chunk by chunk while encoding and memory-mapped when loaded), ``passages.parquet``
(``doc, start, end``: document position and character span of each passage),
``corpus.parquet`` (``doc_id, text`` in index order), ``ann.faiss`` (only for an HNSW or IVF
first stage; the manifest records which and its build settings), ``bm25/`` (the passages' BM25
index, bm25s's files, memory-mapped when loaded: hybrid scoring and the BM25 first stage read
it instead of rebuilding it in every process), ``manifest.json`` (written last: an index
without it is incomplete), ``build.json`` (how far the encoding got, and for which student,
numerics, code, corpus and passage scheme: a build stopped part-way resumes from the last
written chunk instead of encoding again from the first passage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from d2llm.ann import ANN_FILE, AnnKind, VectorIndex, ann_kind
from d2llm.config import DEFAULT_SEARCH_MODE, ScoringKey, SearchConfig, SearchMode
from d2llm.errors import ArtifactError
from d2llm.jsonfile import write_json
from d2llm.lock import folder_lock
from d2llm.passages import PassageSpans, passage_window, split_passages

if TYPE_CHECKING:
    import pandas as pd
    import torch

log = logging.getLogger(__name__)

Aggregation = Literal["best", "first", "blend"]  # a document's score from its passages' (search.aggregation)
INDEX_FORMAT_VERSION = 2
VECTORS_FILE = "vectors.npy"
CACHE_FILE = "passage_cache.npy"
PASSAGES_FILE = "passages.parquet"
CORPUS_FILE = "corpus.parquet"
BM25_DIR = "bm25"
MANIFEST_FILE = "manifest.json"
BUILD_FILE = "build.json"  # progress of the encoding, for resuming a stopped build


class SearchHit(NamedTuple):
    doc_id: str
    score: float  # the IEM logit of the document's best passage (hybrid: the fused score)
    text: str  # that passage's text (the whole document when it fits in one passage)
    passage: int = 0  # that passage's number within the document


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
    A student with its LoRA merged for inference answers with the fingerprint of the weights it
    was merged from (``D2LLMStudent.fingerprint``), so an index fits the merged and the unmerged
    student alike.
    """
    from d2llm.fingerprint import state_fingerprint

    own = getattr(student, "fingerprint", None)
    return own() if callable(own) else state_fingerprint(student)


# --------------------------------------------------------------------------- BM25


def import_bm25s() -> Any:
    """The bm25s module, its logger put back to WARNING (bm25s sets it to DEBUG when imported)."""
    import bm25s

    # bm25s sets its own logger to DEBUG when imported, so each index build would reach the
    # root handlers (and `d2llm search`'s clean output); its narration is not for users.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class Bm25Ranker:
    """BM25 (bm25s, English stopwords) over a fixed list of texts; scores every one of them.

    ``Bm25Ranker.build(texts)`` indexes texts in memory; ``save`` / ``load`` keep that index in a
    folder (``load`` memory-maps its arrays), so a saved search index never rebuilds it.
    """

    def __init__(self, retriever: Any, size: int):
        self.retriever = retriever
        self.size = size
        self._bm25s = import_bm25s()  # its tokenizer, for each query

    @classmethod
    def build(cls, texts: Sequence[str]) -> Bm25Ranker:
        bm25s = import_bm25s()
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)
        return cls(retriever, len(texts))

    def save(self, folder: str | Path) -> None:
        self.retriever.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: str | Path) -> Bm25Ranker:
        retriever = import_bm25s().BM25.load(str(folder), mmap=True, show_progress=False)
        return cls(retriever, int(retriever.scores["num_docs"]))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every text (0 where no query term occurs)."""
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
    vectors: torch.Tensor  # [P, d] PMA vectors, one per passage
    passage_cache: torch.Tensor  # [P, h] W1b e_b
    manifest: dict[str, Any]
    spans: PassageSpans | None = None  # None: one passage per document, the whole text
    ann: VectorIndex | None = field(default=None, repr=False)  # saved HNSW/IVF; else exact, built on use
    bm25_index: Bm25Ranker | None = field(default=None, repr=False)  # saved BM25; else built on first use

    def __post_init__(self) -> None:
        if self.spans is None:
            self.spans = PassageSpans.one_per_document(self.texts)
        self._first_passage = np.searchsorted(self.spans.doc, np.arange(len(self.doc_ids)))

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def n_passages(self) -> int:
        return len(self.spans)

    def passage_text(self, position: int) -> str:
        return self.spans.text(self.texts, position)

    def passage_number(self, position: int) -> int:
        """The passage's number within its document (0 for the first)."""
        return int(position - self._first_passage[self.spans.doc[position]])

    def bm25(self) -> Bm25Ranker:
        """The passages' BM25: the saved one (``d2llm index`` writes it), else built here on first
        use (an index written before BM25 was saved; rebuilding the index saves it)."""
        if self.bm25_index is None:
            log.info("building BM25 over %d passages (an index without %s/: `d2llm index` saves it)",
                     self.n_passages, BM25_DIR)  # fmt: skip
            self.bm25_index = Bm25Ranker.build(self.spans.texts(self.texts))
        return self.bm25_index

    def vector_index(self) -> VectorIndex:
        """The cosine first stage: the saved HNSW/IVF index, or an exact flat one built on first use."""
        if self.ann is None:
            self.ann = VectorIndex.build(self.vectors, "flat")
        return self.ann


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


def document_passages(
    student: Any, texts: list[str], window: int | None = None, stride: int | None = None
) -> tuple[PassageSpans, dict[str, int] | None]:
    """Passage spans for ``texts`` by the student's tokenizer, and the window/stride used.

    A stand-in student without a tokenizer and a ``max_length`` (tests) reads whole texts:
    each document is one passage.
    """
    tokenizer, cfg = getattr(student, "tokenizer", None), getattr(student, "cfg", None)
    if tokenizer is None or cfg is None:
        return PassageSpans.one_per_document(texts), None
    window = passage_window(tokenizer, cfg.max_length, window)
    stride = stride if stride is not None else max(1, window * 3 // 4)
    return split_passages(texts, tokenizer, window, stride), {"window": window, "stride": stride}


def encoding_key(
    student: Any, corpus_digest: str, split: dict[str, int] | None, n_passages: int
) -> dict[str, Any]:
    """Everything the encoded vectors depend on: a stopped build resumes only where all of it
    is unchanged, so an index never mixes vectors of two students, numerics or corpora.

    The d2llm code is part of it (a fix to the encoder must not meet vectors encoded before);
    the chunk and batch sizes are not (they change how passages are grouped, not what they give).
    """
    from d2llm.fingerprint import code_fingerprint
    from d2llm.hub import cpu_bf16_active
    from d2llm.quantization import is_quantized

    backbone, cfg = getattr(student, "backbone", None), getattr(student, "cfg", None)
    device = getattr(student, "device", None)
    int8 = backbone is not None and is_quantized(backbone)
    # What the encoder runs in, not what was asked: `cpu_bf16` is float32 on a CPU without bf16.
    bf16 = device is not None and cpu_bf16_active(device, bool(getattr(cfg, "cpu_bf16", False)) and not int8)
    return {
        "student_fingerprint": student_fingerprint(student),
        "numerics": {
            "int8_backbone": int8,
            "bf16_autocast": bf16,
            "iem_branch": getattr(getattr(student, "iem", None), "branch_format", None),
            "device": str(device or "cpu"),
        },
        "code": code_fingerprint(),
        "corpus_hash": corpus_digest,
        "passages": split,
        "n_passages": n_passages,
    }


def _resume_point(out_dir: Path, key: dict[str, Any]) -> int:
    """Passages already encoded in ``out_dir`` for ``key`` (0: nothing usable, start over)."""
    try:
        progress = json.loads((out_dir / BUILD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    if not isinstance(progress, dict) or progress.get("key") != key:
        log.info(
            "index build: %s belongs to another student, corpus or passage scheme; encoding anew", BUILD_FILE
        )
        return 0
    encoded = progress.get("encoded")
    n = key["n_passages"]
    try:
        shapes = [np.load(out_dir / name, mmap_mode="r").shape for name in (VECTORS_FILE, CACHE_FILE)]
    except (OSError, ValueError):
        shapes = []
    if not isinstance(encoded, int) or not 0 <= encoded <= n or [s[0] for s in shapes] != [n, n]:
        log.warning("index build: %s and the vector files disagree; encoding anew", BUILD_FILE)
        return 0
    return encoded


def _encode_to_files(
    student: Any,
    passages: Callable[[int, int], list[str]],
    key: dict[str, Any],
    out_dir: Path,
    batch_size: int,
    chunk: int,
    resume: bool = True,
) -> tuple[int, int]:
    """Encode ``key["n_passages"]`` passages ``chunk`` at a time into ``vectors.npy`` /
    ``passage_cache.npy``, recording in ``build.json`` how many are on disk after each chunk.

    ``passages(start, stop)`` gives the texts of one chunk; only that chunk's tensors are in
    memory at a time, the rest is on disk. With ``resume``, a build of the same ``key`` stopped
    part-way (a crash, Ctrl-C, a lost machine) goes on from its last written chunk. Returns ``(d, h)``.
    """
    import torch
    from tqdm.auto import tqdm

    n = key["n_passages"]
    done = _resume_point(out_dir, key) if resume else 0
    vectors = cache = None
    if done:
        log.info("index build: resuming, %d of %d passages already encoded", done, n)
        vectors = np.load(out_dir / VECTORS_FILE, mmap_mode="r+")
        cache = np.load(out_dir / CACHE_FILE, mmap_mode="r+")
    else:
        (out_dir / BUILD_FILE).unlink(missing_ok=True)
    chunks = tqdm(
        range(done, n, chunk),
        desc="encode passages",
        unit="chunk",
        leave=False,
        initial=-(-done // chunk),
        total=-(-n // chunk),
    )
    with torch.inference_mode():
        for start in chunks:
            stop = min(start + chunk, n)
            e_b = student.encode(passages(start, stop), batch_size=batch_size).float().cpu()
            c_b = student.passage_cache(e_b).float().cpu()
            if vectors is None:
                vectors = np.lib.format.open_memmap(
                    out_dir / VECTORS_FILE, mode="w+", dtype=np.float32, shape=(n, e_b.shape[1])
                )
                cache = np.lib.format.open_memmap(
                    out_dir / CACHE_FILE, mode="w+", dtype=np.float32, shape=(n, c_b.shape[1])
                )
            vectors[start:stop] = e_b.numpy()
            cache[start:stop] = c_b.numpy()
            # The record follows the data to disk: a stop between the two re-encodes one chunk.
            vectors.flush()
            cache.flush()
            write_json(out_dir / BUILD_FILE, {"key": key, "encoded": stop})
    assert vectors is not None and cache is not None
    dims = (int(vectors.shape[1]), int(cache.shape[1]))
    del vectors, cache
    return dims


def build_index(
    student: Any,
    corpus_df: pd.DataFrame,
    out_dir: str | Path,
    model_version: str,
    batch_size: int = 64,
    search_cfg: SearchConfig | None = None,
    resume: bool = True,
) -> SearchIndex:
    """Encode the corpus once, passage by passage, and write the index to ``out_dir``.

    Memory holds the document texts and one chunk (``search.encode_chunk`` passages) of
    vectors; the vectors themselves stream to disk. From ``search.ann_min_size`` passages on,
    an approximate first-stage index (``search.ann_index``: HNSW or IVF) is built and saved as
    well. Returns the index, memory-mapped.

    ``resume``: a build into ``out_dir`` that stopped part-way for the same student, numerics,
    code, corpus and passage scheme (``build.json``) goes on from its last written chunk; a
    finished one is not encoded again (only its first-stage, BM25 and manifest are rewritten).
    False encodes everything anew.
    """
    cfg = search_cfg or SearchConfig()
    missing = {"doc_id", "text"} - set(corpus_df.columns)
    if missing:
        raise ArtifactError(f"corpus table lacks column(s) {sorted(missing)}; needs doc_id, text")
    doc_ids = [str(d) for d in corpus_df["doc_id"]]
    if len(set(doc_ids)) != len(doc_ids):
        raise ArtifactError("corpus doc_id values are not unique")
    texts = [str(t) for t in corpus_df["text"]]
    if not texts:
        raise ArtifactError("cannot index an empty corpus")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    busy = f"another process is building an index in {out_dir}: wait for it, or stop it (a new run resumes)"
    with folder_lock(out_dir, busy):  # two builds into one folder would write the same files
        spans, split = document_passages(student, texts, cfg.passage_window, cfg.passage_stride)
        key = encoding_key(student, corpus_hash(doc_ids, texts), split, len(spans))
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # the folder is incomplete until the end
        (out_dir / ANN_FILE).unlink(missing_ok=True)
        shutil.rmtree(out_dir / BM25_DIR, ignore_errors=True)
        dim, cache_dim = _encode_to_files(
            student,
            lambda a, b: [spans.text(texts, i) for i in range(a, b)],
            key,
            out_dir,
            batch_size,
            cfg.encode_chunk,
            resume,
        )
        kind = ann_kind(len(spans), cfg.ann_min_size, cfg.ann_index)
        ann_params = None
        if kind != "flat":
            vectors = np.load(out_dir / VECTORS_FILE, mmap_mode="r")
            ann = build_vector_index(vectors, kind, cfg)
            ann.save(out_dir / ANN_FILE)
            ann_params = _ann_build_params(ann, cfg)
            del vectors, ann
        # BM25 is seconds where the encoding above is minutes: always saved, so that a hybrid or
        # BM25-first-stage search (any process, any --lexical-weight) never rebuilds it.
        Bm25Ranker.build(spans.texts(texts)).save(out_dir / BM25_DIR)
        _passage_frame(spans).to_parquet(out_dir / PASSAGES_FILE, index=False)
        _corpus_frame(doc_ids, texts).to_parquet(out_dir / CORPUS_FILE, index=False)
        manifest = {
            "format_version": INDEX_FORMAT_VERSION,
            "model_version": model_version,
            "student_fingerprint": key["student_fingerprint"],
            "corpus_hash": key["corpus_hash"],
            "n_docs": len(doc_ids),
            "n_passages": len(spans),
            "passages": split,
            "first_stage_ann": kind,
            "first_stage_ann_params": ann_params,
            "bm25": BM25_DIR,
            "vector_dim": dim,
            "cache_dim": cache_dim,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(out_dir / MANIFEST_FILE, manifest)
        return _open_index(out_dir, doc_ids, texts, spans, manifest, cfg.hnsw_ef_search, cfg.ivf_nprobe)


def build_vector_index(vectors: Any, kind: AnnKind, cfg: SearchConfig) -> VectorIndex:
    """The first-stage index of ``kind`` over ``vectors`` with the ``search.*`` build settings."""
    return VectorIndex.build(
        vectors,
        kind,
        cfg.hnsw_m,
        cfg.hnsw_ef_construction,
        cfg.hnsw_ef_search,
        ivf_nlist=cfg.ivf_nlist,
        ivf_nprobe=cfg.ivf_nprobe,
        ivf_train_size=cfg.ivf_train_size,
    )


def _ann_build_params(ann: VectorIndex, cfg: SearchConfig) -> dict[str, Any]:
    """What the saved approximate index was built with, for the manifest (search-time knobs
    such as efSearch and nprobe come from params at load time and are not recorded)."""
    if ann.kind == "hnsw":
        return {"hnsw_m": cfg.hnsw_m, "hnsw_ef_construction": cfg.hnsw_ef_construction}
    return {"ivf_nlist": ann.nlist, "ivf_train_size": min(cfg.ivf_train_size, len(ann))}


def _passage_frame(spans: PassageSpans) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({"doc": spans.doc, "start": spans.start, "end": spans.end})


def read_corpus_file(path: str | Path, id_column: str = "doc_id", text_column: str = "text") -> pd.DataFrame:
    """A user's document file (.csv, .tsv, .jsonl, .parquet) as a ``doc_id, text`` table.

    Errors name the file and, for a missing or duplicate id or an empty text, the data row
    (1-based, header excluded).
    """
    from d2llm.data.custom import read_table
    from d2llm.errors import DataError

    path = Path(path)
    table = read_table(path).reset_index(drop=True)
    missing = [c for c in (id_column, text_column) if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; the file has {list(table.columns)} "
            "(choose them with --id-column / --text-column)"
        )
    ids, texts = table[id_column], table[text_column]
    for row, (doc_id, text) in enumerate(zip(ids, texts, strict=True), start=1):
        if doc_id is None or (isinstance(doc_id, float) and np.isnan(doc_id)) or not str(doc_id).strip():
            raise DataError(f"{path}: data row {row}: column {id_column!r} is empty")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: data row {row} (id {doc_id!r}): column {text_column!r} has no text")
    as_str = ids.astype(str)
    duplicated = as_str.duplicated()
    if duplicated.any():
        row = int(duplicated.idxmax())
        raise DataError(
            f"{path}: data row {row + 1}: id {as_str.iloc[row]!r} in column {id_column!r} "
            f"repeats an earlier row ({int(duplicated.sum())} repeated ids)"
        )
    return _corpus_frame(as_str.tolist(), texts.tolist())


def _corpus_frame(doc_ids: list[str], texts: list[str]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({"doc_id": doc_ids, "text": texts})


def _open_index(
    index_dir: Path,
    doc_ids: list[str],
    texts: list[str],
    spans: PassageSpans,
    manifest: dict[str, Any],
    ef_search: int,
    nprobe: int,
) -> SearchIndex:
    """The index with its tensors memory-mapped (copy-on-write: pages load on use, never written)."""
    import torch

    vectors = torch.from_numpy(np.load(index_dir / VECTORS_FILE, mmap_mode="c"))
    cache = torch.from_numpy(np.load(index_dir / CACHE_FILE, mmap_mode="c"))
    if vectors.shape[0] != len(spans) or cache.shape[0] != len(spans):
        raise ArtifactError(
            f"index at {index_dir} is corrupt: {len(spans)} passages but "
            f"{vectors.shape[0]} vectors and {cache.shape[0]} cached projections"
        )
    ann = None
    if (index_dir / ANN_FILE).exists():
        ann = VectorIndex.load(index_dir / ANN_FILE, ef_search, nprobe)
        if len(ann) != len(spans):
            raise ArtifactError(
                f"index at {index_dir} is corrupt: {ANN_FILE} holds {len(ann)} vectors, not {len(spans)}"
            )
    bm25 = None
    if manifest.get("bm25"):  # indexes written before BM25 was saved have none: built on use
        if not (index_dir / BM25_DIR).is_dir():
            raise ArtifactError(
                f"index at {index_dir} is incomplete: {BM25_DIR}/ is missing (run `d2llm index`)"
            )
        bm25 = Bm25Ranker.load(index_dir / BM25_DIR)
        if bm25.size != len(spans):
            raise ArtifactError(
                f"index at {index_dir} is corrupt: {BM25_DIR}/ holds {bm25.size} passages, not {len(spans)}"
            )
    return SearchIndex(doc_ids, texts, vectors, cache, manifest, spans, ann, bm25)


def load_index(
    index_dir: str | Path,
    student: Any,
    expected_corpus_hash: str | None = None,
    ef_search: int = 128,
    nprobe: int = 32,
) -> SearchIndex:
    """Load an index and refuse it if it was built by another student or for another corpus.

    Checks: the student's fingerprint equals the manifest's; the stored corpus still hashes to
    the manifest's hash; and, when given, ``expected_corpus_hash`` (the corpus the caller
    searches now) equals it too. Each refusal names both values. Vectors are memory-mapped;
    ``ef_search`` is the HNSW search breadth (``search.hnsw_ef_search``) and ``nprobe`` the IVF
    lists scanned per query (``search.ivf_nprobe``), used by whichever approximate index it holds.
    """
    import pandas as pd

    index_dir = Path(index_dir)
    manifest_path = index_dir / MANIFEST_FILE
    if not manifest_path.exists():
        raise ArtifactError(
            f"index at {index_dir} is incomplete: {MANIFEST_FILE} is missing (run `d2llm index`)"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise ArtifactError(
            f"index at {index_dir} has format {manifest.get('format_version')}, "
            f"this code reads format {INDEX_FORMAT_VERSION}: rebuild it with `d2llm index`"
        )
    for required in (VECTORS_FILE, CACHE_FILE, PASSAGES_FILE, CORPUS_FILE):
        if not (index_dir / required).exists():
            raise ArtifactError(
                f"index at {index_dir} is incomplete: {required} is missing (run `d2llm index`)"
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
    table = pd.read_parquet(index_dir / PASSAGES_FILE)
    spans = PassageSpans(*(table[c].to_numpy(dtype=np.int64) for c in ("doc", "start", "end")))
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    bad = (spans.doc < 0) | (spans.doc >= len(texts))
    if bad.any() or (spans.end > lengths[np.clip(spans.doc, 0, len(texts) - 1)]).any():
        raise ArtifactError(f"index at {index_dir} is corrupt: {PASSAGES_FILE} points outside the corpus")
    return _open_index(index_dir, doc_ids, texts, spans, manifest, ef_search, nprobe)


# --------------------------------------------------------------------------- scoring


def iem_scores(
    student: Any, e_q: torch.Tensor, cache: torch.Tensor, task: ScoringKey = "asym", chunk_size: int = 4096
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
    """Passage positions kept by the first stage, best first."""
    if first_stage == "cosine":
        positions = index.vector_index().search(e_q.float().reshape(1, -1), depth)[0][0]
        return positions[positions >= 0]
    if first_stage == "bm25":
        return index.bm25().top(query, depth)
    raise ValueError(f"unknown first stage {first_stage!r}; use 'bm25' or 'cosine'")


def first_stage_documents(
    index: SearchIndex, query: str, e_q: torch.Tensor, first_stage: Literal["bm25", "cosine"], n_docs: int
) -> np.ndarray:
    """The first stage's top ``n_docs`` document positions, best first: a document ranks by its
    best passage. The passage ranking is read deeper (doubling) until it holds ``n_docs``
    documents, or the corpus, or an approximate index that returns fewer hits, runs out."""
    if n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}")
    want = min(index.n_passages, 2 * n_docs)
    while True:
        positions = first_stage_candidates(index, query, e_q, first_stage, want)
        docs = distinct_in_order(index.spans.doc[positions])
        if docs.size >= n_docs or want >= index.n_passages or positions.size < want:
            return docs[:n_docs]
        want = min(index.n_passages, 2 * want)


def distinct_in_order(values: np.ndarray) -> np.ndarray:
    """``values`` without repeats, each where it first occurs."""
    uniq, first = np.unique(values, return_index=True)
    return uniq[np.argsort(first, kind="stable")]


def rank_documents(
    positions: np.ndarray,
    scores: np.ndarray,
    spans: PassageSpans,
    k: int,
    aggregation: Aggregation = "best",
    first_weight: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """The top-``k`` documents among the scored passages, best first: for each, the index into
    ``scores`` of the passage shown with it, and the document's score.

    ``positions[i]`` is the passage ``scores[i]`` belongs to. A document scores by its best
    passage (``best``), its first passage (``first``: a title and its lead), or
    ``(1 - first_weight) * best + first_weight * first`` (``blend``); the first two need the
    document's first passage among ``positions``. Ties are broken by document position, as
    ``top_k_positions`` breaks them by position.
    """
    docs = spans.doc[positions]
    order = top_k_positions(scores, scores.size)  # best first; ties by position
    uniq, at = np.unique(docs[order], return_index=True)
    best_i = order[at]  # per document (in document order): its best passage
    if aggregation == "best":
        shown, doc_scores = best_i, scores[best_i]
    else:
        where = {int(p): i for i, p in enumerate(positions)}
        first_of = spans.first_passages()
        try:
            first_i = np.array([where[int(first_of[d])] for d in uniq], dtype=np.int64)
        except KeyError:
            raise ValueError(
                f"aggregation {aggregation!r} needs each document's first passage scored"
            ) from None
        if aggregation == "first":
            shown, doc_scores = first_i, scores[first_i]
        elif aggregation == "blend":
            shown = best_i
            doc_scores = (1.0 - first_weight) * scores[best_i] + first_weight * scores[first_i]
        else:
            raise ValueError(f"unknown aggregation {aggregation!r}; use 'best', 'first' or 'blend'")
    top = top_k_positions(doc_scores, k)
    return shown[top], doc_scores[top]


def standardised(values: np.ndarray) -> np.ndarray:
    """``(values - mean) / std``; all zeros where the values are all equal (nothing to tell apart)."""
    values = np.asarray(values, dtype=np.float64)
    std = values.std()
    return (values - values.mean()) / std if std > 0 else np.zeros_like(values)


def fuse_lexical(
    index: SearchIndex, query: str, docs: np.ndarray, doc_scores: np.ndarray, weight: float
) -> np.ndarray:
    """``z(doc_scores) + weight * z(BM25)`` for the documents ``docs`` (their best passage's BM25)."""
    best = index.spans.best_per_document(index.bm25().scores(query), len(index))
    return standardised(doc_scores) + weight * standardised(best[docs])


def encode_query(student: Any, query: str) -> torch.Tensor:
    """The query's PMA vector ``[1, d]``, float32 on the CPU."""
    import torch

    with torch.inference_mode():
        return student.encode([query], batch_size=1).float().cpu()


def search(
    student: Any,
    index: SearchIndex,
    query: str,
    k: int = 10,
    mode: SearchMode = DEFAULT_SEARCH_MODE,
    first_stage: Literal["bm25", "cosine"] = "cosine",
    rerank_depth: int = 100,
    chunk_size: int = 4096,
    aggregation: Aggregation = "best",
    first_weight: float = 0.5,
    lexical_weight: float = 0.0,
) -> list[SearchHit]:
    """The top ``k`` documents for ``query`` by their passages' IEM logits (asym branch),
    aggregated per document as ``rank_documents`` does (``search.aggregation``), fused with BM25
    when ``lexical_weight`` > 0 (``fuse_lexical``, over the documents scored).

    ``mode`` defaults to ``search.mode``'s default (``DEFAULT_SEARCH_MODE``: two-stage), which
    re-ranks every passage of the first stage's top ``max(rerank_depth, k)`` documents.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if lexical_weight < 0:
        raise ValueError(f"lexical_weight must be >= 0, got {lexical_weight}")
    e_q = encode_query(student, query)
    if mode == "full":
        positions = np.arange(index.n_passages)
        scores = iem_scores(student, e_q, index.passage_cache, "asym", chunk_size)
    elif mode == "two_stage":
        if rerank_depth < 1:
            raise ValueError(f"rerank_depth must be >= 1, got {rerank_depth}")
        docs = first_stage_documents(index, query, e_q, first_stage, max(rerank_depth, k))
        # Every passage of the kept documents, in position order: the re-ranking then reads each
        # document as full scoring does and breaks ties as it does.
        positions = index.spans.passages_of(docs)
        cache = index.passage_cache[positions]
        scores = iem_scores(student, e_q, cache, "asym", chunk_size)
    else:
        raise ValueError(f"unknown search mode {mode!r}; use 'full' or 'two_stage'")
    hits = []
    depth = k if lexical_weight == 0 else len(index)  # fusion needs every scored document
    shown, doc_scores = rank_documents(positions, scores, index.spans, depth, aggregation, first_weight)
    if lexical_weight > 0:
        doc_scores = fuse_lexical(index, query, index.spans.doc[positions[shown]], doc_scores, lexical_weight)
        top = top_k_positions(doc_scores, k)
        shown, doc_scores = shown[top], doc_scores[top]
    for i, score in zip(shown, doc_scores, strict=True):
        p = int(positions[i])
        doc_id = index.doc_ids[index.spans.doc[p]]
        hits.append(SearchHit(doc_id, float(score), index.passage_text(p), index.passage_number(p)))
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
    """Recall lost by the first stage: mean fraction of the full-IEM top-k documents (by their best
    passage) inside its top M documents.

    1.0 means two-stage search returns what full search returns, for these queries.
    """
    from tqdm.auto import tqdm

    if not queries:
        raise ValueError("first_stage_recall needs at least one query")
    fractions = []
    for query in tqdm(queries, desc=f"first-stage recall ({first_stage}@{rerank_depth})", leave=False):
        e_q = encode_query(student, query)
        full = iem_scores(student, e_q, index.passage_cache, "asym", chunk_size)
        shown, _ = rank_documents(np.arange(index.n_passages), full, index.spans, k)
        full_top = set(index.spans.doc[shown].tolist())  # document positions
        kept = set(first_stage_documents(index, query, e_q, first_stage, rerank_depth).tolist())
        fractions.append(len(full_top & kept) / len(full_top))
    return {
        "recall": float(np.mean(fractions)),
        "min": float(np.min(fractions)),
        "k": k,
        "rerank_depth": rerank_depth,
        "first_stage": first_stage,
        "n_queries": len(fractions),
    }
