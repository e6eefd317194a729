"""Helpers shared by the data-layer tests (a uniquely named module: tests/ has no packages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from d2llm.config import Params, params_from_dict

REPO = Path(__file__).resolve().parents[2]
RAW = REPO / "data" / "raw"


def custom_params(tmp_path: Path, datasets: list[dict[str, Any]], **data: Any) -> Params:
    """Params with no built-in sources and the given ``data.custom`` entries (paths under tmp_path)."""
    for ds in datasets:
        ds["files"] = {split: str(tmp_path / name) for split, name in ds["files"].items()}
    return params_from_dict({"data": {"sources": [], "custom": datasets, **data}})


def write_params(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to prove a failed step changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
