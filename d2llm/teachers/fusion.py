"""Score fusion: the teacher's yes/no log-odds interpolated with the bi-encoder's cosine.

A small cross-encoder fine-tuned on a few thousand pairs can be a worse judge than the
pretrained bi-encoder on some families (graded similarity above all), yet the two make
different mistakes. Interpolating their scores is standard practice when re-ranking a first
stage, and the student, which starts as that very bi-encoder (``student.iem.residual:
cosine``), then only has to learn the teacher's correction. With ``teacher.fusion: biencoder``
the *fused* score is the teacher: it labels the training groups and is the teacher of the report.

Per dataset, on its dev split (never test):

    d  = z_yes - z_no                                   the teacher's log-odds
    c' = mean(d) + std(d) * (c - mean(c)) / std(c)      cosine moved onto the teacher's scale
    d* = (1 - w) d + w c'                               w on a grid in [0, 1], best dev metric

and the fused logits are ``[d*/2, -d*/2]`` (so ``softmax`` gives ``sigmoid(d*)``, as for the
raw logits). ``w = 0`` is the teacher alone, ``w = 1`` the bi-encoder alone. A dataset without
a dev split of its own (an IR collection) takes the mean weight of its task kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from d2llm.config import Params

GRID = tuple(round(i / 10, 1) for i in range(11))


@dataclass(frozen=True)
class Fusion:
    """How one dataset mixes the teacher's log-odds with the bi-encoder's cosine."""

    weight: float
    teacher_mean: float
    teacher_std: float
    cosine_mean: float
    cosine_std: float

    def log_odds(self, log_odds: np.ndarray, cosine: np.ndarray) -> np.ndarray:
        moved = self.teacher_mean + self.teacher_std * (cosine - self.cosine_mean) / self.cosine_std
        return (1.0 - self.weight) * log_odds + self.weight * moved

    def logits(self, logits: Any, cosine: Any) -> Any:
        """Teacher logits ``[N, 2]`` (torch) and cosines ``[N]`` -> fused logits ``[N, 2]``."""
        import torch

        d = (logits[:, 0] - logits[:, 1]).double().cpu().numpy()
        fused = torch.from_numpy(self.log_odds(d, np.asarray(cosine, dtype=float))).to(logits.dtype)
        return torch.stack([fused / 2, -fused / 2], dim=1)


def fit_fusion(
    log_odds: np.ndarray, cosine: np.ndarray, score: Callable[[np.ndarray], float]
) -> tuple[Fusion, float]:
    """The grid weight whose fused scores maximise ``score`` (a dev metric), and that metric.

    Ties go to the smaller weight: the teacher is preferred where the bi-encoder adds nothing.
    """
    d, c = np.asarray(log_odds, dtype=float), np.asarray(cosine, dtype=float)
    stats = {
        "teacher_mean": float(d.mean()),
        "teacher_std": float(d.std()) or 1.0,
        "cosine_mean": float(c.mean()),
        "cosine_std": float(c.std()) or 1.0,
    }
    best: tuple[Fusion, float] | None = None
    for w in GRID:
        fusion = Fusion(weight=w, **stats)
        value = score(fusion.log_odds(d, c))
        if best is None or value > best[1] + 1e-9:
            best = (fusion, value)
    assert best is not None
    return best


class FusionTable:
    """Fusion per dataset, with a per-task-kind fallback for datasets without a dev split."""

    def __init__(self, by_dataset: dict[str, Fusion], tasks: dict[str, str]) -> None:
        self.by_dataset = by_dataset
        self.tasks = tasks  # dataset -> task kind

    def for_dataset(self, dataset: str, task: str) -> Fusion:
        if dataset in self.by_dataset:
            return self.by_dataset[dataset]
        same_kind = [f for name, f in self.by_dataset.items() if self.tasks.get(name) == task]
        if not same_kind:
            same_kind = list(self.by_dataset.values())
        if not same_kind:
            raise ValueError("no fusion weights fitted")
        mean = lambda field: float(np.mean([getattr(f, field) for f in same_kind]))  # noqa: E731
        return Fusion(**{field: mean(field) for field in Fusion.__dataclass_fields__})

    def to_json(self) -> dict[str, Any]:
        return {
            "datasets": {
                name: {**asdict(f), "task": self.tasks.get(name)} for name, f in self.by_dataset.items()
            }
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FusionTable:
        by_dataset, tasks = {}, {}
        for name, entry in raw.get("datasets", {}).items():
            entry = dict(entry)
            tasks[name] = entry.pop("task", None)
            by_dataset[name] = Fusion(**entry)
            if not all(math.isfinite(getattr(by_dataset[name], f)) for f in Fusion.__dataclass_fields__):
                raise ValueError(f"fusion weights of {name!r} are not finite: {entry}")
        return cls(by_dataset, tasks)


@dataclass
class Fused:
    """The teacher's fusion weights and the bi-encoder they mix in (``teacher.fusion: biencoder``)."""

    table: FusionTable
    encoder: Any  # d2llm.biencoder.MeanPoolEncoder

    def logits(
        self, pairs: list[tuple[str, str]], logits: torch.Tensor, dataset: str, task: str
    ) -> torch.Tensor:
        from d2llm.teachers.finetune import pair_cosines

        if not pairs:
            return logits
        return self.table.for_dataset(dataset, task).logits(logits, pair_cosines(self.encoder, pairs))


def load_fused(params: Params, teacher_dir: str | Path, required: bool = True) -> Fused | None:
    """The fusion to score with, or None with ``teacher.fusion: none``.

    A teacher saved without fusion weights is an error when ``required`` (labelling must not
    silently label with another teacher than configured), else None (evaluation notes it).
    """
    if params.teacher.fusion == "none":
        return None
    from d2llm.teachers.finetune import baseline_encoder, load_fusion

    table = load_fusion(teacher_dir)
    if table is None and not required:
        return None
    if table is None:
        from d2llm.errors import ArtifactError

        raise ArtifactError(
            f"teacher.fusion is {params.teacher.fusion!r} but the teacher in {teacher_dir} has no fusion "
            "weights: fine-tune it again (`d2llm teacher-finetune`) with this setting"
        )
    return Fused(table, baseline_encoder(params))
