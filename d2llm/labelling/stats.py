"""What the teacher's labels look like, per dataset: how sure it is of the positives.

The paper's contrastive imitation weights each student logit by the teacher: the positive by
``s_ii``, each negative by ``1 - s_ij``. That is only harmless when the teacher gives positives
and negatives about the same weight. A teacher that doubts its positives (a QA teacher that was
trained on data with one right answer in ten gives them ~0.2) makes the weights 0.2 against ~1,
and then lowering *every* logit lowers the loss without ranking anything better
(docs/model.md, "Contrastive imitation and a doubtful teacher"). ``label_stats`` measures this
from a labels folder; ``doubted_datasets`` names the datasets where it bites.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d2llm.labelling.shards import Labels

# Below this mean probability of its positives, a dataset's paper-weighted CI rewards lowering
# every logit more than it rewards ranking (the positive's weight is under half a negative's).
DOUBTED_POSITIVE = 0.5


@dataclass(frozen=True)
class DatasetLabelStats:
    """Means over a dataset's anchors of the teacher's probabilities (``s``, at ``tau_T``)."""

    dataset: str
    groups: int
    anchors: int
    positive: float  # s of (a_i, b_i)
    hard_negative: float  # s of (a_i, n_ik)
    in_batch_negative: float  # s of (a_i, b_j), j != i
    positive_first: float  # share of anchors whose positive is above each of its hard negatives

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def label_stats(labels: Labels, temperature: float = 1.0) -> list[DatasetLabelStats]:
    """One row per dataset of ``labels``, in the order the groups list the datasets."""
    import torch

    from d2llm.losses import teacher_probabilities

    hard = teacher_probabilities(labels.hard, temperature)  # [N, B, K+1]
    in_batch = teacher_probabilities(labels.in_batch, temperature)  # [N, B, B]
    b = in_batch.shape[1]
    off_diagonal = ~torch.eye(b, dtype=torch.bool)
    rows = []
    datasets = labels.groups["dataset"].tolist()
    for dataset in dict.fromkeys(datasets):
        idx = torch.tensor([i for i, d in enumerate(datasets) if d == dataset])
        h, ib = hard[idx], in_batch[idx]
        rows.append(
            DatasetLabelStats(
                dataset=str(dataset),
                groups=len(idx),
                anchors=len(idx) * b,
                positive=h[..., 0].mean().item(),
                hard_negative=h[..., 1:].mean().item(),
                in_batch_negative=ib[:, off_diagonal].mean().item(),
                positive_first=(h[..., 0] > h[..., 1:].max(dim=-1).values).float().mean().item(),
            )
        )
    return rows


def doubted_datasets(stats: list[DatasetLabelStats], threshold: float = DOUBTED_POSITIVE) -> list[str]:
    """Datasets whose positives the teacher gives a mean probability below ``threshold``."""
    return [row.dataset for row in stats if row.positive < threshold]


def format_label_stats(stats: list[DatasetLabelStats]) -> str:
    """A markdown table of ``label_stats``."""
    lines = [
        "| dataset | groups | positive s | hard-negative s | in-batch negative s | positive first |",
        "|---|---|---|---|---|---|",
    ]
    for r in stats:
        lines.append(
            f"| {r.dataset} | {r.groups} | {r.positive:.2f} | {r.hard_negative:.2f} | "
            f"{r.in_batch_negative:.2f} | {r.positive_first:.0%} |"
        )
    return "\n".join(lines)
