"""Helpers shared by the data-layer tests (a uniquely named module: tests/ has no packages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from d2llm.config import Params, params_from_dict

REPO = Path(__file__).resolve().parents[2]
RAW = REPO / "data" / "raw"
CATALOG = RAW / "catalog.yaml"


def catalog_for(raw: Path, source: str, path: Path) -> Path:
    """A copy of the data catalogue at ``path`` whose ``source`` entry vouches for the files now in
    ``raw/<folder>``: for tests that feed a parser made-up files through ``prepare``."""
    import hashlib

    raw_catalog = yaml.safe_load(CATALOG.read_text(encoding="utf-8"))
    entry = raw_catalog["sources"][source]
    folder = raw / entry["folder"]
    entry["files"] = [
        {
            "path": p.relative_to(folder).as_posix(),
            "size": p.stat().st_size,
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            "url": f"https://example.invalid/{p.name}",
        }
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    path.write_text(yaml.safe_dump(raw_catalog, sort_keys=False), encoding="utf-8")
    return path


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
