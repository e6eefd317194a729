"""Scheduled retraining for real: a local Prefect server, a process work pool, a worker, on loopback.

The test runs the commands of docs/orchestration.md ("Schedules") against a clone of the tiny
project: it starts ``prefect server start`` on a free port of 127.0.0.1, creates the ``gpu``
concurrency limit and the ``d2llm-process`` pool, deploys ``prefect.yaml`` with ``prefect deploy
--all``, reads the weekly cron schedule back from the API, starts a worker, triggers a run of
``d2llm-training/weekly-retraining`` and waits for it to complete. The run must leave a trained
student in the project and a registered MLflow version holding the ``champion`` alias.

Server and worker run in their own process groups and are killed, with every process they started,
in a ``finally``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.deploy import WEEKLY

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = "d2llm-training/weekly-retraining"
SERVER_START_TIMEOUT = 90.0
RUN_TIMEOUT = 300.0
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(base: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body``) one Prefect REST endpoint and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{base}{path}",
        data=data,
        headers={"Content-Type": "application/json"},
        method="GET" if data is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read().decode() or "null")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), however far down and whatever its session."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _signal_groups(groups: set[int], sig: signal.Signals) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)


def _kill_tree(proc: subprocess.Popen[Any]) -> None:
    """Stop a process started with ``start_new_session`` and everything it spawned.

    Its own process group is not enough: Prefect starts each flow run in a new session, so a run
    still going when the test gives up would outlive the worker. Those groups are killed too.
    """
    groups = {proc.pid}
    for pid in _descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    _signal_groups(groups, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    _signal_groups(groups, signal.SIGKILL)  # whatever ignored SIGTERM or was already orphaned
    proc.wait(timeout=15)


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.exists() else "(no log)"


@contextlib.contextmanager
def _background(
    args: list[str], cwd: Path, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[Any]]:
    """Run ``args`` in its own session with output to ``log``; kill its process group on exit."""
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            _kill_tree(proc)


def _wait_healthy(api: str, server: subprocess.Popen[Any], log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited with {server.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError, ValueError):
            if _api(api, "/health") is True:
                return
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT:.0f} s:\n{_tail(log)}")


def _wait_for_run(api: str, run_id: str, worker: subprocess.Popen[Any], log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + RUN_TIMEOUT
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = _api(api, f"/flow_runs/{run_id}")
        if run["state_type"] in TERMINAL:
            return run
        if worker.poll() is not None:
            pytest.fail(f"the process running the deployment exited with {worker.returncode}:\n{_tail(log)}")
        time.sleep(2)
    pytest.fail(f"flow run {run_id} still {run.get('state_type')} after {RUN_TIMEOUT:.0f} s:\n{_tail(log)}")


def _champion(root: Path) -> tuple[list[str], dict[str, str]]:
    """The registered versions and aliases in the project's own MLflow store (read-only)."""
    from mlflow import MlflowClient

    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    uri = params["tracking"]["tracking_uri"]
    assert uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"), uri
    uri = f"sqlite:///{root / uri.removeprefix('sqlite:///')}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = params["tracking"]["registered_model"]
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = client.get_registered_model(name).aliases if versions else {}
    return versions, {alias: str(version) for alias, version in aliases.items()}


def _next_weekly_run(now: datetime.datetime) -> datetime.datetime:
    """Hand-worked next firing of ``0 3 * * 1`` (Mondays 03:00 UTC) strictly after ``now``."""
    candidate = now.replace(hour=3, minute=0, second=0, microsecond=0)
    candidate += datetime.timedelta(days=(0 - candidate.weekday()) % 7)
    return candidate if candidate > now else candidate + datetime.timedelta(days=7)


