"""The load benchmark's request mix and summary (benchmarks/serve_load.py), without a server."""

from __future__ import annotations

import json

import pytest

from benchmarks.serve_load import (
    Answer,
    build_requests,
    error_message,
    malformed_requests,
    oversized_requests,
    percentiles,
    rule_broken,
    summarise,
)


def test_the_mix_holds_every_bad_variant_and_is_seeded() -> None:
    requests = build_requests(40, with_search=True, seed=1, max_rows=4, max_chars=50)
    assert len(requests) == 40
    labels = {r.label for r in requests if r.kind in ("malformed", "oversized")}
    assert labels == {label for label, _ in malformed_requests() + oversized_requests(4, 50)}
    assert {r.kind for r in requests} == {"pairs", "search", "malformed", "oversized"}
    assert [r.body for r in build_requests(40, True, 1, 4, 50)] == [r.body for r in requests]
    assert all(r.kind != "search" for r in build_requests(40, False, 1, 4, 50))
    too_many = dict(oversized_requests(4, 50))["too many rows"]
    assert len(json.loads(too_many)["dataframe_split"]["data"]) == 5
    too_long = json.loads(dict(oversized_requests(4, 50))["text too long"])["dataframe_split"]["data"]
    assert len(too_long[0][0]) == 51
    for request in requests:
        if request.kind in ("pairs", "search"):
            rows = json.loads(request.body)["dataframe_split"]["data"]
            assert 1 <= len(rows) <= 8


def test_percentiles_are_nearest_rank_in_milliseconds() -> None:
    p = percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert (p["p50_ms"], p["p95_ms"], p["p99_ms"], p["max_ms"]) == pytest.approx((50, 95, 99, 100))
    assert percentiles([])["p50_ms"] is None


def test_rules_and_summary() -> None:
    answers = [
        Answer("pairs", "2 pairs", 200, 0.01, ""),
        Answer("search", "k=3", 500, 0.02, "boom"),
        Answer("malformed", "bad JSON", 400, 0.001, "Invalid JSON"),
        Answer("malformed", "unknown task", 400, 0.001, ""),
        Answer("oversized", "too many rows", 200, 0.03, ""),
        Answer("pairs", "1 pairs", 0, 60.0, "TimeoutError: timed out"),
    ]
    why = [rule_broken(a) for a in answers]
    assert why[0] is None and why[2] is None
    assert "answered 500" in why[1] and "without a message" in why[3] and "not 4xx" in why[4]
    assert "answered 0" in why[5]
    summary = summarise(answers, wall_s=2.0)
    assert summary["count_by_status_class"] == {"2xx": 2, "4xx": 2, "5xx": 1, "no answer": 1}
    assert summary["server_errors_5xx"] == 1 and len(summary["rule_violations"]) == 4
    assert summary["requests_per_second"] == 3.0


def test_error_message_keeps_what_follows_the_servers_data_echo() -> None:
    wrapped = {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": "Failed to predict data '...'. \nError: too big",
    }
    assert error_message(json.dumps(wrapped)) == "too big"
    assert error_message(json.dumps({"message": "Invalid JSON input"})) == "Invalid JSON input"
    assert error_message("<html>oops</html>") == ""
