"""JSON files written whole or not at all.

Reports, manifests and summaries go to a temporary file beside their target, which then replaces
the target in one rename (atomic on one filesystem): a crash or a full disk mid-write leaves the
previous version intact, never half a file that the next stage, DVC or a reader would choke on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_json(
    path: str | Path,
    data: Any,
    *,
    indent: int = 2,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
    ensure_ascii: bool = True,
) -> Path:
    """Write ``data`` as JSON (ending in a newline) to ``path``, creating its folder; atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=default, ensure_ascii=ensure_ascii)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
