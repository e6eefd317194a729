"""Two pipeline runs in one working copy: the second refuses (or waits), with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from d2llm.cli import main
from d2llm.errors import PipelineLockedError
from d2llm.lock import LOCK_FILE, pipeline_lock

ROOT = Path(__file__).resolve().parents[2]

# A second process that takes the lock, says so, and holds it for argv[2] seconds.
HOLDER = """
import sys, time
from d2llm.lock import pipeline_lock
with pipeline_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@contextmanager
def held_by_another_process(root: Path, seconds: float = 60.0) -> Iterator[subprocess.Popen[str]]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_second_run_refuses_naming_the_run_that_holds_the_lock(tmp_path: Path) -> None:
    with held_by_another_process(tmp_path) as holder:
        started = time.monotonic()
        with (
            pytest.raises(PipelineLockedError, match=f"pid {holder.pid} ") as refused,
            pipeline_lock(tmp_path),
        ):
            pytest.fail("the lock was taken twice")
        assert time.monotonic() - started < 5  # refuses at once, no wait asked for
    assert str(tmp_path / LOCK_FILE) in str(refused.value)
    assert "--wait" in str(refused.value)


def test_a_second_run_with_a_wait_runs_once_the_first_has_finished(tmp_path: Path) -> None:
    with held_by_another_process(tmp_path, seconds=1.5):
        started = time.monotonic()
        with pipeline_lock(tmp_path, wait=60) as path:
            assert time.monotonic() - started >= 1.0  # it waited for the holder's 1.5 s
            assert f"pid {os.getpid()} " in path.read_text(encoding="utf-8")


def test_a_wait_that_runs_out_refuses(tmp_path: Path) -> None:
    with held_by_another_process(tmp_path):
        started = time.monotonic()
        with (
            pytest.raises(PipelineLockedError, match=r"after waiting 0\.5 s"),
            pipeline_lock(tmp_path, wait=0.5),
        ):
            pytest.fail("the lock was taken twice")
        assert 0.5 <= time.monotonic() - started < 10


def test_a_killed_run_leaves_no_stale_lock(tmp_path: Path) -> None:
    with held_by_another_process(tmp_path) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        with pipeline_lock(tmp_path):
            pass


def test_the_lock_is_free_again_after_a_run(tmp_path: Path) -> None:
    with pipeline_lock(tmp_path):
        pass
    with pipeline_lock(tmp_path):
        pass


def test_a_cli_pipeline_step_refuses_while_another_run_holds_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with held_by_another_process(tmp_path) as holder:
        code = main(["--params", str(ROOT / "params.yaml"), "prepare", "--raw-dir", str(ROOT / "data/raw")])
    assert code == 1
    assert (
        f"another d2llm pipeline run is using this working copy (pid {holder.pid} " in capsys.readouterr().err
    )
    assert not (tmp_path / "data").exists()  # nothing was prepared
