"""Hard-negative mining: exclusion of positives, depth window, interleaving, chunked search."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from d2llm.config import params_from_dict
from d2llm.errors import DataError
from d2llm.mining import BiEncoder, bm25_rankings, chunked_topk, interleave, mine_negatives, window

torch.set_num_threads(1)

ANCHORS = {
    "a man plays a guitar in the park": "a man plays the guitar",
    "a woman cooks food in the kitchen": "a woman is cooking food",
    "a dog runs on the grass": "a dog is running on grass",
    "the child reads a book": "a child is reading",
}
FILLER = [
    "a man sits in the park",
    "a cat sleeps on the mat",
    "a bird sings",
    "a horse runs in the field",
    "a woman walks in the kitchen",
    "the child plays with a ball",
    "a red car on the street",
    "people eat food at the table",
    "a dog sits on the grass",
    "a book on the table",
    "a man rides a bike in the park",
]


def _write_pairs(prepared, name="toy", positives=True):
    rows = [(a, b, "train", positives) for a, b in ANCHORS.items()]
    # A second known positive of the first anchor, on dev: must be excluded all the same.
    rows.append(("a man plays a guitar in the park", "a man plays music in the park", "dev", positives))
    rows += [(f"the question {i}", text, "train", False) for i, text in enumerate(FILLER)]
    rows.append(("a man plays music in the park", "x", "train", False))  # the dev positive is in the pool
    df = pd.DataFrame(rows, columns=["text_a", "text_b", "split", "is_positive"])
    df["label"], df["label_name"], df["task"], df["source"] = 0.0, "entailment", "sym", "toy"
    # the pool: text_b of train rows, plus the dev positive as text_b of a train row
    df.loc[len(df)] = ["z", "a man plays music in the park", "train", False, 0.0, "neutral", "sym", "toy"]
    (prepared / "pairs").mkdir(parents=True, exist_ok=True)
    df.to_parquet(prepared / "pairs" / f"{name}.parquet")


def _params(method, **mining):
    cfg = {"method": method, "num_negatives": 2, "depth_min": 0, "depth_max": 4, **mining}
    return params_from_dict({"device": "cpu", "mining": cfg, "labelling": {"datasets": ["toy"]}})


def test_window_and_interleave_by_hand():
    assert window([5, 1, 9, 2, 7, 3], excluded={1, 2}, depth_min=1, depth_max=3) == [9, 7]
    assert interleave([1, 2, 3], [2, 4], [5]) == [1, 2, 5, 4, 3]


def test_bm25_ranks_lexical_overlap_first_and_drops_zero_scores():
    corpus = ["red car street", "a man plays guitar", "guitar music", "blue sky"]
    assert bm25_rankings(["man guitar"], corpus, k=4) == [[1, 2]]


def test_bm25_mining_keeps_the_bm25s_debug_narration_out_of_the_logs():
    import logging

    import bm25s  # noqa: F401  (imported: bm25s set its logger to DEBUG then)

    logging.getLogger("bm25s").setLevel(logging.DEBUG)  # as a first import leaves it
    bm25_rankings(["a dog"], ["a dog runs", "a cat sleeps"], 1)
    assert logging.getLogger("bm25s").level == logging.WARNING


def test_chunked_topk_equals_full_sort_with_ties():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(7, 8, generator=gen)
    c = torch.randn(23, 8, generator=gen)
    c[10] = c[3]  # an exact tie across chunks: the earlier row must win in both
    full = torch.sort(q @ c.T, dim=1, descending=True, stable=True).indices[:, :6]
    for chunk in (1, 4, 5, 23, 100):
        assert torch.equal(chunked_topk(q, c, k=6, chunk_size=chunk, query_batch=3), full)


@pytest.mark.parametrize("method", ["bm25", "biencoder", "both"])
def test_mined_negatives_exclude_every_known_positive_and_the_anchor(method, tiny_bert_dir, tmp_path):
    _write_pairs(tmp_path)
    params = _params(method)
    encoder = BiEncoder.load(str(tiny_bert_dir), params.mining, "cpu") if method != "bm25" else None
    out = mine_negatives(params, tmp_path, tmp_path / "neg.parquet", encoder=encoder)
    assert list(out.columns) == ["dataset", "task", "anchor", "positive", "negatives", "method"]
    assert sorted(out["anchor"]) == sorted(ANCHORS)
    assert (out["method"] == method).all() and (out["task"] == "sym").all()
    for row in out.itertuples():
        assert len(row.negatives) == 2 and len(set(row.negatives)) == 2
        assert row.positive not in row.negatives and row.anchor not in row.negatives
        if row.anchor.startswith("a man plays"):
            assert "a man plays music in the park" not in row.negatives
    assert (
        pd.read_parquet(tmp_path / "neg.parquet")["negatives"].map(list).tolist() == out["negatives"].tolist()
    )


def test_biencoder_mining_is_the_same_chunked_and_unchunked(tiny_bert_dir, tmp_path):
    _write_pairs(tmp_path)
    small, large = _params("biencoder", chunk_size=2), _params("biencoder", chunk_size=10_000)
    encoder = BiEncoder.load(str(tiny_bert_dir), small.mining, "cpu")
    a = mine_negatives(small, tmp_path, tmp_path / "a.parquet", encoder=encoder)
    b = mine_negatives(large, tmp_path, tmp_path / "b.parquet", encoder=encoder)
    assert a["negatives"].tolist() == b["negatives"].tolist()


def test_depth_min_skips_the_top_ranks(tmp_path):
    _write_pairs(tmp_path)
    top = mine_negatives(_params("bm25"), tmp_path, tmp_path / "a.parquet")
    skipped = mine_negatives(_params("bm25", depth_min=1, depth_max=5), tmp_path, tmp_path / "b.parquet")
    top_by_anchor = dict(zip(top["anchor"], top["negatives"], strict=True))
    common = [
        (a, n) for a, n in zip(skipped["anchor"], skipped["negatives"], strict=True) if a in top_by_anchor
    ]
    assert common
    for anchor, negs in common:
        assert negs[0] == top_by_anchor[anchor][1]


def test_dataset_without_positives_is_a_data_error(tmp_path):
    _write_pairs(tmp_path, positives=False)
    with pytest.raises(DataError, match="dataset 'toy' has no positive train pairs"):
        mine_negatives(_params("bm25"), tmp_path, tmp_path / "neg.parquet")


def test_labelled_negatives_come_first_then_mined_ones_fill_k(tmp_path):
    _write_pairs(tmp_path)
    df = pd.read_parquet(tmp_path / "pairs" / "toy.parquet")
    anchor = "a dog runs on the grass"
    gold = [  # two gold negatives of one anchor, one of them also a dev-split row (never used)
        (anchor, "a dog sleeps in the house", "train", False),
        (anchor, "a cat runs on the grass", "train", False),
        (anchor, "a dog flies", "dev", False),
        (anchor, "a dog is running on grass", "train", False),  # its positive labelled 0: never a negative
    ]
    extra = pd.DataFrame(gold, columns=["text_a", "text_b", "split", "is_positive"])
    extra["label"], extra["label_name"], extra["task"], extra["source"] = 0.0, "neutral", "sym", "toy"
    pd.concat([df, extra], ignore_index=True).to_parquet(tmp_path / "pairs" / "toy.parquet")

    params = _params("bm25", num_negatives=3, depth_max=6, labelled_negatives=2)
    out = mine_negatives(params, tmp_path, tmp_path / "neg.parquet").set_index("anchor")
    negatives = list(out.loc[anchor, "negatives"])
    assert negatives[:2] == ["a dog sleeps in the house", "a cat runs on the grass"]
    assert len(negatives) == 3 and negatives[2] not in {"a dog flies", "a dog is running on grass", anchor}
    # The paper's default (0) mines every negative: the gold ones are not forced in front.
    plain = mine_negatives(_params("bm25", num_negatives=3, depth_max=6), tmp_path, tmp_path / "n2.parquet")
    assert list(plain.set_index("anchor").loc[anchor, "negatives"]) != negatives


def test_labelled_negatives_cannot_exceed_k():
    with pytest.raises(ValueError, match="labelled_negatives"):
        _params("bm25", num_negatives=2, labelled_negatives=3)


def test_anchors_filled_by_gold_negatives_are_never_ranked(tmp_path):
    """With labelled_negatives = K, an answer-selection dataset (every question has K wrong
    candidates) needs no ranking at all: no bi-encoder is even loaded."""
    from d2llm.mining import mine_dataset

    rows = []
    for q in range(4):
        rows.append((f"question {q} ?", f"the right answer {q}", "train", True))
        rows += [(f"question {q} ?", f"wrong answer {q}-{j}", "train", False) for j in range(3)]
    df = pd.DataFrame(rows, columns=["text_a", "text_b", "split", "is_positive"])
    df["label"], df["task"], df["source"] = df["is_positive"].astype(float), "asym", "qa"
    df["label_name"] = df["is_positive"].map({True: "yes", False: "no"})
    cfg = _params("both", num_negatives=2, labelled_negatives=2).mining
    mined = mine_dataset("qa", df, tmp_path, cfg, encoder=None)  # "both" would need the encoder
    assert len(mined) == 4
    assert all(all(n.startswith("wrong answer") for n in negs) for negs in mined["negatives"])


def test_capped_pool_is_a_fixed_subset_in_pool_order():
    from d2llm.mining import capped_pool

    pool = [f"candidate sentence {i}" for i in range(100)]
    kept = capped_pool(pool, 10)
    assert len(kept) == 10 and kept == [t for t in pool if t in set(kept)]  # pool order
    assert capped_pool(list(reversed(pool)), 10) == list(reversed(kept))  # chosen by text, not position