def _scheduled_runs(api: str, deployment_id: str) -> list[datetime.datetime]:
    """Expected start times of the deployment's SCHEDULED flow runs that lie in the future."""
    runs = _api(
        api,
        "/flow_runs/filter",
        {
            "flow_runs": {
                "deployment_id": {"any_": [deployment_id]},
                "state": {"type": {"any_": ["SCHEDULED"]}},
            }
        },
    )
    now = datetime.datetime.now(datetime.UTC)
    times = (datetime.datetime.fromisoformat(run["expected_start_time"]) for run in runs)
    return sorted(t for t in times if t > now + datetime.timedelta(minutes=1))


def _wait_for_deployment(api: str, name: str, proc: subprocess.Popen[Any], log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the serving process exited with {proc.returncode}:\n{_tail(log)}")
        try:
            return _api(api, f"/deployments/name/{name}")
        except urllib.error.HTTPError as err:
            if err.code != 404:
                raise
        time.sleep(1)
    pytest.fail(f"deployment {name} never appeared:\n{_tail(log)}")


def _trigger(prefect: Any) -> str:
    """`prefect deployment run` (what the docs show); returns the new flow run's id."""
    out = prefect("deployment", "run", DEPLOYMENT)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, f"no flow-run id in:\n{out}"
    return match.group(1)


def _assert_trained_and_champion(root: Path) -> None:
    assert (root / "models" / "student" / "student.json").is_file()
    assert (root / "reports" / "metrics.json").is_file()
    versions, aliases = _champion(root)
    assert versions == ["1"]
    assert aliases["champion"] == "1"  # the first model ever is promoted


@dataclass
class LocalPrefect:
    """A running ``prefect server`` on loopback, and the environment its clients use."""

    root: Path
    api: str
    env: dict[str, str]
    logs: Path

    def prefect(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run(
            ["prefect", *args], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, (
            f"`prefect {' '.join(args)}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout


@pytest.fixture
def local_prefect(tiny_project, tmp_path: Path) -> Iterator[LocalPrefect]:
    """A clone of the tiny project laid out like a checkout, served by its own Prefect server."""
    project = tiny_project.clone(tmp_path / "project")
    root = project.root
    # A real checkout has flows/ and prefect.yaml next to params.yaml; the tiny project has neither.
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "prefect.yaml", root / "prefect.yaml")

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        key: value
        for key, value in project.env.items()
        if not key.startswith("PREFECT_")  # nothing from the caller's Prefect profile or test harness
    }
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",  # no UI: it is not needed, and building it slows the start
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",  # upcoming runs appear within seconds
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_RUNNER_POLL_FREQUENCY="2",
        MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK="true",
    )
    server_cmd = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "server.log"
    with _background(server_cmd, root, env, log) as server:
        _wait_healthy(api, server, log)
        yield LocalPrefect(root=root, api=api, env={**env, "PREFECT_API_URL": api}, logs=tmp_path)


@pytest.mark.slow
def test_prefect_yaml_deployment_runs_on_a_worker(local_prefect: LocalPrefect) -> None:
    """The "With a local Prefect server and a worker" recipe of docs/orchestration.md."""
    lp, root = local_prefect, local_prefect.root
    lp.env["D2LLM_ROOT"] = str(root)
    lp.prefect("gcl", "create", "gpu", "--limit", "1")
    lp.prefect("work-pool", "create", "d2llm-process", "--type", "process")
    lp.prefect("--no-prompt", "deploy", "--all")

    deployment = _api(lp.api, f"/deployments/name/{DEPLOYMENT}")
    assert deployment["work_pool_name"] == "d2llm-process"
    assert deployment["entrypoint"] == "flows/pipeline.py:training_pipeline"
    assert deployment["parameters"] == {"params_file": "params.yaml", "promote": True}
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert [s["schedule"] for s in deployment["schedules"] if s["active"]] == [
        {"cron": WEEKLY, "timezone": "UTC", "day_or": True}
    ]
    # D2LLM_ROOT is resolved at deploy time: the worker's flow process starts in the project.
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}
    ]
    promote = _api(lp.api, "/deployments/name/d2llm-promotion/promote-latest")
    assert promote["schedules"] == [] and promote["work_pool_name"] == "d2llm-process"
    limits = _api(lp.api, "/v2/concurrency_limits/filter", {})
    # (A deployment's own concurrency_limit is kept as a limit named after the deployment.)
    assert {g["name"]: (g["limit"], g["active"]) for g in limits}["gpu"] == (1, True)

    # The server's scheduler has put the next Monday 03:00 UTC on the calendar.
    expected = _next_weekly_run(datetime.datetime.now(datetime.UTC))
    deadline = time.monotonic() + 60
    while not (upcoming := _scheduled_runs(lp.api, deployment["id"])) and time.monotonic() < deadline:
        time.sleep(2)
    assert upcoming and upcoming[0] == expected

    run_id = _trigger(lp.prefect)
    worker_cmd = ["prefect", "worker", "start", "--pool", "d2llm-process", "--limit", "1"]
    worker_log = lp.logs / "worker.log"
    # Started outside the project on purpose: the deployment's pull step takes the run there.
    with _background(worker_cmd, lp.logs, lp.env, worker_log) as worker:
        run = _wait_for_run(lp.api, run_id, worker, worker_log)
    assert run["state_type"] == "COMPLETED", f"flow run ended {run['state_name']}:\n{_tail(worker_log)}"
    assert run["deployment_id"] == deployment["id"]
    _assert_trained_and_champion(root)


