"""The teacher's scores of a shard of groups: what every executor's worker computes.

``ShardScorer`` loads the teacher (and its fusion with the bi-encoder) once and scores whole
shards with ``score_groups``. Shards depend only on their own groups, so an interrupted and
resumed run gives the same tensors as one uninterrupted run, whichever executor (this process,
Ray actors) scored them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from d2llm.errors import ConfigError
from d2llm.teachers.factory import load_teacher
from d2llm.teachers.fusion import FusedScorer

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from d2llm.config import Params
    from d2llm.teachers.base import Teacher


def score_groups(
    teacher: Teacher, groups: pd.DataFrame, fusion: FusedScorer | None = None
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


def load_scoring_teacher(params: Params, teacher_dir: str | Path) -> Teacher:
    """The saved teacher on the configured engine: transformers ("hf") or vLLM (GPU, own environment)."""
    if params.labelling.engine == "vllm":
        if params.labelling.quantization != "none":
            raise ConfigError(
                f"labelling.quantization: {params.labelling.quantization} is the transformers teacher's "
                "number format on the CPU; "
                "it does not apply to labelling.engine: vllm (set one of them back)"
            )
        from d2llm.teachers.vllm_engine import load_vllm_teacher

        return load_vllm_teacher(params, teacher_dir)
    return load_teacher(params.teacher, teacher_dir, params.device).quantize(params.labelling.quantization)


class ShardScorer:
    """The teacher (and fusion), loaded once, scoring whole shards: the work of one executor worker."""

    def __init__(self, params: Params, teacher_dir: str | Path, teacher: Teacher | None = None) -> None:
        self.teacher = teacher if teacher is not None else load_scoring_teacher(params, teacher_dir)
        self.fusion = FusedScorer.load(params, teacher_dir)

    def score(self, groups: pd.DataFrame) -> dict[str, torch.Tensor]:
        return score_groups(self.teacher, groups, self.fusion)

    def scoring_info(self) -> dict[str, str]:
        """Engine, its version and the dtype it computes in (and, with fusion, the bi-encoder's),
        for the manifest."""
        info = self.teacher.scoring_info()
        if self.fusion is not None and self.fusion.encoder is not None:
            info["fusion_dtype"] = self.fusion.encoder.number_format()
        return info
