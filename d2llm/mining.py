"""Hard negatives for each training anchor, mined with BM25 and with a bi-encoder.

For every positive pair (anchor, positive) of the train split, the candidates are the dataset's
pool of train ``text_b`` (or the IR corpus for ``<ir>_titles`` datasets). Every known positive
of the anchor (in either direction, train or dev split; test labels are never read) and the
anchor itself are excluded; of the
remaining ranking, ranks ``[depth_min, depth_max)`` are taken: the very top ranks are skipped
because they are often unlabelled positives. ``method: both`` interleaves the BM25 and the
bi-encoder picks (deduplicated), so each negative list mixes lexical and semantic confusers.
With ``mining.labelled_negatives: L`` (paper: 0) the first L negatives are the anchor's own
gold negatives of the train split (NLI: neutral or contradicted hypotheses; QA: wrong candidate
answers), the confusers the task is judged on; mined ones fill the rest of the K.

The bi-encoder is the student's backbone with mean pooling and cosine similarity (the
baseline of the paper). Its search runs over CHUNKS of ``mining.chunk_size`` corpus rows with a
running top-k, so memory stays bounded by the chunk, not the corpus. Ties are broken by corpus
position, so chunked and unchunked search return the same ranking.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from d2llm.biencoder import MeanPoolEncoder
from d2llm.data.tables import load_pairs
from d2llm.errors import DataError

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from d2llm.config import MiningConfig, Params

log = logging.getLogger(__name__)

NEGATIVE_COLUMNS = ("dataset", "task", "anchor", "positive", "negatives", "method")
_TOKEN = re.compile(r"[0-9a-z]+|[\u3400-\u4dbf\u4e00-\u9fff]")  # words, and CJK one char at a time
TITLES_SUFFIX = "_titles"
QRELS_TRAIN_SUFFIX = "_train"  # training pairs of a custom IR collection (d2llm.data.custom)


# --------------------------------------------------------------------------- rankers


def bm25_tokens(text: str) -> list[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return [t for t in _TOKEN.findall(text.lower()) if t not in STOPWORDS_EN]


def bm25_rankings(queries: Sequence[str], corpus: Sequence[str], k: int) -> list[list[int]]:
    """Corpus positions of the top-``k`` BM25 matches of each query; zero-score matches dropped."""
    from d2llm.search import import_bm25s

    retriever = import_bm25s().BM25()
    retriever.index([bm25_tokens(t) for t in corpus], show_progress=False)
    k = min(k, len(corpus))
    docs, scores = retriever.retrieve([bm25_tokens(q) for q in queries], k=k, show_progress=False)
    # A zero score shares no term with the query: an arbitrary text, not a hard negative.
    return [
        [int(d) for d, s in zip(row_d, row_s, strict=True) if s > 0]
        for row_d, row_s in zip(docs, scores, strict=True)
    ]


class BiEncoder(MeanPoolEncoder):
    """The mining encoder: the student's backbone as a plain bi-encoder, sized by ``MiningConfig``."""

    @classmethod
    def load(
        cls,
        ref: str,
        cfg: MiningConfig,
        device: str = "auto",
        gguf_file: str | None = None,
        cpu_bf16: bool = False,
    ) -> BiEncoder:
        encoder = cls.from_ref(
            ref,
            gguf_file,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            device=device,
            cpu_bf16=cpu_bf16,
        )
        return encoder  # type: ignore[return-value]


def chunked_topk(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, chunk_size: int, query_batch: int = 1024
) -> torch.Tensor:
    """Indices ``[Q, k]`` of the highest dot products, scanning the corpus ``chunk_size`` rows at a time.

    A running top-k is merged with each chunk's top-k. Stable sorts keep equal scores in corpus
    order (the running list always holds earlier rows), so the result equals one full sort.
    """
    import torch

    k = min(k, corpus.shape[0])
    out = []
    for q0 in range(0, queries.shape[0], query_batch):
        q = queries[q0 : q0 + query_batch]
        best_val = q.new_empty((q.shape[0], 0))
        best_idx = torch.empty((q.shape[0], 0), dtype=torch.long)
        for c0 in range(0, corpus.shape[0], chunk_size):
            sims = q @ corpus[c0 : c0 + chunk_size].T
            val, idx = torch.sort(sims, dim=1, descending=True, stable=True)
            merged_val = torch.cat([best_val, val[:, :k]], dim=1)
            merged_idx = torch.cat([best_idx, idx[:, :k] + c0], dim=1)
            order = torch.sort(merged_val, dim=1, descending=True, stable=True).indices[:, :k]
            best_val = torch.gather(merged_val, 1, order)
            best_idx = torch.gather(merged_idx, 1, order)
        out.append(best_idx)
    return torch.cat(out)


