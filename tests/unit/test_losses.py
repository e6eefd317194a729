"""Each loss against a value worked out by hand on a B=2, K=1 group, plus gradient flow."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from d2llm.config import LossConfig
from d2llm.losses import (
    ContrastiveImitationLoss,
    D2LLMLoss,
    FeatureImitationLoss,
    HardEasyRankLoss,
    PearsonRankLoss,
    teacher_probabilities,
)

# One group: anchors a0, a1; positives b0, b1; one hard negative each (K=1).
Z_IN = [[2.0, 0.5], [1.0, 3.0]]  # z_in[i][j] = student(a_i, b_j)
S_IN = [[0.9, 0.2], [0.4, 0.8]]  # teacher probabilities for the same pairs
Z_HN = [[2.0, 1.5], [3.0, -1.0]]  # column 0 = positive (same as the diagonal of Z_IN)
S_HN = [[0.9, 0.6], [0.8, 0.1]]
U_HN = [[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [3.0, 0.0]]]  # student IEM branch vectors [B, K+1, H]
C_T = [[[1.0, 0.5], [0.5, 1.0]], [[1.0, 0.2], [0.2, 1.0]]]  # teacher feature cosines [B, K+1, K+1]


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def nce(pos: float, negs: list[float]) -> float:
    """-log(e^pos / (e^pos + sum e^neg)), by hand."""
    return -math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(n) for n in negs)))


def neg_log_sigmoid(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


def teacher_logits(probs: list) -> torch.Tensor:
    """[log s, log(1-s)]: softmax of these at tau_T=1 gives back s exactly."""
    p = t(probs)
    return torch.stack([p.log(), (1 - p).log()], dim=-1)


def test_teacher_probabilities_softmax_with_temperature() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    s = teacher_probabilities(logits, temperature=2.0)
    assert s.tolist() == pytest.approx([math.exp(1) / (math.exp(1) + 1), 0.5])
    with pytest.raises(ValueError, match="size 2"):
        teacher_probabilities(torch.zeros(3, 3))


def test_ci_paper_variant_by_hand() -> None:
    tau, alpha = 0.5, 0.25
    loss = ContrastiveImitationLoss(alpha=alpha, tau=tau, variant="paper")
    value = loss(t(Z_IN), t(S_IN), t(Z_HN), t(S_HN)).item()
    # In-batch: positive s_ii z_ii / tau, negative (1 - s_ij) z_ij / tau.
    a0 = nce(0.9 * 2.0 / tau, [(1 - 0.2) * 0.5 / tau])
    a1 = nce(0.8 * 3.0 / tau, [(1 - 0.4) * 1.0 / tau])
    # Hard negatives: positive in column 0, negative in column 1.
    h0 = nce(0.9 * 2.0 / tau, [(1 - 0.6) * 1.5 / tau])
    h1 = nce(0.8 * 3.0 / tau, [(1 - 0.1) * -1.0 / tau])
    assert value == pytest.approx((a0 + a1) / 2 + alpha * (h0 + h1) / 2, rel=1e-12)


def test_ci_authors_variant_uses_plain_info_nce_in_batch() -> None:
    loss = ContrastiveImitationLoss(alpha=1.0, tau=1.0, variant="authors")
    value = loss(t(Z_IN), t(S_IN), t(Z_HN), t(S_HN)).item()
    a0 = nce(2.0, [0.5])
    a1 = nce(3.0, [1.0])
    h0 = nce(0.9 * 2.0, [(1 - 0.6) * 1.5])
    h1 = nce(0.8 * 3.0, [(1 - 0.1) * -1.0])
    assert value == pytest.approx((a0 + a1) / 2 + (h0 + h1) / 2, rel=1e-12)


def test_paper_in_batch_ci_rewards_lowering_every_logit_when_the_teacher_doubts_its_positives() -> None:
    """Why the default preset uses ``ci_variant: authors`` (docs/results.md).

    A QA teacher gives its positives ~0.2 and the in-batch negatives ~0: the paper's weights are
    0.2 on the positive and ~1 on each negative, so shifting every logit down by c lowers the
    in-batch loss without ranking anything better. Plain InfoNCE is unchanged by the shift.
    """
    b = 4
    z_in = torch.randn(b, b, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s_in = torch.full((b, b), 0.01, dtype=torch.float64).fill_diagonal_(0.2)
    z_hn, s_hn = z_in[:, :2].clone(), s_in[:, :2].clone()  # unused by the in-batch part (alpha 0)

    def in_batch(variant: str, shift: float) -> float:
        ci = ContrastiveImitationLoss(alpha=0.0, variant=variant)
        return ci(z_in - shift, s_in, z_hn - shift, s_hn).item()

    paper = [in_batch("paper", c) for c in (0.0, 5.0, 10.0)]
    assert paper[0] > paper[1] > paper[2]  # lower everything, lower loss
    assert paper[2] < 0.01
    authors = [in_batch("authors", c) for c in (0.0, 5.0, 10.0)]
    assert authors == pytest.approx([authors[0]] * 3, rel=1e-12)


def test_ci_plain_hard_part_by_hand() -> None:
    loss = ContrastiveImitationLoss(alpha=0.5, tau=2.0, variant="authors", hard="plain")
    value = loss(t(Z_IN), t(S_IN), t(Z_HN), t(S_HN)).item()
    in_batch = (nce(2.0 / 2, [0.5 / 2]) + nce(3.0 / 2, [1.0 / 2])) / 2
    hard = (nce(2.0 / 2, [1.5 / 2]) + nce(3.0 / 2, [-1.0 / 2])) / 2  # the teacher's s_hn is not read
    assert value == pytest.approx(in_batch + 0.5 * hard, rel=1e-12)


def test_weighted_hard_ci_rewards_lowering_every_logit_when_the_teacher_doubts_its_positives() -> None:
    """The hard part has the in-batch part's flaw (above) with a doubtful teacher; plain has not."""
    z_hn = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s_hn = torch.tensor([[0.2, 0.05, 0.05, 0.05]], dtype=torch.float64).expand(4, 4)
    z_in, s_in = torch.zeros(4, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)

    def hard_part(hard: str, shift: float) -> float:
        ci = ContrastiveImitationLoss(alpha=1.0, variant="authors", hard=hard)
        return ci(z_in, s_in, z_hn - shift, s_hn).item()  # the in-batch part is the same constant

    weighted = [hard_part("weighted", c) for c in (0.0, 5.0, 10.0)]
    assert weighted[0] > weighted[1] > weighted[2]
    plain = [hard_part("plain", c) for c in (0.0, 5.0, 10.0)]
    assert plain == pytest.approx([plain[0]] * 3, rel=1e-12)


