"""Training groups, built once, and the teacher's scores of them, written in resumable shards.

A group is B anchors of one dataset (so one task kind) with distinct anchors and distinct
positives. The student trains on exactly these groups (it shuffles their order, not their
content), so the in-batch teacher matrix ``teacher(a_i, b_j)`` stays valid.

Layout of ``out_dir`` (docs/architecture.md, "Training groups"):
- ``groups.parquet``: ``group_id, task, dataset, anchors, positives, negatives``;
- ``scores-00000.safetensors`` ...: per shard of ``labelling.shard_groups`` groups,
  ``group_id [G]``, ``in_batch [G, B, B, 2]``, ``hard [G, B, K+1, 2]`` (column 0: the positive),
  ``feature_cos [G, B, K+1, K+1]``;
- ``labels.json``: the manifest (hash of the groups, teacher identity, scoring engine, layout,
  ``complete``; once complete also ``num_shards`` and ``scoring``: engine, version, dtype).

Each shard is written to a temporary file and renamed, so a shard file is either whole or
absent. A rerun skips shards that exist and validate (group ids, shapes) and scores the rest;
shards depend only on their own groups, so an interrupted and resumed run gives the same
tensors as one uninterrupted run, whichever executor (this process, Ray actors) scored them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from d2llm.errors import ArtifactError, ConfigError, DataError
from d2llm.jsonfile import write_json

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from d2llm.config import Params
    from d2llm.teachers.base import Teacher
    from d2llm.teachers.fusion import Fused

log = logging.getLogger(__name__)

GROUPS_FILE = "groups.parquet"
MANIFEST_FILE = "labels.json"
SHARD_PATTERN = "scores-{:05d}.safetensors"
FORMAT_VERSION = 1
# Manifest keys added after labels were first written, with the value older labels had.
_LEGACY_DEFAULTS = {"engine": "hf", "teacher_quantization": "none"}


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


# --------------------------------------------------------------------------- scoring


def score_groups(
    teacher: Teacher, groups: pd.DataFrame, fusion: Fused | None = None
) -> dict[str, torch.Tensor]:
    """Teacher tensors of ``groups`` (all of one shard), each distinct pair scored once per dataset.

    Pairs needing features (each anchor with its positive and negatives) are scored with
    features; the off-diagonal in-batch pairs without. The in-batch diagonal is the hard
    column 0: the same pair, scored once. With ``fusion`` the logits are the teacher's fused
    with the bi-encoder's cosine (d2llm.teachers.fusion); the features stay the teacher's.
    """
    import torch

    g_count = len(groups)
    b = len(groups.iloc[0]["anchors"])
    k1 = len(groups.iloc[0]["negatives"][0]) + 1
    in_batch = torch.empty((g_count, b, b, 2))
    hard = torch.empty((g_count, b, k1, 2))
    feature_cos = torch.empty((g_count, b, k1, k1))
    for task, dataset in dict.fromkeys(zip(groups["task"], groups["dataset"], strict=True)):
        rows = [(gi, r) for gi, r in enumerate(groups.itertuples()) if (r.task, r.dataset) == (task, dataset)]
        hard_pairs: dict[tuple[str, str], int] = {}
        cross_pairs: dict[tuple[str, str], int] = {}
        for _, r in rows:
            for i, a in enumerate(r.anchors):
                for c in [r.positives[i], *r.negatives[i]]:
                    hard_pairs.setdefault((a, c), len(hard_pairs))
        for _, r in rows:
            for a in r.anchors:
                for p in r.positives:
                    if (a, p) not in hard_pairs:
                        cross_pairs.setdefault((a, p), len(cross_pairs))
        with_feats = teacher.score(list(hard_pairs), task, with_features=True)
        plain = teacher.score(list(cross_pairs), task)
        hard_logits, cross_logits = with_feats.logits, plain.logits
        if fusion is not None:
            hard_logits = fusion.logits(list(hard_pairs), hard_logits, dataset, task)
            cross_logits = fusion.logits(list(cross_pairs), cross_logits, dataset, task)
        feats = torch.nn.functional.normalize(with_feats.features.float(), dim=-1)  # type: ignore[union-attr]
        for gi, r in rows:
            for i, a in enumerate(r.anchors):
                idx = [hard_pairs[(a, c)] for c in [r.positives[i], *r.negatives[i]]]
                hard[gi, i] = hard_logits[idx]
                f = feats[idx]
                feature_cos[gi, i] = f @ f.T
                for j, p in enumerate(r.positives):
                    key = (a, p)
                    in_batch[gi, i, j] = (
                        hard_logits[hard_pairs[key]] if key in hard_pairs else cross_logits[cross_pairs[key]]
                    )
    group_id = torch.tensor(groups["group_id"].tolist(), dtype=torch.long)
    return {"group_id": group_id, "in_batch": in_batch, "hard": hard, "feature_cos": feature_cos}


# --------------------------------------------------------------------------- files


def _hash_groups(groups: pd.DataFrame) -> str:
    records = groups[["group_id", "task", "dataset", "anchors", "positives", "negatives"]].to_dict("records")
    text = json.dumps(
        records,
        default=lambda x: x.tolist() if hasattr(x, "tolist") else list(x),
        ensure_ascii=False,
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


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


def _shard_ranges(n_groups: int, shard_groups: int) -> list[range]:
    return [range(s, min(s + shard_groups, n_groups)) for s in range(0, n_groups, shard_groups)]


def _shard_is_valid(path: Path, ids: range, b: int, k1: int) -> bool:
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


def _write_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def _prepare_out_dir(out_dir: Path, manifest: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
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


def select_distilled(
    negatives: pd.DataFrame, teacher_dir: str | Path, min_gain: float | None
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The mined rows of the datasets worth distilling, and the decision per dataset with its reason.

    A dataset is distilled only where the fine-tuned teacher beats the plain bi-encoder by at
    least ``min_gain`` points on that dataset's dev split (the teacher's ``dev_report.json``).
    ``min_gain: None``, or a teacher that was never fine-tuned (no report), keeps every dataset.
    """
    from d2llm.teachers.finetune import read_dev_report, teacher_gains

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
                f"dev {g['metric']} (gain {g['gain']:+.2f}, needed {min_gain:+.2f})"
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


