"""What a pipeline run wrote, in DVC's terms.

The Prefect flow writes the same artefacts as the DVC stages of ``dvc.yaml`` (one library
function per stage, the paths of d2llm.layout). After a run, ``commit_run`` records them as
those stages' outputs (``dvc commit``: hashes into ``dvc.lock``, files into the DVC cache), so
that ``dvc status`` is clean, ``dvc push`` shares exactly the artefacts of the registered model,
and the hashes the flow tags its MLflow run with (``lineage_tags``) describe this run's files,
not the last ``dvc repro``'s.

That is only true when the run *is* what ``dvc.yaml`` describes: run from the project folder
with the params of ``params.yaml`` (no other params file, no overrides). Otherwise nothing is
committed and ``commit_run`` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from d2llm.config import Params, load_params

log = logging.getLogger(__name__)


@dataclass
class Lineage:
    """Hashes of what a run wrote (``{"<stage>:<deps|outs>:<path>": md5}``), or why there are none."""

    hashes: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None


def dvc_hashes(lock_path: Path, stages: Sequence[str] | None = None) -> dict[str, str]:
    """``{"<stage>:<deps|outs>:<path>": md5}`` from a ``dvc.lock`` (only ``stages``, when given);
    empty if there is none."""
    if not lock_path.exists():
        return {}
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    hashes: dict[str, str] = {}
    for stage, entry in (lock.get("stages") or {}).items():
        if stages is not None and stage not in stages:
            continue
        for kind in ("deps", "outs"):
            for item in entry.get(kind) or []:
                digest = item.get("md5") or item.get("hash") or item.get("etag")
                if digest and "path" in item:
                    hashes[f"{stage}:{kind}:{item['path']}"] = str(digest)
    return hashes


def why_not_dvc(params: Params, root: Path) -> str | None:
    """Why a run with ``params`` in ``root`` is not the run ``dvc.yaml`` describes (None: it is)."""
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return f"{root} is not a DVC project (no dvc.yaml or .dvc/)"
    shipped = root / "params.yaml"
    if not shipped.is_file():
        return f"no {shipped}: the DVC stages read their params from it"
    if load_params(shipped) != params:
        return "the run's params are not params.yaml's (another params file or overrides)"
    return None


def commit_run(params: Params, root: Path, stages: Sequence[str]) -> Lineage:
    """``dvc commit`` the outputs of ``stages`` as the flow wrote them, and their hashes."""
    reason = why_not_dvc(params, root)
    if reason is not None:
        log.info("DVC lineage not recorded: %s", reason)
        return Lineage(skipped=reason)
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for name in stages:
            repo.commit(name, force=True)  # force: the deps changed on purpose, this run made the outs
    return Lineage(hashes=dvc_hashes(root / "dvc.lock", stages))
