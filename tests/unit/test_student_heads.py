"""PMA and IEM on their own: masking, mean-pooling init, hand-checked attention, cache equivalence."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from d2llm.errors import ModelError
from d2llm.student.iem import IEM
from d2llm.student.pma import PMA, mean_pool


def _states(batch: int = 3, tokens: int = 6, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))


MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])


# --------------------------------------------------------------------------- PMA


@pytest.mark.parametrize("init", ["random", "mean"])
def test_pma_padding_does_not_change_the_output(init: str) -> None:
    torch.manual_seed(1)
    pma = PMA(16, num_heads=4, init=init)
    states = _states()
    full = pma(states, MASK)
    # Garbage in the padded positions must be invisible.
    noisy = states.clone()
    noisy[MASK == 0] = 1e3 * torch.randn(int((MASK == 0).sum()), 16)
    assert torch.allclose(pma(noisy, MASK), full, atol=1e-6)
    # Each text alone, unpadded, gives the same vector as inside the padded batch.
    for i, length in enumerate(MASK.sum(1).tolist()):
        alone = pma(states[i : i + 1, :length], torch.ones(1, length, dtype=torch.long))
        assert torch.allclose(alone[0], full[i], atol=1e-5)


def test_pma_mean_init_equals_mean_pooling() -> None:
    torch.manual_seed(2)
    pma = PMA(16, num_heads=4, init="mean")
    states = _states(seed=3) * 5 + 2  # not centred, not unit scale: a LayerNorm would show
    assert torch.allclose(pma(states, MASK), mean_pool(states, MASK), atol=1e-5)
    # Text 2 has a single real token: its vector is that token's state.
    assert torch.allclose(pma(states, MASK)[2], states[2, 0], atol=1e-5)


def test_pma_mean_init_is_not_stuck_at_its_starting_point() -> None:
    torch.manual_seed(4)
    pma = PMA(16, num_heads=4, init="mean")
    target = torch.randn(3, 16)
    params = dict(pma.named_parameters())
    ((pma(_states(), MASK) - target) ** 2).sum().backward()
    # Zero-initialised weights still receive gradients, so training can move away from the mean.
    for name in ("q_proj.weight", "v_proj.weight", "ffn.2.weight"):
        assert params[name].grad.abs().sum() > 0, name
    # The seed and the keys only act through the query (zero at first): they learn after one step.
    for name in ("seed", "k_proj.weight"):
        assert params[name].grad.abs().sum() == 0, name
    torch.optim.SGD(pma.parameters(), lr=0.1).step()
    pma.zero_grad()
    ((pma(_states(), MASK) - target) ** 2).sum().backward()
    for name in ("seed", "k_proj.weight"):
        assert params[name].grad.abs().sum() > 0, name


def test_pma_random_init_is_layer_normalised_and_not_the_mean() -> None:
    torch.manual_seed(5)
    pma = PMA(16, num_heads=4, init="random")
    out = pma(_states(), MASK)
    assert torch.allclose(out.mean(-1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(3), atol=1e-3)
    assert not torch.allclose(out, mean_pool(_states(), MASK), atol=1e-2)


def test_pma_attention_by_hand() -> None:
    """Two heads of width 2 over three tokens (one padded), every projection set by hand."""
    pma = PMA(4, num_heads=2, init="random")
    with torch.no_grad():
        pma.seed.copy_(torch.tensor([[1.0, 2.0, 0.5, -1.0]]))
        for layer in (pma.q_proj, pma.k_proj, pma.v_proj, pma.o_proj):
            layer.weight.copy_(torch.eye(4))
            layer.bias.zero_()
    x = torch.tensor([[[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 2.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    query, attended = pma.attend(x, mask)
    # Head 0 uses dims 0-1: q=(1,2); keys (1,0),(0,1) -> scores 1/sqrt2, 2/sqrt2.
    w0 = torch.softmax(torch.tensor([1.0, 2.0]) / math.sqrt(2), 0)
    # Head 1 uses dims 2-3: q=(0.5,-1); keys (0,1),(2,0) -> scores -1/sqrt2, 1/sqrt2.
    w1 = torch.softmax(torch.tensor([-1.0, 1.0]) / math.sqrt(2), 0)
    expected = torch.tensor(
        [
            w0[0] * 1 + w0[1] * 0,
            w0[0] * 0 + w0[1] * 1,
            w1[0] * 0 + w1[1] * 2,
            w1[0] * 1 + w1[1] * 0,
        ]
    )
    assert torch.allclose(query[0], pma.seed[0])
    assert torch.allclose(attended[0], expected, atol=1e-6)
    # Post-norm layout: out = LN2(H + FFN(H)), H = LN1(Q + O).
    h = F.layer_norm(query + attended, (4,))
    assert torch.allclose(pma(x, mask), F.layer_norm(h + pma.ffn(h), (4,)), atol=1e-6)


def test_pma_rejects_heads_that_do_not_divide_the_width() -> None:
    with pytest.raises(ModelError, match=r"not divisible by student\.pma\.num_heads=5"):
        PMA(16, num_heads=5)


# --------------------------------------------------------------------------- IEM


def _iem(residual: str = "none", seed: int = 0, branches: str = "task") -> IEM:
    torch.manual_seed(seed)
    iem = IEM(8, hidden_size=12, branch_size=6, residual=residual, cosine_scale=3.0, branches=branches)
    if residual == "cosine":  # give the zero-initialised output layer some weight
        with torch.no_grad():
            iem.out.weight.normal_()
            iem.out.bias.fill_(0.3)
    return iem


def _iem_reference(
    iem: IEM, e_a: torch.Tensor, e_b: torch.Tensor, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """An IEM forward written from the raw weights, independent of ``IEM``'s own code path.

    One pair at a time on the concatenated input, as the paper writes it:
    ``h = relu(W1 [e_a; e_b] + b1)``, ``u = relu(W_t h + b_t)``, ``z = w . u + c``, plus
    ``scale * cos(e_a, e_b)`` for the cosine residual. No split first layer, no passage cache.
    """
    w1 = torch.cat([iem.first_a.weight, iem.first_b.weight], dim=1)  # [hidden, 2d]
    b1 = iem.first_a.bias
    branch = iem.branches[task]
    zs, us = [], []
    for a, b in zip(e_a, e_b, strict=True):
        h = torch.relu(w1 @ torch.cat([a, b]) + b1)
        u = torch.relu(branch.weight @ h + branch.bias)
        z = iem.out.weight[0] @ u + iem.out.bias[0]
        if iem.residual == "cosine":
            z = z + iem.cosine_scale * (a @ b) / (a.norm() * b.norm())
        zs.append(z)
        us.append(u)
    return torch.stack(zs), torch.stack(us)


@pytest.mark.parametrize(
    ("branches", "task"), [("task", "sym"), ("task", "asym"), ("family", "nli"), ("family", "sts")]
)
@pytest.mark.parametrize("residual", ["none", "cosine"])
def test_iem_cached_scores_match_an_independent_concatenated_input_iem(
    residual: str, branches: str, task: str
) -> None:
    """Every way the IEM scores (uncached, cached row-wise, cached matrix in any chunking) equals
    the reference above, for both residual modes and the branches of both layouts."""
    iem = _iem(residual, branches=branches)
    queries, passages = torch.randn(5, 8), torch.randn(7, 8)
    cache = iem.passage_cache(passages)
    assert cache.shape == (7, iem.cache_size)
    with torch.no_grad():
        # Row-wise: query i against passage i (queries repeat to cover all 7 passages).
        rows_a = queries[[0, 1, 2, 3, 4, 0, 1]]
        z_ref, u_ref = _iem_reference(iem, rows_a, passages, task)
        for z, u in (iem.forward_cached(rows_a, cache, task), iem(rows_a, passages, task)):
            torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(u, u_ref, atol=1e-5, rtol=1e-5)
        # Matrix: every query against every cached passage, [5, 7], for any block size.
        expected = torch.stack([_iem_reference(iem, q.expand(7, 8), passages, task)[0] for q in queries])
        for chunk in (1, 3, 7, 10, 35, 1000):
            got = iem.score_matrix(queries, cache, task, chunk_size=chunk)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"chunk_size={chunk}")
    # The branches are different functions: the reference does depend on the branch.
    other = "sym" if task == "asym" else "asym"
    assert not torch.allclose(_iem_reference(iem, rows_a, passages, other)[0], z_ref)


def test_iem_branch_keys_map_onto_each_layout() -> None:
    """Callers pass the finest key they know (a family); each layout maps it onto its branches."""
    paper, family = IEM(8, branches="task"), IEM(8, branches="family")
    assert sorted(paper.branches) == ["asym", "sym"]
    assert sorted(family.branches) == ["asym", "nli", "sts"]
    assert [paper.branch_for(k) for k in ("nli", "sts", "sym", "asym")] == ["sym", "sym", "sym", "asym"]
    assert [family.branch_for(k) for k in ("nli", "sts", "sym", "asym")] == ["nli", "sts", "sts", "asym"]


def test_iem_family_branches_score_nli_and_sts_differently() -> None:
    """With a branch per family, the NLI and STS scores of one pair are different functions
    (each equal to the concatenated-input reference of its own branch); the paper's layout
    scores both with its one sym branch."""
    torch.manual_seed(0)
    iem = IEM(8, hidden_size=12, branch_size=6, branches="family")
    e_a, e_b = torch.randn(5, 8), torch.randn(5, 8)
    with torch.no_grad():
        for key in ("nli", "sts", "asym"):
            torch.testing.assert_close(iem(e_a, e_b, key)[0], _iem_reference(iem, e_a, e_b, key)[0])
        assert not torch.allclose(iem(e_a, e_b, "nli")[0], iem(e_a, e_b, "sts")[0])
        torch.testing.assert_close(iem(e_a, e_b, "sym")[0], iem(e_a, e_b, "sts")[0])
    paper = _iem()
    with torch.no_grad():
        torch.testing.assert_close(paper(e_a, e_b, "nli")[0], paper(e_a, e_b, "sts")[0])


def test_iem_cosine_residual_starts_as_scaled_cosine() -> None:
    torch.manual_seed(0)
    iem = IEM(8, hidden_size=12, branch_size=6, residual="cosine", cosine_scale=3.0)
    e_a, e_b = torch.randn(4, 8), torch.randn(4, 8)
    z, _ = iem(e_a, e_b, "sym")
    assert torch.allclose(z, 3.0 * F.cosine_similarity(e_a, e_b), atol=1e-6)
    # The cache carries the unit passage vector after W1b e_b.
    cache = iem.passage_cache(e_b)
    assert torch.allclose(cache[:, 12:], F.normalize(e_b, dim=-1))


def test_iem_detached_inputs_leave_the_vectors_only_the_cosine_gradient() -> None:
    """training.iem_detach: the MLP still learns, the scores do not change, and the vectors'
    gradient is the cosine residual's alone, checked against the residual differentiated apart."""
    torch.manual_seed(0)
    iem = IEM(8, hidden_size=12, branch_size=6, residual="cosine", cosine_scale=3.0)
    with torch.no_grad():
        iem.out.weight.normal_()  # a trained-looking output layer: the MLP part is not zero
    e_a, e_b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    z_full, _ = iem(e_a, e_b, "sym")
    iem.detach_inputs = True
    z_detached, _ = iem(e_a, e_b, "sym")
    torch.testing.assert_close(z_detached, z_full)
    grad_a, grad_b = torch.autograd.grad(z_detached.sum(), (e_a, e_b))
    cosine_a, cosine_b = torch.autograd.grad((3.0 * F.cosine_similarity(e_a, e_b)).sum(), (e_a, e_b))
    torch.testing.assert_close(grad_a, cosine_a)
    torch.testing.assert_close(grad_b, cosine_b)
    full_a, _ = torch.autograd.grad(z_full.sum(), (e_a, e_b))
    assert not torch.allclose(full_a, cosine_a)  # end to end, the MLP's gradient reaches them
    iem.zero_grad()
    iem(e_a, e_b, "sym")[0].sum().backward()
    assert iem.first_a.weight.grad is not None and iem.first_a.weight.grad.abs().sum() > 0