def test_ci_rejects_unknown_variant_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="unknown CI variant"):
        ContrastiveImitationLoss(variant="mine")
    with pytest.raises(ValueError, match="unknown hard-negative CI"):
        ContrastiveImitationLoss(hard="mine")
    with pytest.raises(ValueError, match=r"z_hn must be \[B, K\+1\]"):
        ContrastiveImitationLoss()(t(Z_IN), t(S_IN), t([[1.0], [2.0]]), t([[1.0], [2.0]]))


def test_pearson_rank_by_hand() -> None:
    # K=1: two points correlate perfectly (+1) or anti-perfectly (-1).
    z = t([[2.0, 1.5], [-1.0, 3.0]])
    s = t([[0.9, 0.6], [0.8, 0.1]])
    assert PearsonRankLoss()(z, s).item() == pytest.approx(((1 - 1) + (1 - -1)) / 2)
    # K=2, worked out: z = (1, 2, 6) -> centred (-2, -1, 3); s = (0.2, 0.4, 0.3) -> (-0.1, 0.1, 0).
    # r = (0.2 - 0.1 + 0) / (sqrt(14) * sqrt(0.02)).
    r = 0.1 / (math.sqrt(14) * math.sqrt(0.02))
    value = PearsonRankLoss()(t([[1.0, 2.0, 6.0]]), t([[0.2, 0.4, 0.3]])).item()
    assert value == pytest.approx(1 - r, rel=1e-6)


