"""The three distillation losses of D2LLM: contrastive (CI), rank (RI) and feature (FI) imitation.

Shapes, per training group of B anchors with K hard negatives each (see docs/model.md):

- ``z_in [B, B]``: student logits, ``z_in[i, j] = student(a_i, b_j)`` (diagonal = positives);
- ``z_hn [B, K+1]``: student logits for (a_i, c_ik), column 0 = the positive b_i;
- ``s_in [B, B]``, ``s_hn [B, K+1]``: teacher probabilities ``s = softmax(t / tau_T)[..., 0]``
  from the teacher logits ``t_* [..., 2]`` (``[z_yes, z_no]``);
- ``u_hn [B, K+1, H]``: the student's IEM branch vectors for the (K+1) pairs of each anchor;
- ``c_teacher [B, K+1, K+1]``: the cosine matrix of the teacher's features for those pairs.

Each loss is one module holding its own hyper-parameters (sentence-transformers style) and
returns a scalar: with ``reduction="mean"`` (the default) the mean over anchors; with
``"authors"`` the per-anchor values are summed and divided as the authors' code divides them
(docs/model.md, "Loss reductions"). :class:`D2LLMLoss` combines them with the weights of
``LossConfig`` and returns every part, so training can log them separately. Unlike the authors'
code, the second rank-imitation term is part of the total, in both reductions.

**A slice of a group** (distributed training with global in-batch negatives, d2llm.training):
each rank holds b of the group's B anchors, rows ``offset .. offset+b-1``, scored against all B
positives, so ``z_in``/``s_in`` are ``[b, B]`` with anchor i's positive in column ``offset + i``.
Passing ``slice_of=GroupSlice(offset, B)`` makes every loss return that slice's share of the
whole group's loss (per-anchor values summed and divided by the whole group's divisor), so the
shares of all ranks add up to the loss of the group computed in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2llm.config import LossConfig

Reduction = Literal["mean", "authors"]


@dataclass(frozen=True)
class GroupSlice:
    """Rows ``offset ..`` of a group of ``anchors`` anchors (see the module docstring)."""

    offset: int
    anchors: int


def teacher_probabilities(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``s = softmax([z_yes, z_no] / tau_T)[..., 0]``: the teacher's probability of "yes"."""
    if logits.shape[-1] != 2:
        raise ValueError(f"teacher logits must end in a [yes, no] axis of size 2, got {tuple(logits.shape)}")
    return torch.softmax(_at_least_fp32(logits) / temperature, dim=-1)[..., 0]


def _at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision softmax/normalisation loses too much; float64 inputs keep their precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _weighted_info_nce(pos: Tensor, neg: Tensor, s_pos: Tensor, s_neg: Tensor, tau: float) -> Tensor:
    """Per-anchor ``-log(exp(s_p z_p/tau) / (exp(s_p z_p/tau) + sum_j exp((1-s_j) z_j/tau)))``.

    The teacher scales each logit: a positive it is unsure of pulls less, and a negative it
    thinks is actually relevant (a false negative, s_j near 1) is pushed away less.
    ``pos``/``s_pos`` are [B]; ``neg``/``s_neg`` are [B, M]. Returns [B].
    """
    pos_logit = (s_pos * pos / tau).unsqueeze(1)
    neg_logits = (1.0 - s_neg) * neg / tau
    return torch.logsumexp(torch.cat([pos_logit, neg_logits], dim=1), dim=1) - pos_logit.squeeze(1)


def _offset(part: GroupSlice | None) -> int:
    return 0 if part is None else part.offset


def _off_diagonal(matrix: Tensor, offset: int = 0) -> Tensor:
    """Row i of a [b, N] matrix without its positive, entry (i, offset + i): [b, N-1]."""
    b, n = matrix.shape
    keep = torch.ones(b, n, dtype=torch.bool, device=matrix.device)
    rows = torch.arange(b, device=matrix.device)
    keep[rows, rows + offset] = False
    return matrix[keep].view(b, n - 1)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "authors"):
        raise ValueError(f"unknown loss reduction {reduction!r}: expected 'mean' or 'authors'")


