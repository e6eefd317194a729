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

Two names: ``FusionWeights`` are one dataset's ``w`` and the two scales (what ``fit_fusion``
fits on dev), ``FusedScorer`` holds them per dataset with the bi-encoder and applies them. The
weights travel in the teacher's dev report (d2llm.teachers.dev_report, key ``fusion``);
``FusedScorer.load`` reads them back for labelling and evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from d2llm.biencoder import baseline_encoder, pair_cosines
from d2llm.errors import ArtifactError
from d2llm.teachers.dev_report import read_dev_report

if TYPE_CHECKING:
    import torch

    from d2llm.biencoder import MeanPoolEncoder
    from d2llm.config import Params, TaskKind

GRID = tuple(round(i / 10, 1) for i in range(11))


@dataclass(frozen=True)
class FusionWeights:
    """How one dataset mixes the teacher's log-odds with the bi-encoder's cosine (fitted on its dev split)."""

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
) -> tuple[FusionWeights, float]:
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
    best: tuple[FusionWeights, float] | None = None
    for w in GRID:
        weights = FusionWeights(weight=w, **stats)
        value = score(weights.log_odds(d, c))
        if best is None or value > best[1] + 1e-9:
            best = (weights, value)
    assert best is not None
    return best


class FusedScorer:
    """The teacher fused with the bi-encoder (``teacher.fusion: biencoder``): ``FusionWeights`` per
    dataset, with a per-task-kind fallback for datasets without a dev split, and the bi-encoder
    whose cosines they mix in.

    ``encoder`` is None for a scorer that is only written to or read from a dev report (teacher
    fine-tuning); ``load`` gives one that scores.
    """

    def __init__(
        self,
        by_dataset: dict[str, FusionWeights],
        tasks: dict[str, str],
        encoder: MeanPoolEncoder | None = None,
    ) -> None:
        self.by_dataset = by_dataset
        self.tasks = tasks  # dataset -> task kind
        self.encoder = encoder

    def for_dataset(self, dataset: str, task: TaskKind) -> FusionWeights:
        if dataset in self.by_dataset:
            return self.by_dataset[dataset]
        same_kind = [f for name, f in self.by_dataset.items() if self.tasks.get(name) == task]
        if not same_kind:
            same_kind = list(self.by_dataset.values())
        if not same_kind:
            raise ValueError("no fusion weights fitted")
        mean = lambda field: float(np.mean([getattr(f, field) for f in same_kind]))  # noqa: E731
        return FusionWeights(**{field: mean(field) for field in FusionWeights.__dataclass_fields__})

    def logits(
        self, pairs: list[tuple[str, str]], logits: torch.Tensor, dataset: str, task: TaskKind
    ) -> torch.Tensor:
        """The teacher's ``logits`` of ``pairs`` fused with the bi-encoder's cosines of the same pairs."""
        if not pairs:
            return logits
        if self.encoder is None:
            raise ValueError("this FusedScorer has no bi-encoder to score with (FusedScorer.load gives one)")
        return self.for_dataset(dataset, task).logits(logits, pair_cosines(self.encoder, pairs))

    def to_json(self) -> dict[str, Any]:
        return {
            "datasets": {
                name: {**asdict(f), "task": self.tasks.get(name)} for name, f in self.by_dataset.items()
            }
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any], encoder: MeanPoolEncoder | None = None) -> FusedScorer:
        by_dataset, tasks = {}, {}
        for name, entry in raw.get("datasets", {}).items():
            entry = dict(entry)
            tasks[name] = entry.pop("task", None)
            by_dataset[name] = FusionWeights(**entry)
            if not all(
                math.isfinite(getattr(by_dataset[name], f)) for f in FusionWeights.__dataclass_fields__
            ):
                raise ValueError(f"fusion weights of {name!r} are not finite: {entry}")
        return cls(by_dataset, tasks, encoder)

    @classmethod
    def load(cls, params: Params, teacher_dir: str | Path, required: bool = True) -> FusedScorer | None:
        """The fusion to score with (weights from the teacher's dev report, the student's backbone
        as the bi-encoder), or None with ``teacher.fusion: none``.

        A teacher saved without fusion weights is an error when ``required`` (labelling must not
        silently label with another teacher than configured), else None (evaluation notes it).
        """
        if params.teacher.fusion == "none":
            return None
        report = read_dev_report(teacher_dir)
        if not report or "fusion" not in report:
            if not required:
                return None
            raise ArtifactError(
                f"teacher.fusion is {params.teacher.fusion!r} but the teacher in {teacher_dir} has no fusion "
                "weights: fine-tune it again (`d2llm teacher-finetune`) with this setting"
            )
        return cls.from_json(report["fusion"], baseline_encoder(params))
