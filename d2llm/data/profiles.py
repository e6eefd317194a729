"""What each built-in dataset looks like when prepared from the catalogued files: one table.

Validation (d2llm.data.validation) turns a profile into Great Expectations rules: rows per
split, the share of positives per split, and the mean and longest length of each text column.
A parser that silently drops rows, mis-maps a label, swaps two columns or merges records then
fails validation with the observed value, instead of training on the wrong data.

The counts are those of each source's SOURCE.md after prepare's drops (docs/data.md), measured
on the shipped files; ROWS_TOLERANCE and the text tolerances apply to all of them alike. A split
carved by a hash (SNLI, the TREC-QA questions, SelQA, Twitter URL) is given as the rows of the
file it comes from, the config fraction that goes to dev and how far the realised share may be
from it (a few large question groups move it), so a changed fraction moves the expected counts
with it. Positive shares are plausible ranges around the measured ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from d2llm.config import DataConfig

ROWS_TOLERANCE = 0.01  # a split's rows may differ this much (relative) from the measured count
MEAN_CHARS_TOLERANCE = 0.15  # the mean text length, relative
MAX_CHARS_HEADROOM = 1.5  # the longest text may be this many times the measured longest


@dataclass(frozen=True)
class HashSplit:
    """Rows of one file split into train and dev by a hash; ``fraction`` names the config field."""

    rows: int
    fraction: str  # DataConfig field: the share that goes to dev
    spread: float  # how far the realised dev share may be from that fraction


@dataclass(frozen=True)
class PairProfile:
    """Measured facts of a built-in pair dataset (default config)."""

    rows: dict[str, int]  # split -> rows, for splits that are whole files
    positives: dict[str, tuple[float, float]]  # split -> inclusive range of the share of is_positive
    chars: dict[str, tuple[float, int]]  # text column -> (mean length, longest), in characters
    hashed: HashSplit | None = None  # train and dev carved from one file by a hash

    def split_rows(self, cfg: DataConfig) -> dict[str, tuple[int, int]]:
        """split -> inclusive range of its rows under ``cfg`` (its dev fractions)."""
        out = {split: _about(n) for split, n in self.rows.items()}
        if self.hashed is not None:
            total, share = self.hashed.rows, float(getattr(cfg, self.hashed.fraction))
            dev_lo = max(1, math.floor(total * (share - self.hashed.spread)))
            dev_hi = min(total - 1, math.ceil(total * (share + self.hashed.spread)))
            out["dev"] = (dev_lo, dev_hi)
            out["train"] = (total - dev_hi, total - dev_lo)
        return dict(sorted(out.items()))

    def total_rows(self) -> tuple[int, int]:
        return _about(sum(self.rows.values()) + (self.hashed.rows if self.hashed else 0))

    def mean_chars(self, column: str) -> tuple[float, float]:
        mean = self.chars[column][0]
        return round(mean * (1 - MEAN_CHARS_TOLERANCE), 1), round(mean * (1 + MEAN_CHARS_TOLERANCE), 1)

    def max_chars(self, column: str) -> int:
        return math.ceil(self.chars[column][1] * MAX_CHARS_HEADROOM)


@dataclass(frozen=True)
class IRProfile:
    """Rows of each table of a built-in IR collection."""

    rows: dict[str, int] = field(default_factory=dict)  # corpus / queries / qrels -> rows

    def table_rows(self, table: str) -> tuple[int, int]:
        return _about(self.rows[table])


def _about(n: int) -> tuple[int, int]:
    return math.floor(n * (1 - ROWS_TOLERANCE)), math.ceil(n * (1 + ROWS_TOLERANCE))


_STS_LIKE = {"text_a": (58.3, 367), "text_b": (58.0, 311)}
_SICK = {"text_a": (46.7, 151), "text_b": (45.8, 151)}

# dataset -> profile; counts per split after prepare's drops (docs/data.md, each SOURCE.md).
PAIR_PROFILES: dict[str, PairProfile] = {
    # STS-B: 5 749 train - 17 also in test
    "stsb_en": PairProfile(
        rows={"train": 5732, "dev": 1500, "test": 1379},
        positives={"train": (0.20, 0.29), "dev": (0.13, 0.22), "test": (0.20, 0.29)},
        chars=_STS_LIKE,
    ),
    # SICK: 4 500 train - 93 also in test; trial = dev
    "sick": PairProfile(
        rows={"train": 4407, "dev": 500, "test": 4927},
        positives={"train": (0.25, 0.33), "dev": (0.23, 0.34), "test": (0.25, 0.33)},
        chars=_SICK,
    ),
    "sick_r": PairProfile(
        rows={"train": 4407, "dev": 500, "test": 4927},
        positives={"train": (0.33, 0.41), "dev": (0.34, 0.46), "test": (0.33, 0.41)},
        chars=_SICK,
    ),
    # SNLI dev file: 10 000 - 158 without gold label, split by pairID
    "snli": PairProfile(
        rows={},
        positives={"train": (0.30, 0.38), "dev": (0.28, 0.40)},
        chars={"text_a": (72.3, 300), "text_b": (37.9, 232)},
        hashed=HashSplit(rows=9842, fraction="snli_dev_fraction", spread=0.02),
    ),
    # TREC-QA: train.csv (4 718 pairs, 93 questions) split by question; dev.csv = test
    "trecqa": PairProfile(
        rows={"test": 1148},
        positives={"train": (0.03, 0.13), "dev": (0.03, 0.13), "test": (0.17, 0.22)},
        chars={"text_a": (57.1, 175), "text_b": (135.6, 267)},
        hashed=HashSplit(rows=4718, fraction="trecqa_dev_fraction", spread=0.15),
    ),
    # TREC-QA TRAIN-ALL: 53 428 pairs - 14 whose sentence is in the held-out test; 1 229 questions
    "trecqa_train_all": PairProfile(
        rows={},
        positives={"train": (0.09, 0.15), "dev": (0.09, 0.15)},
        chars={"text_a": (41.9, 175), "text_b": (156.9, 1547)},
        hashed=HashSplit(rows=53414, fraction="trecqa_dev_fraction", spread=0.06),
    ),
    "wikiqa": PairProfile(
        rows={"train": 20360, "dev": 2733},
        positives={"train": (0.035, 0.07), "dev": (0.035, 0.07)},
        chars={"text_a": (36.9, 120), "text_b": (135.8, 1075)},
    ),
    # SelQA dev file: 9 419 candidates - 42 empty, split by section (680 sections)
    "selqa": PairProfile(
        rows={},
        positives={"train": (0.07, 0.13), "dev": (0.07, 0.13)},
        chars={"text_a": (54.7, 201), "text_b": (132.0, 1088)},
        hashed=HashSplit(rows=9377, fraction="selqa_dev_fraction", spread=0.08),
    ),
    "rte": PairProfile(
        rows={"train": 2490, "dev": 277},
        positives={"train": (0.45, 0.56), "dev": (0.45, 0.60)},
        chars={"text_a": (265.3, 1392), "text_b": (53.5, 230)},
    ),
    # MSRP: train 3 576 - 148, val 476 = 500 - 24 (rows with a sentence in STS-B test)
    "msrp": PairProfile(
        rows={"train": 3428, "dev": 476},
        positives={"train": (0.64, 0.73), "dev": (0.64, 0.76)},
        chars={"text_a": (116.2, 225), "text_b": (116.0, 210)},
    ),
    # Twitter URL train: 42 200 pairs, 3 553 first sentences, split by first sentence
    "twitter_url": PairProfile(
        rows={},
        positives={"train": (0.22, 0.31), "dev": (0.20, 0.33)},
        chars={"text_a": (77.1, 125), "text_b": (87.1, 608)},
        hashed=HashSplit(rows=42200, fraction="twitter_url_dev_fraction", spread=0.03),
    ),
    "stsb_zh": PairProfile(
        rows={"train": 5210, "dev": 1458, "test": 1361},
        positives={"train": (0.20, 0.29), "dev": (0.13, 0.22), "test": (0.20, 0.29)},
        chars={"text_a": (20.0, 113), "text_b": (20.1, 127)},
    ),
    # OCNLI: train.10k - 15 and dev - 50 without gold label
    "ocnli": PairProfile(
        rows={"train": 9985, "dev": 2950},
        positives={"train": (0.29, 0.37), "dev": (0.28, 0.37)},
        chars={"text_a": (24.0, 50), "text_b": (11.2, 55)},
    ),
    "atec": PairProfile(
        rows={"dev": 20000, "test": 20000},
        positives={"dev": (0.16, 0.21), "test": (0.16, 0.21)},
        chars={"text_a": (13.4, 97), "text_b": (13.4, 88)},
    ),
    # <ir>_titles: documents with a title and a body (title -> body, all positive)
    "cranfield_titles": PairProfile(
        rows={"train": 1398},
        positives={"train": (1.0, 1.0)},
        chars={"text_a": (79.8, 249), "text_b": (942.3, 4057)},
    ),
    "cisi_titles": PairProfile(
        rows={"train": 1460},
        positives={"train": (1.0, 1.0)},
        chars={"text_a": (56.2, 198), "text_b": (774.7, 3800)},
    ),
    "cacm_titles": PairProfile(
        rows={"train": 1586},
        positives={"train": (1.0, 1.0)},
        chars={"text_a": (54.4, 155), "text_b": (608.6, 2463)},
    ),
}

IR_PROFILES: dict[str, IRProfile] = {
    # Cranfield: 1 400 documents - 2 empty; 1 837 qrels - 1 on an empty document
    "cranfield": IRProfile(rows={"corpus": 1398, "queries": 225, "qrels": 1836}),
    "cisi": IRProfile(rows={"corpus": 1460, "queries": 111, "qrels": 3114}),
    # CACM: 3 204 documents (2856 repaired), 64 queries, 796 relevant pairs for 52 of them
    "cacm": IRProfile(rows={"corpus": 3204, "queries": 64, "qrels": 796}),
}