def _reduce(
    per_anchor: Tensor, reduction: Reduction, authors_divisor: int, part: GroupSlice | None = None
) -> Tensor:
    """``"mean"``: the mean over anchors; ``"authors"``: the sum over anchors / ``authors_divisor``.

    For a slice of a group (``part``) the mean is the slice's sum over all the group's anchors.
    """
    if reduction == "mean":
        return per_anchor.mean() if part is None else per_anchor.sum() / part.anchors
    return per_anchor.sum() / authors_divisor


def _group_size(z_hn: Tensor, part: GroupSlice | None) -> int:
    """B: the anchors of the whole group (of which ``z_hn`` holds this slice's rows)."""
    return z_hn.shape[0] if part is None else part.anchors


def _check_group(
    z_in: Tensor, z_hn: Tensor, s_in: Tensor, s_hn: Tensor, part: GroupSlice | None = None
) -> None:
    b = z_in.shape[0]
    columns = b if part is None else part.anchors
    if z_in.dim() != 2 or z_in.shape[1] != columns or _offset(part) + b > columns:
        raise ValueError(f"z_in must be [B, B] (a slice: [b, B] within the group), got {tuple(z_in.shape)}")
    if s_in.shape != z_in.shape:
        raise ValueError(f"teacher in-batch scores {tuple(s_in.shape)} do not match z_in {tuple(z_in.shape)}")
    if z_hn.dim() != 2 or z_hn.shape[0] != b or z_hn.shape[1] < 2:
        raise ValueError(f"z_hn must be [B, K+1] with B={b} and K >= 1, got {tuple(z_hn.shape)}")
    if s_hn.shape != z_hn.shape:
        raise ValueError(f"teacher hard scores {tuple(s_hn.shape)} do not match z_hn {tuple(z_hn.shape)}")


class ContrastiveImitationLoss(nn.Module):
    """CI: teacher-weighted InfoNCE over in-batch negatives, plus ``alpha`` x the same over hard ones.

    ``variant="paper"`` weights the in-batch part as the paper writes it; ``"authors"`` uses plain
    (unweighted) InfoNCE for the in-batch part, as the authors' code does. The hard-negative part
    (positive = column 0 of ``z_hn``) is weighted in both unless ``hard="plain"``: then it is plain
    InfoNCE of the positive over its hard negatives, unchanged by a shift of every logit.

    ``reduction="mean"``: each part is the mean over the B anchors. ``"authors"``: the in-batch
    part is the sum over anchors / B^2 and the hard part the sum / (B K), as in the authors' code.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        tau: float = 1.0,
        variant: str = "paper",
        reduction: Reduction = "mean",
        hard: str = "weighted",
    ) -> None:
        super().__init__()
        if variant not in ("paper", "authors"):
            raise ValueError(f"unknown CI variant {variant!r}: expected 'paper' or 'authors'")
        if hard not in ("weighted", "plain"):
            raise ValueError(f"unknown hard-negative CI {hard!r}: expected 'weighted' or 'plain'")
        if tau <= 0:
            raise ValueError(f"CI temperature must be > 0, got {tau}")
        _check_reduction(reduction)
        self.alpha, self.tau, self.variant, self.reduction, self.hard = alpha, tau, variant, reduction, hard

    def forward(
        self, z_in: Tensor, s_in: Tensor, z_hn: Tensor, s_hn: Tensor, part: GroupSlice | None = None
    ) -> Tensor:
        _check_group(z_in, z_hn, s_in, s_hn, part)
        b, k, offset = _group_size(z_hn, part), z_hn.shape[1] - 1, _offset(part)
        if b < 2:
            in_batch = z_in.new_zeros(())  # a group of one anchor has no in-batch negative
        else:
            if self.variant == "paper":
                per_anchor = _weighted_info_nce(
                    z_in.diagonal(offset),
                    _off_diagonal(z_in, offset),
                    s_in.diagonal(offset),
                    _off_diagonal(s_in, offset),
                    self.tau,
                )
            else:
                targets = torch.arange(z_in.shape[0], device=z_in.device) + offset
                per_anchor = F.cross_entropy(z_in / self.tau, targets, reduction="none")
            in_batch = _reduce(per_anchor, self.reduction, authors_divisor=b * b, part=part)
        if self.hard == "plain":
            positive_first = torch.zeros(z_hn.shape[0], dtype=torch.long, device=z_hn.device)
            hard_per_anchor = F.cross_entropy(z_hn / self.tau, positive_first, reduction="none")
        else:
            hard_per_anchor = _weighted_info_nce(z_hn[:, 0], z_hn[:, 1:], s_hn[:, 0], s_hn[:, 1:], self.tau)
        hard = _reduce(hard_per_anchor, self.reduction, authors_divisor=b * k, part=part)
        return in_batch + self.alpha * hard


class PearsonRankLoss(nn.Module):
    """RI part 1: ``1 - pearson(z_i[0..K], s_i[0..K])`` per anchor, mean over anchors.

    Pearson correlation is invariant to the scale and offset of the logits, so the student only
    has to order and space the K+1 candidates like the teacher, not match its calibration.
    The authors' code reduces this part the same way (sum over anchors / B), so it takes no
    ``reduction``.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, z_hn: Tensor, s_hn: Tensor, part: GroupSlice | None = None) -> Tensor:
        if z_hn.shape != s_hn.shape or z_hn.dim() != 2:
            raise ValueError(f"z_hn {tuple(z_hn.shape)} and s_hn {tuple(s_hn.shape)} must both be [B, K+1]")
        zc = z_hn - z_hn.mean(dim=1, keepdim=True)
        sc = s_hn - s_hn.mean(dim=1, keepdim=True)
        # eps keeps a constant row (teacher indifferent to all candidates) finite: r = 0 there.
        r = (zc * sc).sum(dim=1) / (zc.norm(dim=1) * sc.norm(dim=1) + self.eps)
        return _reduce(1.0 - r, "mean", authors_divisor=len(r), part=part)  # same in both reductions


