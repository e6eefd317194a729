"""The files of a labels folder: groups, score shards and the manifest; ``load_labels`` reads them.

Layout of ``out_dir`` (docs/architecture.md, "Training groups"):
- ``groups.parquet``: ``group_id, task, dataset, anchors, positives, negatives``;
- ``scores-00000.safetensors`` ...: per shard of ``labelling.shard_groups`` groups,
  ``group_id [G]``, ``in_batch [G, B, B, 2]``, ``hard [G, B, K+1, 2]`` (column 0: the positive),
  ``feature_cos [G, B, K+1, K+1]``;
- ``labels.json``: the manifest (hash of the groups, teacher identity, the bi-encoder the fusion
  mixes in, scoring engine, layout, ``complete``; once complete also ``num_shards``,
  ``shard_sha256`` (one per shard) and ``scoring``: engine, version, dtype).

Each shard is written to a temporary file and renamed, so a shard file is either whole or
absent. This module knows the files only: what a labelling run plans and scores is
``d2llm.labelling.plan`` and ``d2llm.labelling.executors``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm.errors import ArtifactError

if TYPE_CHECKING:
    import pandas as pd
    import torch

log = logging.getLogger(__name__)

GROUPS_FILE = "groups.parquet"
MANIFEST_FILE = "labels.json"
SHARD_PATTERN = "scores-{:05d}.safetensors"
FORMAT_VERSION = 1
# Manifest keys added after labels were first written, with the value older labels had.
_LEGACY_DEFAULTS = {"engine": "hf", "teacher_quantization": "none"}


def hash_groups(groups: pd.DataFrame) -> str:
    """sha256 of the groups' content (the manifest's ``groups_sha256``)."""
    records = groups[["group_id", "task", "dataset", "anchors", "positives", "negatives"]].to_dict("records")
    text = json.dumps(
        records,
        default=lambda x: x.tolist() if hasattr(x, "tolist") else list(x),
        ensure_ascii=False,
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def shard_ranges(n_groups: int, shard_groups: int) -> list[range]:
    """The group ids of each shard: consecutive runs of ``shard_groups`` groups."""
    return [range(s, min(s + shard_groups, n_groups)) for s in range(0, n_groups, shard_groups)]


def shard_is_valid(path: Path, ids: range, b: int, k1: int) -> bool:
    """Whether the shard file at ``path`` is whole and holds groups ``ids`` with these shapes."""
    from safetensors.torch import load_file

    if not path.is_file():
        return False
    try:
        t = load_file(str(path))
    except Exception as err:  # a foreign or damaged file: score the shard again
        log.warning("shard %s unreadable (%s); rescoring it", path.name, err)
        return False
    g = len(ids)
    expected = {
        "group_id": (g,),
        "in_batch": (g, b, b, 2),
        "hard": (g, b, k1, 2),
        "feature_cos": (g, b, k1, k1),
    }
    if set(t) != set(expected) or any(tuple(t[k].shape) != s for k, s in expected.items()):
        return False
    return t["group_id"].tolist() == list(ids)


def write_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` to ``path`` through a temporary file and a rename: whole or absent."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def prepare_out_dir(out_dir: Path, manifest: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The existing manifest when ``out_dir`` holds this same labelling; clears or refuses otherwise."""
    existing_file = out_dir / MANIFEST_FILE
    existing = json.loads(existing_file.read_text(encoding="utf-8")) if existing_file.is_file() else None
    # Manifests written before the engine was recorded were all made by transformers ("hf").
    same = existing is not None and all(
        existing.get(k, _LEGACY_DEFAULTS.get(k)) == v for k, v in manifest.items() if k != "complete"
    )
    if same:
        return existing
    has_content = out_dir.is_dir() and any(out_dir.iterdir())
    if has_content and not overwrite:
        why = "its groups, teacher or layout differ" if existing else f"it has no {MANIFEST_FILE}"
        raise ArtifactError(
            f"labels directory {out_dir} holds other labels ({why}); pass overwrite=True (--overwrite) "
            "to replace them, or choose another --out-dir"
        )
    if has_content:
        shutil.rmtree(out_dir)
    return None


