"""Training groups, built once, and the plan of a labelling run: which shards still need scores.

A group is B anchors of one dataset (so one task kind) with distinct anchors and distinct
positives. The student trains on exactly these groups (it shuffles their order, not their
content), so the in-batch teacher matrix ``teacher(a_i, b_j)`` stays valid.

Labelling runs in three steps so that any executor can do the middle one: ``plan_labelling``
builds the groups, writes them with the manifest and lists the shards still to score;
executors (d2llm.labelling.executors: this process, Ray actors, a Ray job) score shard ids and
write each shard atomically with ``write_shard``; ``finalise_labelling`` checks every shard and
marks the labels complete. The shard files (d2llm.labelling.shards) are the unit of work and
the checkpoint, so resumption and the output layout do not depend on the executor.
"""

from __future__ import annotations

import hashlib
import logging
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm.errors import ArtifactError, DataError
from d2llm.jsonfile import write_json
from d2llm.labelling.shards import (
    FORMAT_VERSION,
    GROUPS_FILE,
    MANIFEST_FILE,
    SHARD_PATTERN,
    damaged_shards,
    hash_groups,
    prepare_out_dir,
    shard_digests,
    shard_is_valid,
    shard_ranges,
    write_atomic,
)
from d2llm.teachers.dev_report import read_dev_report, teacher_gains

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from d2llm.config import Params

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- groups


def build_groups(
    negatives: pd.DataFrame, group_size: int, seed: int, max_groups_per_dataset: int | None = None
):
    """Groups of ``group_size`` rows of one dataset, distinct anchors and positives within a group.

    Rows are shuffled with a seed derived from ``seed`` and the dataset name, then dealt greedily
    into the first open group that has neither the row's anchor nor its positive. Incomplete
    groups are dropped (a group must hold B anchors for the [B, B] in-batch matrix) and counted
    in ``groups.attrs["dropped_rows"]``.
    """
    import pandas as pd

    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    k_values = {len(n) for n in negatives["negatives"]}
    if len(k_values) > 1:
        raise DataError(f"negative lists have different lengths {sorted(k_values)}; mine them with one K")
    records: list[dict[str, Any]] = []
    dropped = 0
    for dataset in dict.fromkeys(negatives["dataset"]):
        rows = negatives[negatives["dataset"] == dataset]
        tasks = rows["task"].unique().tolist()
        if len(tasks) != 1:
            raise DataError(f"dataset {dataset!r} mixes task kinds {tasks}; a group must hold one kind")
        order = list(range(len(rows)))
        random.Random(seed * 1_000_003 + zlib.crc32(str(dataset).encode())).shuffle(order)
        full, leftover = _deal(rows.iloc[order], group_size)
        if max_groups_per_dataset is not None:
            leftover += (
                (len(full) - max_groups_per_dataset) * group_size if len(full) > max_groups_per_dataset else 0
            )
            full = full[:max_groups_per_dataset]
        dropped += leftover
        for members in full:
            records.append(
                {
                    "task": tasks[0],
                    "dataset": dataset,
                    "anchors": [m[0] for m in members],
                    "positives": [m[1] for m in members],
                    "negatives": [list(m[2]) for m in members],
                }
            )
    groups = pd.DataFrame(records, columns=["task", "dataset", "anchors", "positives", "negatives"])
    groups.insert(0, "group_id", range(len(groups)))
    groups.attrs["dropped_rows"] = dropped
    if dropped:
        log.info(
            "grouping: %d rows left out (incomplete groups of %d or duplicate anchors)", dropped, group_size
        )
    return groups