def test_pearson_rank_is_finite_for_an_indifferent_teacher() -> None:
    value = PearsonRankLoss()(t([[1.0, 2.0, 3.0]]), t([[0.5, 0.5, 0.5]]))
    assert value.item() == pytest.approx(1.0)


def test_hard_easy_rank_by_hand() -> None:
    tau = 0.5
    value = HardEasyRankLoss(tau=tau)(t(Z_IN), t(S_IN), t(Z_HN), t(S_HN)).item()
    # Anchor 0: hard (z=1.5, s=0.6) vs easy in-batch b1 (z=0.5, s=0.2): weight 0.4.
    a0 = neg_log_sigmoid((1.5 - 0.5) / tau) * (0.6 - 0.2)
    # Anchor 1: hard (z=-1, s=0.1) vs easy b0 (z=1, s=0.4): the teacher ranks the easy one
    # higher, so max(0.1 - 0.4, 0) = 0 and the pair does not count.
    a1 = 0.0
    assert value == pytest.approx((a0 + a1) / 2, rel=1e-12)


def test_feature_imitation_by_hand() -> None:
    value = FeatureImitationLoss()(t(U_HN), t(C_T)).item()
    # Anchor 0: cos((1,0), (1,1)) = 1/sqrt(2); off-diagonal cells differ by 0.5 - 1/sqrt(2).
    a0 = 2 * (0.5 - 1 / math.sqrt(2)) ** 2
    # Anchor 1: orthogonal vectors, cos 0; off-diagonal cells differ by 0.2.
    a1 = 2 * 0.2**2
    assert value == pytest.approx((a0 + a1) / 2, rel=1e-9)


def test_feature_imitation_zero_vector_gives_zero_cosine_not_nan() -> None:
    u = t([[[0.0, 0.0], [1.0, 2.0]]])
    c_t = t([[[1.0, 0.0], [0.0, 1.0]]])
    # The zero vector's self-cosine is 0 instead of 1: one cell off by 1.
    assert FeatureImitationLoss()(u, c_t).item() == pytest.approx(1.0)


def test_combined_loss_weights_parts_and_applies_teacher_temperature() -> None:
    cfg = LossConfig(alpha=0.5, beta=2.0, gamma=0.3, eta=0.1, tau_ci=1.0, tau_ri=1.0)
    z_in, z_hn, u_hn = t(Z_IN), t(Z_HN), t(U_HN)
    parts = D2LLMLoss(cfg)(z_in, z_hn, teacher_logits(S_IN), teacher_logits(S_HN), u_hn, t(C_T))
    ci = ContrastiveImitationLoss(alpha=0.5)(z_in, t(S_IN), z_hn, t(S_HN))
    ri1 = PearsonRankLoss()(z_hn, t(S_HN))
    ri2 = HardEasyRankLoss()(z_in, t(S_IN), z_hn, t(S_HN))
    fi = FeatureImitationLoss()(u_hn, t(C_T))
    assert set(parts) == {"ci", "ri_pearson", "ri_hard_easy", "fi", "total"}
    assert parts["ci"].item() == pytest.approx(ci.item())
    assert parts["ri_hard_easy"].item() == pytest.approx(ri2.item())
    expected = ci + 2.0 * ri1 + 0.3 * ri2 + 0.1 * fi
    assert parts["total"].item() == pytest.approx(expected.item(), rel=1e-9)
    # The RI part 2 term is in the total (the authors' code dropped it).
    assert parts["ri_hard_easy"].item() > 0

    # tau_T = 2 turns s into sqrt(s) / (sqrt(s) + sqrt(1 - s)).
    hot = D2LLMLoss(cfg, teacher_temperature=2.0)
    parts_hot = hot(z_in, z_hn, teacher_logits(S_IN), teacher_logits(S_HN), u_hn, t(C_T))
    s_hot = [[math.sqrt(p) / (math.sqrt(p) + math.sqrt(1 - p)) for p in row] for row in S_HN]
    s_in_hot = [[math.sqrt(p) / (math.sqrt(p) + math.sqrt(1 - p)) for p in row] for row in S_IN]
    ci_hot = ContrastiveImitationLoss(alpha=0.5)(z_in, t(s_in_hot), z_hn, t(s_hot))
    assert parts_hot["ci"].item() == pytest.approx(ci_hot.item(), rel=1e-9)


