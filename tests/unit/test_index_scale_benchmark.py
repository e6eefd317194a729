"""Smoke test of benchmarks/index_scale.py on a tiny size: it runs, says its vectors are synthetic,
and its derived numbers follow from the raw ones. No speed is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_index_scale_runs_and_reports(tmp_path):
    from benchmarks import index_scale

    args = ["--params", str(ROOT / "params.yaml"), "--out-dir", str(tmp_path), "--threads", "1"]
    args += ["--sizes", "1500", "--dim", "16", "--clusters", "20", "--queries", "3", "--repeats", "2"]
    args += [
        "-S",
        "search.rerank_depth=20",
        "-S",
        "student.iem.hidden_size=8",
        "-S",
        "student.iem.branch_size=8",
    ]
    returned = index_scale.main(args)
    report = json.loads((tmp_path / "index_scale.json").read_text())
    assert report["sizes"] == returned["sizes"] and "synthetic vectors" in report["data"]
    (size,) = report["sizes"]
    assert size["n"] == 1500 and size["vectors_mib"] == pytest.approx(1500 * 16 * 4 / 2**20)
    for kind in ("exact", "hnsw"):
        assert size[kind]["build_seconds"] > 0 and size[kind]["index_mib"] > 0
    assert 0.0 <= size["hnsw_recall@10"] <= 1.0
    assert set(size["query_ms"]) == set(index_scale.SYSTEMS)
    for name, seconds in size["raw_seconds"].items():
        assert len(seconds) == 2 and min(seconds) > 0
        assert size["query_ms"][name] == pytest.approx(1000 * np.median(seconds) / 3)


def test_index_scale_can_measure_the_exact_first_stage_alone(tmp_path):
    from benchmarks import index_scale

    args = ["--params", str(ROOT / "params.yaml"), "--out-dir", str(tmp_path), "--threads", "1"]
    args += ["--sizes", "800", "--dim", "16", "--clusters", "10", "--queries", "2", "--repeats", "1"]
    args += ["--first-stages", "exact", "-S", "search.rerank_depth=20"]
    args += ["-S", "student.iem.hidden_size=8", "-S", "student.iem.branch_size=8"]
    (size,) = index_scale.main(args)["sizes"]
    assert size["exact"]["build_seconds"] > 0 and "hnsw" not in size
    assert set(size["query_ms"]) == {"exact", "exact+iem", "full-iem"}
    assert size["hnsw_recall@10"] is None


def test_index_scale_rejects_bad_sizes():
    from benchmarks import index_scale

    with pytest.raises(SystemExit, match="--sizes must be >= 1"):
        index_scale.parse_args(["--sizes", "0"])