def biencoder_rankings(
    encoder: BiEncoder, queries: Sequence[str], corpus: Sequence[str], k: int, chunk_size: int
) -> list[list[int]]:
    q = encoder.encode(queries)
    c = encoder.encode(corpus, show_progress=len(corpus) > 20 * encoder.batch_size)
    return chunked_topk(q, c, k, chunk_size).tolist()


# --------------------------------------------------------------------------- selection


def window(ranking: Sequence[int], excluded: set[int], depth_min: int, depth_max: int) -> list[int]:
    """Ranks ``[depth_min, depth_max)`` of ``ranking`` once excluded positions are removed."""
    kept = [i for i in ranking if i not in excluded]
    return kept[depth_min:depth_max]


def interleave(*lists: Sequence[int]) -> list[int]:
    """First of each list, then second of each, ...; duplicates keep their first place."""
    out: dict[int, None] = {}
    for row in range(max((len(x) for x in lists), default=0)):
        for x in lists:
            if row < len(x):
                out.setdefault(x[row], None)
    return list(out)


def _positives(df: pd.DataFrame) -> dict[str, set[str]]:
    """Known positives of every text, in both directions, from the train and dev splits.

    Test labels are never read: they belong to the report alone.
    """
    known: dict[str, set[str]] = defaultdict(set)
    rows = df[df["is_positive"] & (df["split"] != "test")]
    for a, b in zip(rows["text_a"], rows["text_b"], strict=True):
        known[a].add(b)
        known[b].add(a)
    return known


def _labelled_negatives(train: pd.DataFrame, known: dict[str, set[str]]) -> dict[str, list[str]]:
    """Each train anchor's gold negatives (``is_positive`` false), in data order, deduplicated.

    A text that is a known positive of the anchor elsewhere (duplicated pairs with different
    labels) is left out: it must not be pushed down as a negative.
    """
    out: dict[str, dict[str, None]] = defaultdict(dict)
    rows = train[~train["is_positive"]]
    for a, b in zip(rows["text_a"], rows["text_b"], strict=True):
        if b != a and b not in known.get(a, ()):
            out[a].setdefault(b, None)
    return {a: list(bs) for a, bs in out.items()}


def _pool(prepared_dir: Path, name: str, train: pd.DataFrame) -> tuple[list[str], bool]:
    """Candidate texts, and whether they are whole IR documents (title + body)."""
    import pandas as pd

    if name.endswith(TITLES_SUFFIX):
        corpus = prepared_dir / "ir" / name.removesuffix(TITLES_SUFFIX) / "corpus.parquet"
        if corpus.is_file():
            return list(dict.fromkeys(pd.read_parquet(corpus)["text"].tolist())), True
        log.warning("%s: IR corpus %s not found; mining from the dataset's own passages", name, corpus)
    base = name.removesuffix(QRELS_TRAIN_SUFFIX)
    corpus = prepared_dir / "ir" / base / "corpus.parquet"
    if name.endswith(QRELS_TRAIN_SUFFIX) and corpus.is_file() and train["source"].eq(base).all():
        # Training pairs of a custom IR collection (query -> document): negatives from its corpus.
        return list(dict.fromkeys(pd.read_parquet(corpus)["text"].tolist())), False
    return list(dict.fromkeys(train["text_b"].tolist())), False


def capped_pool(pool: list[str], size: int) -> list[str]:
    """``size`` texts of ``pool`` chosen by a hash of the text (the same on every machine and run),
    in pool order."""
    from d2llm.data.sources import hash_fraction

    keep = set(sorted(pool, key=hash_fraction)[:size])
    return [text for text in pool if text in keep]


