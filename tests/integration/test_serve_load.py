"""The load benchmark (benchmarks/serve_load.py) against a real ``mlflow models serve``.

A tiny student with a search index is registered in a temporary sqlite store (as in
test_serving.py); the benchmark starts the server itself, on loopback, and always stops it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import save_tiny_student

from d2llm.config import TrackingConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Add type hints to the `predict` method:UserWarning"),
]

WORDS = ["a", "man", "person", "plays", "music", "guitar", "dog", "runs", "park", "what", "is", "water"]
DOCS = {"d1": "a man plays a guitar in the park", "d2": "a dog runs in the park", "d3": "what is water"}


@pytest.fixture
def registered_with_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A tiny student with an index, registered in a temporary store: (model URI, tracking URI)."""
    import mlflow
    import pandas as pd

    from d2llm.search import build_index
    from d2llm.student.model import D2LLMStudent
    from d2llm.tracking import configure, log_student

    monkeypatch.delenv("D2LLM_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(experiment="serve-load-test", registered_model="load-student")
    configure(cfg, root=tmp_path)
    student_dir = save_tiny_student(tmp_path, WORDS, seed=1)
    corpus = pd.DataFrame({"doc_id": list(DOCS), "text": list(DOCS.values())})
    index_dir = tmp_path / "index"
    build_index(D2LLMStudent.from_pretrained(student_dir), corpus, index_dir, model_version="test")
    version = log_student(
        student_dir, index_dir, registered_model_name=cfg.registered_model, search_settings={"mode": "full"}
    )
    tracking_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(None)
    return f"models:/{cfg.registered_model}/{version.version}", tracking_uri


def test_served_model_under_load_never_answers_5xx_and_explains_every_4xx(
    registered_with_index: tuple[str, str], tmp_path: Path
) -> None:
    from benchmarks.serve_load import malformed_requests, measure, oversized_requests
    from d2llm.serving import MAX_ROWS, MAX_TEXT_CHARS

    model_uri, tracking_uri = registered_with_index
    work = tmp_path / "load"
    work.mkdir()
    result = measure(model_uri, tracking_uri, work, requests=40, clients=2, seed=3)

    assert result["requests"] == 40 and result["with_search"]
    assert result["server_errors_5xx"] == 0
    assert result["rule_violations"] == []  # valid: 200; malformed and oversized: 4xx with a message
    counts = result["count_by_kind"]
    assert counts["pairs"] > 0 and counts["search"] > 0
    assert counts["malformed"] >= len(malformed_requests()) and counts["oversized"] >= 2
    assert result["count_by_status_class"] == {
        "2xx": counts["pairs"] + counts["search"],
        "4xx": counts["malformed"] + counts["oversized"],
    }
    # Every way of getting a request wrong was sent, and each answer says what was wrong.
    messages = result["error_messages"]
    labels = [label for label, _ in malformed_requests() + oversized_requests(MAX_ROWS, MAX_TEXT_CHARS)]
    assert sorted(messages) == sorted(labels)
    assert all(m[0] == "4" and len(m) > len("400: ") for m in messages.values()), messages
    assert "'both' is not one of" in messages["unknown task"]
    assert f"the limit is {MAX_ROWS} rows per request" in messages["too many rows"]
    assert f"the limit is {MAX_TEXT_CHARS} characters per text" in messages["text too long"]
    assert result["latency"]["p50_ms"] > 0 and result["latency"]["p99_ms"] >= result["latency"]["p50_ms"]
    assert result["rss_mib"]["after_warmup"] > 0 and len(result["rss_mib"]["after_each_round"]) == 4