def test_iem_errors_name_the_problem() -> None:
    iem = _iem()
    with pytest.raises(ModelError, match="unknown task kind 'qa'"):
        iem(torch.randn(2, 8), torch.randn(2, 8), "qa")
    with pytest.raises(ModelError, match="unknown branch layout 'dataset'"):
        IEM(8, branches="dataset")
    with pytest.raises(ModelError, match="cache rows have width 20, this IEM expects 12"):
        iem.score_matrix(torch.randn(2, 8), torch.randn(3, 20), "sym")


@pytest.mark.parametrize("residual", ["none", "cosine"])
def test_iem_score_matrix_of_nothing_is_empty(residual: str) -> None:
    iem = _iem(residual)
    cache = iem.passage_cache(torch.randn(3, 8))
    assert iem.score_matrix(torch.randn(0, 8), cache, "sym").shape == (0, 3)
    assert iem.score_matrix(torch.randn(2, 8), cache[:0], "sym").shape == (2, 0)


@pytest.mark.parametrize("branch_format", ["bfloat16", "int8"])
@pytest.mark.parametrize("residual", ["none", "cosine"])
def test_iem_low_precision_branch_scores_close_to_float32(residual: str, branch_format: str) -> None:
    """The inference-only branch formats: only the branch layers change, the logits stay float32
    and within rounding of the float32 ones, in every scoring path."""
    torch.manual_seed(1)
    iem = IEM(32, hidden_size=64, branch_size=48, residual=residual, cosine_scale=3.0)
    with torch.no_grad():
        iem.out.weight.normal_(std=0.2)
    queries, passages = torch.randn(4, 32), torch.randn(50, 32)
    with torch.inference_mode():
        cache = iem.passage_cache(passages)
        expected = iem.score_matrix(queries, cache, "asym")
        rows = iem(queries[[0] * 50], passages, "sym")[0]
        low = copy.deepcopy(iem).set_branch_format(branch_format)
        assert low.branch_format == branch_format and iem.branch_format == "float32"
        assert low.first_a.weight.dtype == low.out.weight.dtype == torch.float32
        torch.testing.assert_close(low.passage_cache(passages), cache)  # the index does not change
        got = low.score_matrix(queries, cache, "asym")
        got_rows = low(queries[[0] * 50], passages, "sym")[0]
    assert got.dtype == got_rows.dtype == torch.float32
    # Rounded (bf16 keeps 8 significant bits, int8 ~7), but only slightly: within 2% of the
    # largest logit.
    assert 0 < (got - expected).abs().max().item() < 0.02 * expected.abs().max().item()
    assert (got_rows - rows).abs().max().item() < 0.02 * rows.abs().max().item()
    with pytest.raises(ModelError, match="branch format must be one of"):
        iem.set_branch_format("float16")
    with pytest.raises(ModelError, match="already"):
        low.set_branch_format("bfloat16" if branch_format == "int8" else "int8")
