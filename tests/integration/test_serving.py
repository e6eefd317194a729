"""``mlflow models serve`` on the registered champion: real HTTP requests, real scoring server.

The server runs as a subprocess in its own process group against a temporary sqlite store; the
group is always killed, also when the test fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tiny_models import save_tiny_student

from benchmarks.serve_load import stop_server
from d2llm.config import PromotionConfig, TrackingConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Add type hints to the `predict` method:UserWarning"),
]

WORDS = [
    "a",
    "man",
    "person",
    "plays",
    "music",
    "guitar",
    "dog",
    "runs",
    "park",
    "what",
    "is",
    "water",
    "boils",
]
PAIRS = [["a man plays a guitar", "a person plays music", "sym"], ["what is water", "water boils", "asym"]]
STARTUP_TIMEOUT_S = 90


def _tiny_student(folder: Path) -> Path:
    """A random 2-layer, 32-d BERT backbone and a D2LLM student on it, saved with save_pretrained."""
    return save_tiny_student(folder, WORDS, seed=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, payload: dict | None = None) -> tuple[int, str]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _wait_until_healthy(url: str, server: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(
                f"mlflow models serve exited with {server.returncode}:\n{log_file.read_text()[-3000:]}"
            )
        try:
            if _request(f"{url}/ping")[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{log_file.read_text()[-3000:]}")


@pytest.fixture
def served_champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Register a tiny student, make it champion and serve ``models:/NAME@champion``.

    Yields (url, student dir).
    """
    import mlflow

    from d2llm.tracking import configure, log_student, promote

    monkeypatch.delenv("D2LLM_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(experiment="serve-test", registered_model="served-student")
    configure(cfg, root=tmp_path)
    student_dir = _tiny_student(tmp_path)
    version = log_student(student_dir, registered_model_name=cfg.registered_model)
    assert promote(
        mlflow.MlflowClient(), cfg.registered_model, version.version, {"mean_main": 1.0}, PromotionConfig()
    )
    tracking_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(None)

    port = _free_port()
    log_file = tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # The server execs `uvicorn` from PATH: the virtualenv's bin, as with an activated venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{cfg.registered_model}@champion",
    ]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with log_file.open("w") as log:
        server = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_healthy(url, server, log_file)
        yield url, student_dir
    finally:
        stop_server(server)


def test_served_champion_scores_pairs_and_rejects_malformed_requests(served_champion):
    from d2llm.student.model import D2LLMStudent

    url, student_dir = served_champion
    columns = ["text_a", "text_b", "task"]
    status, body = _request(f"{url}/invocations", {"dataframe_split": {"columns": columns, "data": PAIRS}})
    assert status == 200, body
    scores = [row["score"] for row in json.loads(body)["predictions"]]
    student = D2LLMStudent.from_pretrained(student_dir)
    expected = [float(student.score([(a, b)], task)[0]) for a, b, task in PAIRS]
    assert scores == pytest.approx(expected, abs=1e-5)

    malformed = [
        ({"columns": ["text_a", "text_b"], "data": [["a man", "a dog"]]}, "missing inputs"),
        ({"columns": columns, "data": [["a man", "a dog", "both"]]}, "'both' is not one of"),
        ({"columns": columns, "data": [["a man", "", "sym"]]}, "text is empty"),
        ({"columns": columns, "data": [[5, "a dog", "sym"]]}, "text_a"),
    ]
    for split, message in malformed:
        status, body = _request(f"{url}/invocations", {"dataframe_split": split})
        assert 400 <= status < 500, (split, status, body)
        assert message in json.loads(body)["message"], body


# --------------------------------------------------------------------------- `make serve`

REPO = Path(__file__).resolve().parents[2]
DOCS = {
    "d1": "a man plays a guitar in the park",
    "d2": "a dog runs in the park",
    "d3": "what is water",
}


@pytest.fixture
def served_by_make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Register a tiny student with a search index as ``d2llm-student@champion`` in a temporary
    store and start it with the documented command only: ``make serve`` from the repository
    root, port and store given as environment variables, PATH without the virtualenv.

    Yields (url, student dir, index dir).
    """
    import mlflow
    import pandas as pd

    from d2llm.search import build_index
    from d2llm.student.model import D2LLMStudent
    from d2llm.tracking import configure, log_student, promote

    monkeypatch.delenv("D2LLM_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(experiment="make-serve-test")  # registered_model: d2llm-student
    configure(cfg, root=tmp_path)
    student_dir = _tiny_student(tmp_path)
    corpus = pd.DataFrame({"doc_id": list(DOCS), "text": list(DOCS.values())})
    index_dir = tmp_path / "index"
    build_index(D2LLMStudent.from_pretrained(student_dir), corpus, index_dir, model_version="test")
    version = log_student(
        student_dir, index_dir, registered_model_name=cfg.registered_model, search_settings={"mode": "full"}
    )
    assert promote(
        mlflow.MlflowClient(), cfg.registered_model, version.version, {"mean_main": 1.0}, PromotionConfig()
    )
    tracking_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(None)

    port = _free_port()
    log_file = tmp_path / "server.log"
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri, "SERVE_PORT": str(port)}
    env.pop("VIRTUAL_ENV", None)
    with log_file.open("w") as log:
        server = subprocess.Popen(
            ["make", "serve"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_healthy(url, server, log_file)
        yield url, student_dir, index_dir
    finally:
        stop_server(server)


def test_make_serve_answers_search_requests(served_by_make):
    from d2llm.search import load_index, search
    from d2llm.student.model import D2LLMStudent

    url, student_dir, index_dir = served_by_make
    payload = {"dataframe_split": {"columns": ["query", "k"], "data": [["a man plays music", 2]]}}
    status, body = _request(f"{url}/invocations", payload)
    assert status == 200, body
    rows = json.loads(body)["predictions"]
    student = D2LLMStudent.from_pretrained(student_dir)
    expected = search(student, load_index(index_dir, student), "a man plays music", k=2, mode="full")
    assert [(r["rank"], r["doc_id"]) for r in rows] == [(1, expected[0].doc_id), (2, expected[1].doc_id)]
    assert [r["score"] for r in rows] == pytest.approx([h.score for h in expected], abs=1e-5)