# --------------------------------------------------------------------------- plan / score / finalise
#
# Labelling runs in three steps so that any executor can do the middle one: ``plan_labelling``
# builds the groups, writes them with the manifest and lists the shards still to score;
# executors score shard ids (``ShardScorer`` in this process, d2llm.labelling_ray on Ray actors)
# and write each shard atomically with ``write_shard``; ``finalise_labelling`` checks every shard
# and marks the labels complete. The shard files are the unit of work and the checkpoint, so
# resumption and the output layout do not depend on the executor.


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
        "groups_sha256": _hash_groups(groups),
        "teacher": teacher_identity(teacher_dir),
        "fusion": params.teacher.fusion,
        "engine": cfg.engine,
        "group_size": cfg.group_size,
        "num_candidates": k1,
        "shard_groups": cfg.shard_groups,
        "num_groups": len(groups),
        "teacher_quantization": cfg.quantization,  # labels of an int8 teacher are other labels
        "complete": False,
    }
    existing = _prepare_out_dir(out_dir, manifest, overwrite)
    shards = _shard_ranges(len(groups), cfg.shard_groups)
    summary = {
        "distilled": distilled,
        "groups": len(groups),
        "dropped_rows": groups.attrs.get("dropped_rows", 0),
        "out_dir": str(out_dir),
    }
    if existing and existing.get("complete"):
        return LabellingPlan(out_dir, manifest, groups, shards, [], summary, complete=True)
    previous_scoring = existing.get("scoring") if existing else None
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / MANIFEST_FILE, manifest)
    tmp = out_dir / (GROUPS_FILE + ".tmp")
    groups.to_parquet(tmp, index=False)
    tmp.replace(out_dir / GROUPS_FILE)
    missing = [
        s
        for s, ids in enumerate(shards)
        if not _shard_is_valid(out_dir / SHARD_PATTERN.format(s), ids, cfg.group_size, k1)
    ]
    return LabellingPlan(
        out_dir, manifest, groups, shards, missing, summary, previous_scoring=previous_scoring
    )


def load_scoring_teacher(params: Params, teacher_dir: str | Path) -> Teacher:
    """The saved teacher on the configured engine: transformers ("hf") or vLLM (GPU, own environment)."""
    if params.labelling.engine == "vllm":
        if params.labelling.quantization != "none":
            raise ConfigError(
                "labelling.quantization: int8 quantises the transformers teacher on the CPU; "
                "it does not apply to labelling.engine: vllm (set one of them back)"
            )
        from d2llm.teachers.vllm_engine import load_vllm_teacher

        return load_vllm_teacher(params, teacher_dir)
    from d2llm.teachers.base import load_teacher

    return load_teacher(params.teacher, teacher_dir, params.device).quantize(params.labelling.quantization)