@pytest.mark.slow
def test_flows_deploy_serves_the_schedule_and_runs_it(local_prefect: LocalPrefect) -> None:
    """The ``python -m flows.deploy`` recipe: the serving process holds the schedule and runs it."""
    lp, root = local_prefect, local_prefect.root
    serve_cmd = [sys.executable, "-m", "flows.deploy", "--cron", "0 2 * * 0", "--timezone", "Europe/Paris"]
    serve_log = lp.logs / "serve.log"
    with _background(serve_cmd, root, lp.env, serve_log) as serving:
        deployment = _wait_for_deployment(lp.api, DEPLOYMENT, serving, serve_log)
        assert [s["schedule"] for s in deployment["schedules"] if s["active"]] == [
            {"cron": "0 2 * * 0", "timezone": "Europe/Paris", "day_or": True}
        ]
        assert deployment["parameters"] == {"params_file": "params.yaml", "promote": True}
        assert deployment["global_concurrency_limit"]["limit"] == 1
        run = _wait_for_run(lp.api, _trigger(lp.prefect), serving, serve_log)
    assert run["state_type"] == "COMPLETED", f"flow run ended {run['state_name']}:\n{_tail(serve_log)}"
    _assert_trained_and_champion(root)


# --------------------------------------------------------------------------- fast checks of flows/deploy.py


def test_build_deployment_carries_the_schedule_and_parameters() -> None:
    from flows.deploy import build_deployment

    deployment = build_deployment("0 2 * * 0", "Europe/Paris", params_file="configs/x.yaml")
    assert deployment.name == "weekly-retraining" and deployment.flow_name == "d2llm-training"
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * 0", "Europe/Paris")
    assert deployment.parameters == {"params_file": "configs/x.yaml", "promote": True}
    assert build_deployment().schedules[0].schedule.cron == WEEKLY == "0 3 * * 1"


@pytest.mark.parametrize(
    ("cron", "timezone", "message"),
    [
        ("every monday", "UTC", "bad cron schedule 'every monday'"),
        (WEEKLY, "Mars/Olympus", "unknown schedule timezone"),
    ],
)
def test_build_deployment_rejects_a_bad_schedule(cron: str, timezone: str, message: str) -> None:
    from d2llm.errors import ConfigError
    from flows.deploy import build_deployment

    with pytest.raises(ConfigError, match=re.escape(message)):
        build_deployment(cron, timezone)


def test_serving_without_a_server_is_refused(tmp_path: Path) -> None:
    # Prefect's temporary server runs no scheduler: a schedule served on it would never fire.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run(
        [sys.executable, "-m", "flows.deploy"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "PREFECT_API_URL is not set" in done.stderr and "prefect server start" in done.stderr
