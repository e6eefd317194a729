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
    for kind in ("exact", "hnsw", "ivf"):
        build = size[kind]
        assert build["build_seconds"] > 0 and build["index_mib"] > 0
        assert build["add_seconds"] == pytest.approx(build["build_seconds"] - build["train_seconds"])
        assert len(build["load_average_before"]) == 3
    assert size["ivf"]["nlist"] == 1500 // 39 and size["exact"]["nlist"] is None  # 4*sqrt(N), clamped
    recall = size["recall@10"]
    assert set(recall) == {"hnsw", "ivf"} and all(0.0 <= r <= 1.0 for r in recall.values())
    assert set(size["query_ms"]) == set(index_scale.SYSTEMS)
    # The sweep reports each nprobe asked for, and at the configured nprobe the recall of the index.
    sweep = {row["nprobe"]: row for row in size["ivf_nprobe_sweep"]}
    assert set(sweep) == {1, 2, 4, 8, 16, 32, 64} and all(row["ms"] > 0 for row in sweep.values())
    assert sweep[64]["lists_scanned"] == 38 and sweep[8]["lists_scanned"] == 8  # nprobe > nlist scans all
    assert sweep[report["ivf"]["nprobe"]]["recall@10"] == size["recall@10"]["ivf"]
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
    assert size["exact"]["build_seconds"] > 0 and "hnsw" not in size and "ivf" not in size
    assert set(size["query_ms"]) == {"exact", "exact+iem", "full-iem"}
    assert size["recall@10"] == {} and size["ivf_nprobe_sweep"] == []


def test_index_scale_without_exact_has_no_recall_and_can_leave_out_the_full_iem(tmp_path):
    from benchmarks import index_scale

    args = ["--params", str(ROOT / "params.yaml"), "--out-dir", str(tmp_path), "--threads", "1"]
    args += ["--sizes", "800", "--dim", "16", "--clusters", "10", "--queries", "2", "--repeats", "1"]
    args += ["--first-stages", "ivf", "--no-full-iem", "-S", "search.rerank_depth=20"]
    args += ["-S", "student.iem.hidden_size=8", "-S", "student.iem.branch_size=8"]
    (size,) = index_scale.main(args)["sizes"]
    assert set(size["query_ms"]) == {"ivf", "ivf+iem"}
    assert size["recall@10"] == {"ivf": None} and size["ivf_nprobe_sweep"] == []


def test_index_scale_rejects_bad_sizes():
    from benchmarks import index_scale

    with pytest.raises(SystemExit, match="--sizes must be >= 1"):
        index_scale.parse_args(["--sizes", "0"])
    with pytest.raises(SystemExit, match="--ivf-nprobes must be >= 1"):
        index_scale.parse_args(["--ivf-nprobes", "8", "0"])
    with pytest.raises(SystemExit, match="--recall-queries must be >= 1"):
        index_scale.parse_args(["--recall-queries", "0"])


def test_recall_at_10_ignores_missing_hits():
    from benchmarks.index_scale import recall_at_10

    exact = np.arange(20).reshape(2, 10)
    found = np.array([[*range(5), *[-1] * 5], list(range(10, 20))])
    assert recall_at_10(found, exact) == pytest.approx((0.5 + 1.0) / 2)