def test_combined_loss_requires_features_only_when_fi_is_on() -> None:
    args = (t(Z_IN), t(Z_HN), teacher_logits(S_IN), teacher_logits(S_HN))
    with pytest.raises(ValueError, match="eta > 0"):
        D2LLMLoss(LossConfig(eta=0.001))(*args)
    parts = D2LLMLoss(LossConfig(eta=0.0))(*args)
    assert parts["fi"].item() == 0.0


def test_gradients_reach_student_logits_and_branch_vectors() -> None:
    z_in = t(Z_IN).requires_grad_()
    z_hn = t(Z_HN).requires_grad_()
    u_hn = t(U_HN).requires_grad_()
    loss = D2LLMLoss(LossConfig(gamma=0.5, eta=0.5))
    parts = loss(z_in, z_hn, teacher_logits(S_IN), teacher_logits(S_HN), u_hn, t(C_T))
    parts["total"].backward()
    for name, tensor in (("z_in", z_in), ("z_hn", z_hn), ("u_hn", u_hn)):
        assert tensor.grad is not None, name
        assert torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, name
    # The easy negative of anchor 0 is pushed down by RI part 2 and CI: its gradient is positive.
    assert z_in.grad[0, 1] > 0


# --------------------------------------------------------------------------- the authors' reductions
# A group of B=3 anchors with K=2 hard negatives each: every divisor of the authors' code
# (B^2, B K, B K (B-1), (K+1)^2) differs from the B of a mean over anchors, so a wrong divisor
# shows. The expected values are explicit loops over plain floats, written from the authors'
# train.py (sum of the per-anchor or per-pair terms, then one division), not from d2llm.losses.
B3, K3 = 3, 2
Z_IN3 = [[2.0, 0.5, -1.0], [1.0, 3.0, 0.0], [0.5, -0.5, 1.5]]
S_IN3 = [[0.9, 0.2, 0.1], [0.4, 0.8, 0.3], [0.6, 0.05, 0.7]]
Z_HN3 = [[2.0, 1.5, 0.0], [3.0, -1.0, 2.5], [1.5, 1.0, 2.0]]  # column 0 = the diagonal of Z_IN3
S_HN3 = [[0.9, 0.6, 0.3], [0.8, 0.1, 0.7], [0.7, 0.75, 0.2]]
U_HN3 = [
    [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]],
    [[0.0, 2.0], [3.0, 0.0], [1.0, 2.0]],
    [[2.0, 1.0], [1.0, 0.5], [0.5, 3.0]],
]
C_T3 = [
    [[1.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 1.0]],
    [[1.0, 0.2, 0.9], [0.2, 1.0, 0.4], [0.9, 0.4, 1.0]],
    [[1.0, 0.8, 0.6], [0.8, 1.0, 0.0], [0.6, 0.0, 1.0]],
]


def authors_ci_in_batch(weighted: bool, tau: float) -> float:
    """Sum over anchors of -log softmax(row i)[i], divided by B^2 (authors: plain rows)."""
    total = 0.0
    for i in range(B3):
        logits = []
        for j in range(B3):
            weight = (S_IN3[i][j] if j == i else 1 - S_IN3[i][j]) if weighted else 1.0
            logits.append(weight * Z_IN3[i][j] / tau)
        total += -math.log(math.exp(logits[i]) / sum(math.exp(x) for x in logits))
    return total / (B3 * B3)


def authors_ci_hard(tau: float) -> float:
    """Sum over anchors of -log softmax(s_i0 z_i0, (1 - s_ik) z_ik)[0], divided by B K."""
    total = 0.0
    for i in range(B3):
        weights = [S_HN3[i][0]] + [1 - S_HN3[i][k] for k in range(1, K3 + 1)]
        logits = [w * z / tau for w, z in zip(weights, Z_HN3[i], strict=True)]
        total += -math.log(math.exp(logits[0]) / sum(math.exp(x) for x in logits))
    return total / (B3 * K3)