@dataclass
class Labels:
    groups: pd.DataFrame
    group_id: torch.Tensor  # [N]
    in_batch: torch.Tensor  # [N, B, B, 2]
    hard: torch.Tensor  # [N, B, K+1, 2]
    feature_cos: torch.Tensor  # [N, B, K+1, K+1]


def shard_digests(out_dir: Path, n_shards: int) -> list[str]:
    """sha256 of each shard file (the complete manifest's ``shard_sha256``)."""
    from d2llm.fingerprint import file_sha256

    return [file_sha256(out_dir / SHARD_PATTERN.format(s)) for s in range(n_shards)]


def damaged_shards(out_dir: Path, manifest: dict[str, Any]) -> list[int]:
    """Shards of a complete labelling whose file is missing or no longer has its recorded sha256
    (truncated, overwritten, bit rot). Manifests written before hashes were recorded: none."""
    from d2llm.fingerprint import file_sha256

    recorded = manifest.get("shard_sha256")
    if recorded is None:
        return []
    paths = [out_dir / SHARD_PATTERN.format(s) for s in range(len(recorded))]
    return [s for s, path in enumerate(paths) if not path.is_file() or file_sha256(path) != recorded[s]]


def read_groups(out_dir: str | Path) -> pd.DataFrame:
    """The groups of a complete labelling, checked against their manifest, without the score
    shards (``load_labels`` reads those): what a report of the labelled data needs."""
    return _complete_manifest_and_groups(Path(out_dir))[1]


def _complete_manifest_and_groups(out_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """The manifest of a complete labelling and its groups, checked against it."""
    import pandas as pd

    manifest_file = out_dir / MANIFEST_FILE
    if not manifest_file.is_file():
        raise ArtifactError(f"{out_dir} holds no labels ({MANIFEST_FILE} missing; run `d2llm label`)")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if not manifest.get("complete"):
        raise ArtifactError(f"labels in {out_dir} are incomplete: rerun `d2llm label` to finish them")
    groups = pd.read_parquet(out_dir / GROUPS_FILE)
    if hash_groups(groups) != manifest["groups_sha256"]:
        raise ArtifactError(f"{out_dir / GROUPS_FILE} does not match its manifest (edited after labelling?)")
    return manifest, groups


def load_labels(out_dir: str | Path) -> Labels:
    """Groups and the stacked teacher tensors of a complete labelling, row i = group_id i.

    A shard whose file does not match the sha256 its manifest recorded is an ArtifactError that
    names it and the command that re-scores it (`d2llm label`), never a raw reader error.
    """
    import torch
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    manifest, groups = _complete_manifest_and_groups(out_dir)
    bad = damaged_shards(out_dir, manifest)
    if bad:
        names = ", ".join(SHARD_PATTERN.format(s) for s in bad[:5])
        raise ArtifactError(
            f"label shard(s) {names} in {out_dir} are corrupt or missing (not the sha256 their manifest "
            "recorded): run `d2llm label` to re-score them (the other shards are kept)"
        )
    parts = []
    for s in range(manifest["num_shards"]):
        path = out_dir / SHARD_PATTERN.format(s)
        try:
            parts.append(load_file(str(path)))
        except Exception as err:  # no recorded hash (older labels): still name the file
            raise ArtifactError(
                f"label shard {path} is unreadable ({err}): run `d2llm label` to re-score it"
            ) from None
    stacked = {k: torch.cat([p[k] for p in parts]) for k in ("group_id", "in_batch", "hard", "feature_cos")}
    if stacked["group_id"].tolist() != groups["group_id"].tolist():
        raise ArtifactError(f"score shards in {out_dir} do not cover groups 0..{len(groups) - 1} in order")
    return Labels(groups, **stacked)
