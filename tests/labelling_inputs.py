"""Inputs of the Ray labelling tests (executor and job): toy mined negatives and a saved teacher."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

WORDS = ["man", "woman", "child", "dog", "cat", "bird", "horse", "car", "guitar", "ball", "book", "food"]


def toy_negatives(n: int, k: int = 2) -> pd.DataFrame:
    """``n`` mined rows of the dataset ``toy`` (distinct anchors and positives, ``k`` negatives each)."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        negs = [f"a {WORDS[(i + j + 1) % len(WORDS)]} sits on the mat" for j in range(k)]
        rows.append(("toy", "sym", f"a {w} plays in the park {i}", f"the {w} is playing {i}", negs, "both"))
    return pd.DataFrame(rows, columns=["dataset", "task", "anchor", "positive", "negatives", "method"])


def save_labelling_inputs(root: Path, tiny_bert_dir: Path, n: int) -> tuple[Path, Path]:
    """``(negatives parquet, teacher folder)`` under ``root``: ``n`` toy rows, a tiny-BERT teacher."""
    from d2llm.config import TeacherConfig
    from d2llm.teachers.factory import load_teacher

    cfg = TeacherConfig(kind="cross_encoder", model=str(tiny_bert_dir), max_length=32, batch_size=4)
    load_teacher(cfg, None, "cpu").save_pretrained(root / "teacher")
    toy_negatives(n).to_parquet(root / "neg.parquet")
    return root / "neg.parquet", root / "teacher"