class HardEasyRankLoss(nn.Module):
    """RI part 2: hard negatives should outrank easy in-batch negatives as much as the teacher says.

    Per anchor i: ``sum_{h=1..K} sum_{e != i} -log sigmoid((z_ih - z_ie) / tau) * max(s_ih - s_ie, 0)``,
    then the mean over anchors (``reduction="mean"``) or, as the authors' code does, the sum over
    anchors / (B K (B-1)), i.e. the mean over every (anchor, hard, easy) triple (``"authors"``).
    Hard negatives come from ``z_hn[:, 1:]``, easy ones from the off-diagonal of ``z_in`` (the
    other anchors' positives).
    """

    def __init__(self, tau: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"RI temperature must be > 0, got {tau}")
        _check_reduction(reduction)
        self.tau, self.reduction = tau, reduction

    def forward(
        self, z_in: Tensor, s_in: Tensor, z_hn: Tensor, s_hn: Tensor, part: GroupSlice | None = None
    ) -> Tensor:
        _check_group(z_in, z_hn, s_in, s_hn, part)
        b, k, offset = _group_size(z_hn, part), z_hn.shape[1] - 1, _offset(part)
        if b < 2:
            return z_in.new_zeros(())
        z_hard, s_hard = z_hn[:, 1:].unsqueeze(2), s_hn[:, 1:].unsqueeze(2)  # [B, K, 1]
        z_easy = _off_diagonal(z_in, offset).unsqueeze(1)  # [B, 1, B-1]
        s_easy = _off_diagonal(s_in, offset).unsqueeze(1)
        margin_weight = (s_hard - s_easy).clamp(min=0)  # [B, K, B-1]
        terms = -F.logsigmoid((z_hard - z_easy) / self.tau) * margin_weight
        return _reduce(terms.sum(dim=(1, 2)), self.reduction, authors_divisor=b * k * (b - 1), part=part)


def cosine_matrix(vectors: Tensor, eps: float = 1e-8) -> Tensor:
    """Pairwise cosine similarities within each group: [B, M, H] -> [B, M, M].

    An all-zero vector (possible after the IEM's ReLU) gets cosine 0 with everything instead of NaN.
    """
    unit = F.normalize(_at_least_fp32(vectors), dim=-1, eps=eps)
    return unit @ unit.transpose(1, 2)