def authors_ri_hard_easy(tau: float) -> float:
    """Sum over (anchor, hard, easy) of -log sigmoid(z_h - z_e) max(s_h - s_e, 0), / (B K (B-1))."""
    total = 0.0
    for i in range(B3):
        for h in range(1, K3 + 1):
            for e in range(B3):
                if e != i:
                    weight = max(S_HN3[i][h] - S_IN3[i][e], 0.0)
                    total += neg_log_sigmoid((Z_HN3[i][h] - Z_IN3[i][e]) / tau) * weight
    return total / (B3 * K3 * (B3 - 1))


def authors_fi() -> float:
    """Sum over anchors and the (K+1)^2 cells of (C_T - C_S)^2, divided by (K+1)^2."""

    def cos(x: list[float], y: list[float]) -> float:
        dot = sum(a * b for a, b in zip(x, y, strict=True))
        return dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))

    total = 0.0
    for i in range(B3):
        for k in range(K3 + 1):
            for m in range(K3 + 1):
                total += (C_T3[i][k][m] - cos(U_HN3[i][k], U_HN3[i][m])) ** 2
    return total / (K3 + 1) ** 2


def authors_pearson() -> float:
    """Sum over anchors of 1 - (Bessel-corrected covariance / (sample std x sample std)), / B."""
    total = 0.0
    n = K3 + 1
    for z, s in zip(Z_HN3, S_HN3, strict=True):
        mz, ms = sum(z) / n, sum(s) / n
        cov = sum((a - mz) * (b - ms) for a, b in zip(z, s, strict=True)) / (n - 1)
        sd_z = math.sqrt(sum((a - mz) ** 2 for a in z) / (n - 1))
        sd_s = math.sqrt(sum((b - ms) ** 2 for b in s) / (n - 1))
        total += 1 - cov / (sd_z * sd_s)
    return total / B3


@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_ci_authors_reduction_by_loops(variant: str) -> None:
    tau, alpha = 0.5, 0.25
    loss = ContrastiveImitationLoss(alpha=alpha, tau=tau, variant=variant, reduction="authors")
    value = loss(t(Z_IN3), t(S_IN3), t(Z_HN3), t(S_HN3)).item()
    expected = authors_ci_in_batch(weighted=variant == "paper", tau=tau) + alpha * authors_ci_hard(tau)
    assert value == pytest.approx(expected, rel=1e-12)


def test_hard_easy_rank_authors_reduction_by_loops() -> None:
    value = HardEasyRankLoss(tau=0.5, reduction="authors")(t(Z_IN3), t(S_IN3), t(Z_HN3), t(S_HN3)).item()
    assert value == pytest.approx(authors_ri_hard_easy(0.5), rel=1e-12)
    assert value > 0


def test_feature_imitation_authors_reduction_by_loops() -> None:
    value = FeatureImitationLoss(reduction="authors")(t(U_HN3), t(C_T3)).item()
    assert value == pytest.approx(authors_fi(), rel=1e-9)


def test_combined_loss_with_the_authors_reductions_by_loops() -> None:
    cfg = LossConfig(
        reduction="authors", ci_variant="authors", alpha=0.5, beta=2.0, gamma=0.3, eta=0.1, tau_ci=0.5
    )
    parts = D2LLMLoss(cfg)(
        t(Z_IN3), t(Z_HN3), teacher_logits(S_IN3), teacher_logits(S_HN3), t(U_HN3), t(C_T3)
    )
    ci = authors_ci_in_batch(weighted=False, tau=0.5) + 0.5 * authors_ci_hard(0.5)
    # RI part 1 is reduced alike in both codes; only where eps enters differs (1e-8 here).
    ri1, ri2, fi = authors_pearson(), authors_ri_hard_easy(1.0), authors_fi()
    assert parts["ci"].item() == pytest.approx(ci, rel=1e-9)
    assert parts["ri_pearson"].item() == pytest.approx(ri1, rel=1e-6)
    assert parts["ri_hard_easy"].item() == pytest.approx(ri2, rel=1e-9)
    assert parts["fi"].item() == pytest.approx(fi, rel=1e-9)
    assert parts["total"].item() == pytest.approx(ci + 2.0 * ri1 + 0.3 * ri2 + 0.1 * fi, rel=1e-6)
    # The default reduction is another number for the same group (a mean over the 3 anchors).
    mean_parts = D2LLMLoss(cfg.model_copy(update={"reduction": "mean"}))(
        t(Z_IN3), t(Z_HN3), teacher_logits(S_IN3), teacher_logits(S_HN3), t(U_HN3), t(C_T3)
    )
    assert mean_parts["ri_hard_easy"].item() == pytest.approx(ri2 * K3 * (B3 - 1), rel=1e-9)
    assert mean_parts["fi"].item() == pytest.approx(fi * (K3 + 1) ** 2 / B3, rel=1e-9)


