"""One local Ray cluster per test session, shared by the labelling, job and flow tests.

Real Ray (``ray.init``) with 2 CPUs, its dashboard on a free loopback port (the job API needs
it), token authentication off (a loopback test cluster; Ray would otherwise write a token to
``~/.ray/auth_token``), session folders in a short temporary folder (Ray's socket paths must stay
under 107 characters) that is removed afterwards. Starting it takes about 10 s; the fixture
``ray_cluster`` in tests/conftest.py wraps ``start_ray_cluster``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def start_ray_cluster(num_cpus: int = 2) -> Iterator[Any]:
    """``ray.init`` a local cluster for the block; yields Ray's context (address, dashboard URL)."""
    import ray

    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp_dir = tempfile.mkdtemp(prefix="d2ray-", dir="/tmp")
    try:
        context = ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=_free_port(),
            _temp_dir=temp_dir,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}},
        )
        yield context
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = before
