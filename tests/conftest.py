"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray reads this when it is imported: on a loaded 2-core machine its dashboard (the job API) can
# take longer than the default 60 s to come up.
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "240")
# Likewise a worker process may take longer than the default 60 s to register with its raylet.
os.environ.setdefault("RAY_worker_register_timeout_seconds", "300")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster (2 CPUs, dashboard for the job API) for the session (tests/ray_cluster.py)."""
    from ray_cluster import start_ray_cluster

    with start_ray_cluster() as context:
        yield context


@pytest.fixture(scope="session", autouse=True)
def raw_data_in_place() -> Path:
    """Every catalogued source in data/raw, verified: what `make test` fetches first, done here too
    so that a bare `pytest` works (a no-op that only hashes the files when they are there)."""
    from d2llm.data.catalog import load_catalog
    from d2llm.data.fetch import fetch_data, mirror_places

    catalog = load_catalog(REPO / "data" / "raw" / "catalog.yaml")
    raw = REPO / "data" / "raw"
    fetch_data(catalog, catalog.sources, raw, mirror_places(root=REPO), progress=False, record=False)
    return raw


@pytest.fixture
def cpu_bf16_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 on the CPU whatever this CPU has (``$D2LLM_CPU_BF16=on``): the tests of the bf16 path
    check that it really rounds, which a CPU without bf16 arithmetic would run in float32."""
    monkeypatch.setenv("D2LLM_CPU_BF16", "on")