class ShardScorer:
    """The teacher (and fusion), loaded once, scoring whole shards: the work of one executor worker."""

    def __init__(self, params: Params, teacher_dir: str | Path, teacher: Teacher | None = None) -> None:
        from d2llm.teachers.fusion import load_fused

        self.teacher = teacher if teacher is not None else load_scoring_teacher(params, teacher_dir)
        self.fused = load_fused(params, teacher_dir)

    def score(self, groups: pd.DataFrame) -> dict[str, torch.Tensor]:
        return score_groups(self.teacher, groups, self.fused)

    def scoring_info(self) -> dict[str, str]:
        """Engine, its version and the dtype it computes in, for the manifest."""
        return self.teacher.scoring_info()


def write_shard(plan: LabellingPlan, shard_id: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write one scored shard atomically, after checking it holds the shard's groups."""
    ids = plan.shards[shard_id]
    if tensors["group_id"].tolist() != list(ids):
        raise ArtifactError(f"scores for shard {shard_id} hold groups other than {ids.start}..{ids.stop - 1}")
    _write_atomic(tensors, plan.out_dir / SHARD_PATTERN.format(shard_id))


def score_locally(plan: LabellingPlan, scorer: ShardScorer) -> dict[str, Any]:
    """The local executor: score the missing shards one after the other in this process."""
    for s in tqdm(plan.missing, desc="labelling shards", leave=False):
        write_shard(plan, s, scorer.score(plan.shard_groups(s)))
    return {"executor": "local", "workers": 1}


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
        if not _shard_is_valid(
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
    complete = {**cfg, "complete": True, "num_shards": len(plan.shards), "scoring": scoring}
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


def label_groups(
    params: Params,
    negatives_path: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    teacher: Teacher | None = None,
) -> dict[str, Any]:
    """Build the groups from mined negatives and score them with the teacher, shard by shard.

    ``labelling.job.enabled`` runs all of it as a Ray job in its own environment
    (d2llm.labelling_job); otherwise the shards are scored by ``labelling.executor``: this
    process ("local") or Ray actors ("ray", d2llm.labelling_ray). ``teacher`` may be passed
    already loaded to the local executor (it must be the one saved in ``teacher_dir``, whose
    files identify the labels). Returns counts and what was scored or skipped.
    """
    cfg = params.labelling
    if cfg.job.enabled:
        from d2llm.labelling_job import run_labelling_job

        return run_labelling_job(params, negatives_path, teacher_dir, out_dir, overwrite=overwrite)
    plan = plan_labelling(params, negatives_path, teacher_dir, out_dir, overwrite)
    if plan.complete:
        log.info("labels in %s are complete and current; nothing to do", plan.out_dir)
        return {**plan.summary, "scored_shards": 0, "skipped_shards": len(plan.shards)}
    scoring: dict[str, str] | None = None
    run: dict[str, Any] = {"executor": cfg.executor}
    if plan.missing and cfg.executor == "ray":
        if teacher is not None:
            raise ValueError("a loaded teacher can only be used by the local executor")
        from d2llm.labelling_ray import score_on_ray

        run, scoring = score_on_ray(plan, params, teacher_dir)
    elif plan.missing:
        scorer = ShardScorer(params, teacher_dir, teacher)
        run, scoring = score_locally(plan, scorer), scorer.scoring_info()
    return finalise_labelling(plan, scoring, run)


@dataclass
class Labels:
    groups: pd.DataFrame
    group_id: torch.Tensor  # [N]
    in_batch: torch.Tensor  # [N, B, B, 2]
    hard: torch.Tensor  # [N, B, K+1, 2]
    feature_cos: torch.Tensor  # [N, B, K+1, K+1]


def load_labels(out_dir: str | Path) -> Labels:
    """Groups and the stacked teacher tensors of a complete labelling, row i = group_id i."""
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    manifest_file = out_dir / MANIFEST_FILE
    if not manifest_file.is_file():
        raise ArtifactError(f"{out_dir} holds no labels ({MANIFEST_FILE} missing; run `d2llm label`)")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if not manifest.get("complete"):
        raise ArtifactError(f"labels in {out_dir} are incomplete: rerun `d2llm label` to finish them")
    groups = pd.read_parquet(out_dir / GROUPS_FILE)
    if _hash_groups(groups) != manifest["groups_sha256"]:
        raise ArtifactError(f"{out_dir / GROUPS_FILE} does not match its manifest (edited after labelling?)")
    parts = [load_file(str(out_dir / SHARD_PATTERN.format(s))) for s in range(manifest["num_shards"])]
    stacked = {k: torch.cat([p[k] for p in parts]) for k in ("group_id", "in_batch", "hard", "feature_cos")}
    if stacked["group_id"].tolist() != groups["group_id"].tolist():
        raise ArtifactError(f"score shards in {out_dir} do not cover groups 0..{len(groups) - 1} in order")
    return Labels(groups, **stacked)