def mine_dataset(
    name: str, df: pd.DataFrame, prepared_dir: Path, cfg: MiningConfig, encoder: BiEncoder | None
) -> pd.DataFrame:
    """Negatives for every (anchor, positive) of ``name``'s train split."""
    import pandas as pd

    train = df[df["split"] == "train"]
    pos_rows = train[train["is_positive"]].drop_duplicates(["text_a", "text_b"])
    if pos_rows.empty:
        raise DataError(
            f"dataset {name!r} has no positive train pairs (is_positive) to mine negatives for; "
            "remove it from labelling.datasets or check how its positives are defined"
        )
    pool, whole_docs = _pool(prepared_dir, name, train)
    if cfg.max_pool is not None and len(pool) > cfg.max_pool:
        pool = capped_pool(pool, cfg.max_pool)
    where = {text: i for i, text in enumerate(pool)}
    known = _positives(df)
    anchors = list(dict.fromkeys(pos_rows["text_a"].tolist()))
    gold = _labelled_negatives(train, known) if cfg.labelled_negatives else {}
    # Anchors whose gold negatives fill all K never read a ranking: rank only the others (with
    # labelled_negatives = K on a QA dataset, that is no ranking at all).
    ranked = [a for a in anchors if len(gold.get(a, [])[: cfg.labelled_negatives]) < cfg.num_negatives]
    row_of = {anchor: i for i, anchor in enumerate(ranked)}

    excluded: list[set[int]] = []
    for anchor in ranked:
        texts = known[anchor] | {anchor}
        ex = {where[t] for t in texts if t in where}
        if whole_docs:  # a document holds its own body (and title): exclude by containment too
            ex |= {i for i, doc in enumerate(pool) if any(t in doc for t in texts)}
        excluded.append(ex)
    depth = cfg.depth_max + max((len(e) for e in excluded), default=0)

    picks: dict[str, list[list[int]]] = {}
    if ranked and cfg.method in ("bm25", "both"):
        picks["bm25"] = bm25_rankings(ranked, pool, depth)
    if ranked and cfg.method in ("biencoder", "both"):
        assert encoder is not None
        picks["biencoder"] = biencoder_rankings(encoder, ranked, pool, depth, cfg.chunk_size)

    negatives: dict[str, list[str]] = {}
    short = 0
    for anchor in anchors:
        i = row_of.get(anchor)
        windows = (
            []
            if i is None
            else [window(r[i], excluded[i], cfg.depth_min, cfg.depth_max) for r in picks.values()]
        )
        chosen = gold.get(anchor, [])[: cfg.labelled_negatives]
        for j in interleave(*windows):
            if len(chosen) == cfg.num_negatives:
                break
            if pool[j] not in chosen:
                chosen.append(pool[j])
        if len(chosen) < cfg.num_negatives:
            short += 1  # too few candidates: the anchor cannot fill a [K+1] row
            continue
        negatives[anchor] = chosen
    if short:
        log.warning("%s: %d of %d anchors dropped, fewer than %d negatives in the depth window",
                    name, short, len(anchors), cfg.num_negatives)  # fmt: skip
    rows = pos_rows[pos_rows["text_a"].isin(negatives)]
    return pd.DataFrame(
        {
            "dataset": name,
            "task": rows["task"].to_numpy(),
            "anchor": rows["text_a"].to_numpy(),
            "positive": rows["text_b"].to_numpy(),
            "negatives": [negatives[a] for a in rows["text_a"]],
            "method": cfg.method,
        },
        columns=list(NEGATIVE_COLUMNS),
    )


def mine_negatives(
    params: Params, prepared_dir: str | Path, out_path: str | Path, encoder: BiEncoder | None = None
) -> pd.DataFrame:
    """Mine negatives for ``params.labelling.datasets`` and write them to ``out_path`` (parquet)."""
    import pandas as pd

    cfg = params.mining
    prepared_dir = Path(prepared_dir)
    if encoder is None and cfg.method in ("biencoder", "both"):
        student = params.student
        encoder = BiEncoder.load(student.backbone, cfg, params.device, student.gguf_file, student.cpu_bf16)
    frames = []
    for name in params.labelling.datasets:
        mined = mine_dataset(name, load_pairs(prepared_dir, name), prepared_dir, cfg, encoder)
        log.info(
            "%s: %d anchors with %d negatives each (%s)", name, len(mined), cfg.num_negatives, cfg.method
        )
        frames.append(mined)
    out = pd.concat(frames, ignore_index=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    out.to_parquet(tmp, index=False)
    tmp.replace(out_path)
    return out
