"""Fixtures of the data-layer tests: the shipped raw data, a prepared copy, tiny bad datasets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from d2llm_data_helpers import RAW

from d2llm.config import Params

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def raw_dir() -> Path:
    return RAW


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The default sources prepared once for the whole session: (folder, manifest)."""
    from d2llm.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    return out, prepare_data(Params(), RAW, out)