class FeatureImitationLoss(nn.Module):
    """FI: ``sum_{k,l} (C_T[i][k,l] - C_S[i][k,l])^2``, mean over anchors.

    ``C_S`` is the cosine matrix of the student's IEM branch vectors for the K+1 pairs of anchor
    i, ``C_T`` the same for the teacher's features; comparing similarity matrices, not the
    features themselves, makes the teacher's and the student's widths independent.
    ``reduction="authors"``: the sum over anchors / (K+1)^2, as the authors' code divides it
    (the mean over the cells of each matrix, summed, not averaged, over anchors).
    """

    def __init__(self, reduction: Reduction = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction

    def forward(self, u_hn: Tensor, c_teacher: Tensor, part: GroupSlice | None = None) -> Tensor:
        if u_hn.dim() != 3:
            raise ValueError(f"u_hn must be [B, K+1, H], got {tuple(u_hn.shape)}")
        b, m, _ = u_hn.shape
        if tuple(c_teacher.shape) != (b, m, m):
            raise ValueError(f"c_teacher must be [B, K+1, K+1] = {(b, m, m)}, got {tuple(c_teacher.shape)}")
        c_student = cosine_matrix(u_hn)
        per_anchor = ((c_teacher.to(c_student.dtype) - c_student) ** 2).sum(dim=(1, 2))
        return _reduce(per_anchor, self.reduction, authors_divisor=m * m, part=part)


class D2LLMLoss(nn.Module):
    """``total = CI + beta * RI_pearson + gamma * RI_hard_easy + eta * FI`` from teacher *logits*.

    ``forward`` returns ``{"ci", "ri_pearson", "ri_hard_easy", "fi", "total"}``; the parts are
    unweighted (alpha is inside CI), so their logged values are comparable across configs
    of the same ``reduction``. FI is skipped (0) when ``eta == 0``; otherwise ``u_hn`` and
    ``c_teacher`` are required.
    """

    def __init__(self, cfg: LossConfig | None = None, teacher_temperature: float = 1.0) -> None:
        """``cfg`` is ``params.loss`` (paper defaults if None); tau_T is ``params.teacher.temperature``."""
        super().__init__()
        cfg = cfg or LossConfig()
        if teacher_temperature <= 0:
            raise ValueError(f"teacher temperature must be > 0, got {teacher_temperature}")
        self.ci = ContrastiveImitationLoss(
            alpha=cfg.alpha, tau=cfg.tau_ci, variant=cfg.ci_variant, reduction=cfg.reduction, hard=cfg.ci_hard
        )
        self.ri_pearson = PearsonRankLoss()
        self.ri_hard_easy = HardEasyRankLoss(tau=cfg.tau_ri, reduction=cfg.reduction)
        self.fi = FeatureImitationLoss(reduction=cfg.reduction)
        self.beta, self.gamma, self.eta = cfg.beta, cfg.gamma, cfg.eta
        self.teacher_temperature = teacher_temperature

    def forward(
        self,
        z_in: Tensor,
        z_hn: Tensor,
        t_in: Tensor,
        t_hn: Tensor,
        u_hn: Tensor | None = None,
        c_teacher: Tensor | None = None,
        part: GroupSlice | None = None,
    ) -> dict[str, Tensor]:
        """The parts of the group's loss; of a slice of the group, its share of them (``part``)."""
        s_in = teacher_probabilities(t_in, self.teacher_temperature).to(z_in.dtype)
        s_hn = teacher_probabilities(t_hn, self.teacher_temperature).to(z_hn.dtype)
        parts = {
            "ci": self.ci(z_in, s_in, z_hn, s_hn, part),
            "ri_pearson": self.ri_pearson(z_hn, s_hn, part),
            "ri_hard_easy": self.ri_hard_easy(z_in, s_in, z_hn, s_hn, part),
        }
        if self.eta > 0:
            if u_hn is None or c_teacher is None:
                raise ValueError("FI is on (eta > 0) but u_hn or c_teacher was not given")
            parts["fi"] = self.fi(u_hn, c_teacher, part)
        else:
            parts["fi"] = z_in.new_zeros(())
        parts["total"] = (
            parts["ci"]
            + self.beta * parts["ri_pearson"]
            + self.gamma * parts["ri_hard_easy"]
            + self.eta * parts["fi"]
        )
        return parts