def _deal(rows: pd.DataFrame, size: int) -> tuple[list[list[tuple[str, str, list[str]]]], int]:
    """Greedy dealing into groups with distinct anchors and positives; full groups in closing order."""
    open_groups: list[tuple[list[tuple[str, str, list[str]]], set[str], set[str]]] = []
    full = []
    for anchor, positive, negs in zip(rows["anchor"], rows["positive"], rows["negatives"], strict=True):
        fits = (i for i, (_, a, p) in enumerate(open_groups) if anchor not in a and positive not in p)
        i = next(fits, None)
        if i is None:
            open_groups.append(([], set(), set()))
            i = len(open_groups) - 1
        members, anchors, positives = open_groups[i]
        members.append((anchor, positive, list(negs)))
        anchors.add(anchor)
        positives.add(positive)
        if len(members) == size:
            full.append(members)
            open_groups.pop(i)
    return full, sum(len(g[0]) for g in open_groups)


def fusion_encoder(params: Params) -> dict[str, Any] | None:
    """The bi-encoder that ``teacher.fusion: biencoder`` mixes into the labels (the student's
    backbone read as a mean-pool bi-encoder, d2llm.biencoder.baseline_encoder), or None."""
    if params.teacher.fusion != "biencoder":
        return None
    st = params.student
    return {
        "backbone": st.backbone,
        "gguf_file": st.gguf_file,
        "max_length": st.max_length,
        "trust_remote_code": st.trust_remote_code,
    }


