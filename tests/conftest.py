"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster (2 CPUs, dashboard for the job API) for the whole session (tests/ray_cluster.py)."""
    from ray_cluster import start_ray_cluster

    with start_ray_cluster() as context:
        yield context
