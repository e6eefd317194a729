"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

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