def test_unknown_reduction_is_rejected() -> None:
    for build in (
        lambda: ContrastiveImitationLoss(reduction="sum"),  # type: ignore[arg-type]
        lambda: HardEasyRankLoss(reduction="sum"),  # type: ignore[arg-type]
        lambda: FeatureImitationLoss(reduction="sum"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match="unknown loss reduction 'sum'"):
            build()


@pytest.mark.parametrize("reduction", ["mean", "authors"])
@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_the_shares_of_a_split_group_add_up_to_the_whole_groups_loss(reduction: str, variant: str) -> None:
    """Global in-batch negatives: each rank scores rows of the [B, B] matrix; its share of every
    part is the whole group's part restricted to its anchors, for each reduction and CI variant."""
    from d2llm.losses import GroupSlice

    generator = torch.Generator().manual_seed(3)
    b, k, h = 6, 3, 5
    z_in, z_hn = torch.randn(b, b, generator=generator), torch.randn(b, k + 1, generator=generator)
    z_hn[:, 0] = z_in.diagonal()
    t_in, t_hn = torch.randn(b, b, 2, generator=generator), torch.randn(b, k + 1, 2, generator=generator)
    u_hn, c_t = (
        torch.randn(b, k + 1, h, generator=generator),
        torch.rand(b, k + 1, k + 1, generator=generator),
    )
    loss = D2LLMLoss(LossConfig(ci_variant=variant, reduction=reduction, eta=0.5, gamma=0.3))
    whole = loss(z_in, z_hn, t_in, t_hn, u_hn, c_t)
    for rows in ([0, 2, 4, 6], [0, 3, 6], [0, 1, 6]):  # even and uneven slices
        shares = [
            loss(
                z_in[lo:hi], z_hn[lo:hi], t_in[lo:hi], t_hn[lo:hi], u_hn[lo:hi], c_t[lo:hi], GroupSlice(lo, b)
            )
            for lo, hi in itertools.pairwise(rows)
        ]
        for part, value in whole.items():
            assert sum(share[part] for share in shares).item() == pytest.approx(value.item(), rel=1e-5), part


def test_a_slice_must_lie_within_its_group() -> None:
    from d2llm.losses import GroupSlice

    with pytest.raises(ValueError, match="z_in must be"):
        ContrastiveImitationLoss()(t(Z_IN), t(S_IN), t(Z_HN), t(S_HN), GroupSlice(offset=1, anchors=2))


def test_loss_config_ci_hard_reaches_the_ci_part() -> None:
    parts = D2LLMLoss(LossConfig(ci_variant="authors", ci_hard="plain", eta=0.0))(
        t(Z_IN), t(Z_HN), teacher_logits(S_IN), teacher_logits(S_HN)
    )
    expected = ContrastiveImitationLoss(variant="authors", hard="plain")(t(Z_IN), t(S_IN), t(Z_HN), t(S_HN))
    assert parts["ci"].item() == pytest.approx(expected.item(), rel=1e-12)
    weighted = ContrastiveImitationLoss(variant="authors")(t(Z_IN), t(S_IN), t(Z_HN), t(S_HN))
    assert parts["ci"].item() != pytest.approx(weighted.item(), rel=1e-3)
