"""Interaction Emulation Module (IEM): a small MLP that maps two text vectors to a yes/no logit.

    h   = ReLU(W1a e_a + W1b e_b + b1)          shared first layer, split by side
    u_t = ReLU(W_t h + b_t)                      one branch per task kind t in {sym, asym}
    z   = w . u_t + c                            output layer shared by the branches

``branches="family"`` (``student.iem.branches``; the paper has one sym branch) splits the sym
branch in two: ``nli`` for yes/no judgements (entailment, paraphrase) and ``sts`` for graded
relatedness, which disagree on related pairs that contradict each other. Callers pass the
finest key they know (:data:`SCORING_KEYS`); :meth:`IEM.branch_for` maps it onto this IEM's
branches (``nli``/``sts`` -> ``sym`` for the paper's layout; ``sym`` -> ``sts`` for the
per-family one, relatedness being the generic symmetric score).

``W1 [e_a; e_b] = W1a e_a + W1b e_b``, so the passage side ``W1b e_b`` is computed once per
passage and stored with the index (:meth:`IEM.passage_cache`); scoring a query against N
cached passages then costs N additions, ReLUs and two small matrix products.

``residual="cosine"`` adds ``scale * cos(e_a, e_b)`` (``scale`` learnable) and zero-initialises
the output layer, so the untrained student scores exactly like the bi-encoder it starts from.
The cache then also stores the unit passage vector: ``cache = [W1b e_b ; e_b / |e_b|]``.

Scoring N cached passages is bound by one matrix product: the branch layer ``W_t h`` over N rows
(N x hidden x branch multiply-adds; everything else is element-wise or a vector product). For
inference only, :meth:`IEM.set_branch_format` may run that layer in bfloat16 (half the time on
a CPU with AVX512-BF16) or as an int8 dynamically quantised layer (about a quarter); the first
layer, the output layer and the cosine residual stay float32, so logits keep float32
resolution and only the branch activations are rounded (approximations, off by default:
``student.iem.inference_dtype``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2llm.errors import ModelError

TASKS = ("sym", "asym")
BRANCH_LAYOUTS = {"task": TASKS, "family": ("nli", "sts", "asym")}  # student.iem.branches
SCORING_KEYS = ("sym", "asym", "nli", "sts")  # what callers may pass as ``task``
BRANCH_FORMATS = ("float32", "bfloat16", "int8")  # student.iem.inference_dtype


class IEM(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden_size: int = 512,
        branch_size: int = 512,
        residual: Literal["none", "cosine"] = "none",
        cosine_scale: float = 20.0,
        branches: Literal["task", "family"] = "task",
    ) -> None:
        super().__init__()
        if residual not in ("none", "cosine"):
            raise ModelError(f"IEM: unknown residual {residual!r}; expected 'none' or 'cosine'")
        if branches not in BRANCH_LAYOUTS:
            raise ModelError(f"IEM: unknown branch layout {branches!r}; expected {list(BRANCH_LAYOUTS)}")
        self.dim, self.hidden_size, self.branch_size, self.residual = dim, hidden_size, branch_size, residual
        self.first_a = nn.Linear(dim, hidden_size)  # W1a, b1
        self.first_b = nn.Linear(dim, hidden_size, bias=False)  # W1b (the bias lives on the query side)
        names = BRANCH_LAYOUTS[branches]
        self.branches = nn.ModuleDict({t: nn.Linear(hidden_size, branch_size) for t in names})
        self.out = nn.Linear(branch_size, 1)
        if residual == "cosine":
            self.cosine_scale = nn.Parameter(torch.tensor(float(cosine_scale)))
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        else:
            self.register_parameter("cosine_scale", None)
        self.branch_format = "float32"  # see set_branch_format
        # Training only (training.iem_detach): the MLP's inputs are detached, so its gradient
        # stops at the IEM; the cosine residual keeps the vectors' gradient.
        self.detach_inputs = False

    def set_branch_format(self, name: str) -> IEM:
        """In place, for inference: the number format of the branch layers, ``"float32"`` (as
        trained), ``"bfloat16"`` (weights and products in bf16) or ``"int8"`` (dynamically
        quantised: int8 weights per output row, activations quantised per call).

        Only for an IEM that no longer trains (the merged student calls it): the rounded
        weights replace the float32 ones, so the format can be set once. Returns self.
        """
        if name not in BRANCH_FORMATS:
            raise ModelError(f"IEM branch format must be one of {list(BRANCH_FORMATS)}, got {name!r}")
        if name == self.branch_format:
            return self
        if self.branch_format != "float32":
            raise ModelError(f"the IEM branch is already {self.branch_format}; load the student again")
        if name == "bfloat16":
            self.branches.to(torch.bfloat16)
        else:
            from d2llm.quantization import quantize_linear_int8

            quantize_linear_int8(self.branches, inplace=True)
        self.branch_format = name
        return self

    @property
    def cache_size(self) -> int:
        """Width of one cached passage row."""
        return self.hidden_size + (self.dim if self.residual == "cosine" else 0)

    def passage_cache(self, e_b: Tensor) -> Tensor:
        """``[N, d] -> [N, cache_size]``: ``W1b e_b`` (and the unit vector for the cosine residual)."""
        projected = self.first_b(self._mlp_input(e_b))
        if self.residual == "cosine":
            return torch.cat([projected, F.normalize(e_b, dim=-1)], dim=-1)
        return projected

    def _mlp_input(self, vectors: Tensor) -> Tensor:
        """What the MLP reads: the vectors, detached while ``detach_inputs`` (training.iem_detach)."""
        return vectors.detach() if self.detach_inputs else vectors

    def _split_cache(self, cache_b: Tensor) -> tuple[Tensor, Tensor | None]:
        if cache_b.shape[-1] != self.cache_size:
            raise ModelError(
                f"passage cache rows have width {cache_b.shape[-1]}, this IEM expects {self.cache_size}: "
                "was the index built with another student?"
            )
        if self.residual == "cosine":
            return cache_b[..., : self.hidden_size], cache_b[..., self.hidden_size :]
        return cache_b, None

    def branch_for(self, key: str) -> str:
        """The branch that scores ``key`` (a task kind or a family; see the module docstring)."""
        if key in self.branches:
            return key
        if key in ("nli", "sts") and "sym" in self.branches:
            return "sym"
        if key == "sym" and "sts" in self.branches:
            return "sts"
        raise ModelError(f"unknown task kind {key!r}; expected one of {list(SCORING_KEYS)}")

    def _branch(self, task: str) -> nn.Linear:
        return self.branches[self.branch_for(task)]

    def _head(self, a_part: Tensor, b_part: Tensor, task: str) -> tuple[Tensor, Tensor]:
        """``a_part`` + ``b_part`` (broadcast) -> (z, u): the layers after the split first layer."""
        branch = self._branch(task)
        h = torch.relu(a_part + b_part)
        if self.branch_format == "bfloat16":
            h = h.to(torch.bfloat16)
        u = torch.relu(branch(h))
        return self.out(u.to(self.out.weight.dtype)).squeeze(-1), u

    def forward_cached(self, e_a: Tensor, cache_b: Tensor, task: str) -> tuple[Tensor, Tensor]:
        """Row-wise: ``e_a [N, d]`` against ``cache_b [N, cache_size]`` -> ``(z [N], u [N, branch])``."""
        b_part, unit_b = self._split_cache(cache_b)
        z, u = self._head(self.first_a(self._mlp_input(e_a)), b_part, task)
        if unit_b is not None:
            z = z + self.cosine_scale * (F.normalize(e_a, dim=-1) * unit_b).sum(-1)
        return z, u

    def forward(self, e_a: Tensor, e_b: Tensor, task: str) -> tuple[Tensor, Tensor]:
        """Row-wise, uncached: ``(z [N], u [N, branch])`` for the pairs (e_a[i], e_b[i])."""
        return self.forward_cached(e_a, self.passage_cache(e_b), task)

    def score_matrix(self, e_a: Tensor, cache_b: Tensor, task: str, chunk_size: int = 65_536) -> Tensor:
        """Every query against every cached passage: ``[Q, d] x [N, cache_size] -> [Q, N]``.

        The hidden activations of a block are ``[q, n, hidden]``; blocks hold at most
        ``chunk_size`` (query, passage) pairs, so memory stays bounded for any Q and N.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        b_part, unit_b = self._split_cache(cache_b)
        num_q, num_n = e_a.shape[0], cache_b.shape[0]
        if num_q == 0 or num_n == 0:
            return e_a.new_zeros(num_q, num_n)
        a_part = self.first_a(e_a)  # [Q, hidden]
        unit_a = F.normalize(e_a, dim=-1) if unit_b is not None else None
        n_step = min(num_n, chunk_size)
        q_step = max(1, chunk_size // n_step)
        rows = []
        for q0 in range(0, num_q, q_step):
            cols = []
            for n0 in range(0, num_n, n_step):
                a_blk, b_blk = a_part[q0 : q0 + q_step, None, :], b_part[None, n0 : n0 + n_step, :]
                z, _ = self._head(a_blk, b_blk, task)  # [q, n]
                if unit_a is not None:
                    z = z + self.cosine_scale * (unit_a[q0 : q0 + q_step] @ unit_b[n0 : n0 + n_step].T)
                cols.append(z)
            rows.append(torch.cat(cols, dim=1))
        return torch.cat(rows, dim=0)


def move_iem_(iem: IEM, start: dict[str, Tensor], end: dict[str, Tensor], weight: float) -> None:
    """In place: every IEM weight becomes ``start + weight * (end - start)`` (``state_dict`` keys).

    ``weight`` 0 is the start (with ``residual="cosine"``: the bi-encoder's cosine), 1 the end,
    above 1 beyond it along the same line (d2llm.training, ``training.iem_weights``).
    """
    with torch.no_grad():
        for name, param in iem.state_dict(keep_vars=True).items():
            param.copy_(start[name] + weight * (end[name] - start[name]))