def teacher_identity(teacher_dir: str | Path) -> str:
    """Hash of every file of the saved teacher (config, weights, tokenizer)."""
    digest = hashlib.sha256()
    root = Path(teacher_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def select_distilled(
    negatives: pd.DataFrame, teacher_dir: str | Path, min_gain: float | None
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The mined rows of the datasets worth distilling, and the decision per dataset with its reason.

    A dataset is distilled only where the fine-tuned teacher beats the plain bi-encoder by at
    least ``min_gain`` points on the *validate* part of that dataset's dev split (the teacher's
    ``dev_report.json``; the select part chose the teacher's epoch and fusion weights).
    ``min_gain: None``, or a teacher that was never fine-tuned (no report), keeps every dataset.
    """
    names = list(dict.fromkeys(negatives["dataset"]))
    report = read_dev_report(teacher_dir)
    if min_gain is None or report is None:
        why = "gating off (labelling.min_teacher_gain: null)" if min_gain is None else "no teacher dev report"
        return negatives, dict.fromkeys(names, f"distilled: {why}")
    gains = teacher_gains(report, min_gain)
    decisions: dict[str, str] = {}
    for name in names:
        g = gains.get(name)
        if g is None:
            decisions[name] = (
                "skipped: the teacher was not measured on its dev split (add it to teacher.finetune.datasets)"
            )
        else:
            verdict = "distilled" if g["distil"] else "skipped"
            decisions[name] = (
                f"{verdict}: teacher {g['teacher']:.2f} vs bi-encoder {g['bi-encoder']:.2f} "
                f"{g['metric']} on the {g['part']} part of its dev split (gain {g['gain']:+.2f}, "
                f"needed {min_gain:+.2f})"
            )
    for name, decision in decisions.items():
        log.info("labelling %s: %s", name, decision)
    kept = [n for n, d in decisions.items() if d.startswith("distilled")]
    if not kept:
        raise DataError(
            "the teacher beats the bi-encoder on no labelling dataset's dev split, so there is nothing worth "
            f"distilling: {decisions}. Improve the teacher, or set labelling.min_teacher_gain: null"
        )
    return negatives[negatives["dataset"].isin(kept)].reset_index(drop=True), decisions


# --------------------------------------------------------------------------- plan / finalise


@dataclass
class LabellingPlan:
    """What ``plan_labelling`` decided: the groups, their shards, and which shards need scoring."""

    out_dir: Path
    manifest: dict[str, Any]  # identity of these labels (``complete`` false)
    groups: pd.DataFrame
    shards: list[range]  # group ids of each shard
    missing: list[int]  # shard ids without a valid file
    summary: dict[str, Any]
    complete: bool = False  # the labels were complete and current before this run
    previous_scoring: dict[str, str] | None = None  # what scored the labels an earlier run began

    def shard_groups(self, shard_id: int) -> pd.DataFrame:
        ids = self.shards[shard_id]
        return self.groups.iloc[ids.start : ids.stop]


def plan_labelling(
    params: Params,
    negatives_path: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
) -> LabellingPlan:
    """Build the groups, write them and the manifest to ``out_dir``, and list the shards to score."""
    import pandas as pd

    cfg = params.labelling
    out_dir = Path(out_dir)
    negatives_path = Path(negatives_path)
    if not negatives_path.is_file():
        raise ArtifactError(f"mined negatives not found at {negatives_path} (run `d2llm mine`)")
    negatives = pd.read_parquet(negatives_path)
    negatives, distilled = select_distilled(negatives, teacher_dir, cfg.min_teacher_gain)
    groups = build_groups(negatives, cfg.group_size, params.seed, cfg.max_groups_per_dataset)
    if groups.empty:
        raise DataError(f"no complete group of {cfg.group_size} anchors could be built from {negatives_path}")
    k1 = len(groups.iloc[0]["negatives"][0]) + 1
    manifest = {
        "format": FORMAT_VERSION,
        "groups_sha256": hash_groups(groups),
        "teacher": teacher_identity(teacher_dir),
        "fusion": params.teacher.fusion,
        "engine": cfg.engine,
        "group_size": cfg.group_size,
        "num_candidates": k1,
        "shard_groups": cfg.shard_groups,
        "num_groups": len(groups),
        "teacher_quantization": cfg.quantization,  # labels of an int8 teacher are other labels
        # With fusion the labels also depend on the bi-encoder mixed in: another backbone or
        # max_length gives other labels (what d2llm.teachers.fusion.FusedScorer.load encodes with).
        "fusion_encoder": fusion_encoder(params),
        "complete": False,
    }
    existing = prepare_out_dir(out_dir, manifest, overwrite)
    shards = shard_ranges(len(groups), cfg.shard_groups)
    summary = {
        "distilled": distilled,
        "groups": len(groups),
        "dropped_rows": groups.attrs.get("dropped_rows", 0),
        "out_dir": str(out_dir),
    }
    damaged = damaged_shards(out_dir, existing) if existing and existing.get("complete") else []
    if existing and existing.get("complete") and not damaged:
        return LabellingPlan(out_dir, manifest, groups, shards, [], summary, complete=True)
    if damaged:
        names = ", ".join(SHARD_PATTERN.format(s) for s in damaged[:5])
        log.warning("label shard(s) %s no longer match their recorded sha256: re-scoring them", names)
        for s in damaged:  # a damaged file is scored again, whatever shard_is_valid makes of it
            (out_dir / SHARD_PATTERN.format(s)).unlink(missing_ok=True)
    previous_scoring = existing.get("scoring") if existing else None
    out_dir.mkdir(parents=True, exist_ok=True)
    # What scored the shards in place stays on record until begin_scoring checks it.
    write_json(
        out_dir / MANIFEST_FILE, {**manifest, **({"scoring": previous_scoring} if previous_scoring else {})}
    )
    tmp = out_dir / (GROUPS_FILE + ".tmp")
    groups.to_parquet(tmp, index=False)
    tmp.replace(out_dir / GROUPS_FILE)
    missing = [
        s
        for s, ids in enumerate(shards)
        if not shard_is_valid(out_dir / SHARD_PATTERN.format(s), ids, cfg.group_size, k1)
    ]
    return LabellingPlan(
        out_dir, manifest, groups, shards, missing, summary, previous_scoring=previous_scoring
    )


# What decides the numbers a scorer writes (its version does not enter: a patch release is no
# other number format). Labels whose shards differ in these would mix two teachers' scales.
NUMBER_FORMAT_KEYS = ("engine", "dtype", "quantization", "fusion_dtype")


def number_format(scoring: dict[str, str]) -> dict[str, str | None]:
    """The part of a scorer's ``scoring_info`` that must agree across the shards of one labels folder."""
    return {key: scoring.get(key) for key in NUMBER_FORMAT_KEYS}


def describe_format(scoring: dict[str, str]) -> str:
    """The number format of ``scoring`` in words, e.g. ``"engine hf, dtype float32"``."""
    return ", ".join(f"{k} {v}" for k, v in number_format(scoring).items() if v is not None)


def begin_scoring(plan: LabellingPlan, scoring: dict[str, str], overwrite: bool = False) -> None:
    """Before scoring ``plan.missing``: check that the shards already in place were scored in the
    same number format as this run will (a run begun on a CPU with bf16 and resumed on one
    without, or with ``$D2LLM_CPU_BF16`` changed, would otherwise mix bf16 and float32 labels),
    then record this run's scoring in the still incomplete manifest, for a run that resumes it.

    On a mismatch: an error that changes nothing, or with ``overwrite`` every shard scored again.
    """
    missing = set(plan.missing)
    reused = [s for s in range(len(plan.shards)) if s not in missing]
    before = plan.previous_scoring
    if reused and before is not None and number_format(before) != number_format(scoring):
        was, now = describe_format(before), describe_format(scoring)
        if not overwrite:
            raise ArtifactError(
                f"{len(reused)} label shard(s) in {plan.out_dir} were scored with {was}; this run would "
                f"score the other {len(plan.missing)} with {now}, and labels must not mix number formats. "
                "Finish them where they were begun (the same kind of machine, $D2LLM_CPU_BF16 as then), "
                "or pass --overwrite to score every shard again here"
            )
        log.warning("label shards were scored with %s, this run scores with %s: scoring all again", was, now)
        for s in reused:
            (plan.out_dir / SHARD_PATTERN.format(s)).unlink(missing_ok=True)
        plan.missing = list(range(len(plan.shards)))
    write_json(plan.out_dir / MANIFEST_FILE, {**plan.manifest, "scoring": scoring})


def write_shard(plan: LabellingPlan, shard_id: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write one scored shard atomically, after checking it holds the shard's groups."""
    ids = plan.shards[shard_id]
    if tensors["group_id"].tolist() != list(ids):
        raise ArtifactError(f"scores for shard {shard_id} hold groups other than {ids.start}..{ids.stop - 1}")
    write_atomic(tensors, plan.out_dir / SHARD_PATTERN.format(shard_id))


def finalise_labelling(
    plan: LabellingPlan, scoring: dict[str, str] | None, run: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Check that every shard is whole and current, mark the labels complete, and summarise.

    ``scoring`` (engine, version, dtype of the scorer) goes into the manifest; None keeps what an
    earlier run recorded (a resumed run that had nothing left to score).
    """
    cfg = plan.manifest
    bad = [
        s
        for s, ids in enumerate(plan.shards)
        if not shard_is_valid(
            plan.out_dir / SHARD_PATTERN.format(s), ids, cfg["group_size"], cfg["num_candidates"]
        )
    ]
    if bad:
        raise ArtifactError(
            f"labelling of {plan.out_dir} is not finished: shards {bad[:10]} are missing or damaged; "
            "run `d2llm label` again to score them"
        )
    if scoring is None:
        scoring = plan.previous_scoring or {"engine": cfg["engine"]}
    complete = {
        **cfg,
        "complete": True,
        "num_shards": len(plan.shards),
        "shard_sha256": shard_digests(plan.out_dir, len(plan.shards)),  # label verifies them on reuse
        "scoring": scoring,
    }
    write_json(plan.out_dir / MANIFEST_FILE, complete)
    scored = len(plan.missing)
    log.info(
        "labelled %d groups in %d shards (%d scored, %d reused)",
        len(plan.groups),
        len(plan.shards),
        scored,
        len(plan.shards) - scored,
    )
    return {
        **plan.summary,
        **(run or {}),
        "shards": len(plan.shards),
        "scored_shards": scored,
        "skipped_shards": len(plan.shards) - scored,
    }
