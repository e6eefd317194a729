"""Pooling by Multihead Attention (PMA, Set Transformer): token states -> one vector per text.

One learned seed vector ``S`` queries the token states ``X`` of a text:

    Q = S Wq + bq,  K = X Wk + bk,  V = X Wv + bv            (split into n heads of size d/n)
    A = softmax(Q K^T / sqrt(d/n))  over the text's real tokens (padding masked out)
    O = (A V) Wo + bo

``init="random"`` (the paper, post-LayerNorm as in the Set Transformer):

    H = LN1(Q + O),   out = LN2(H + FFN(H))

``init="mean"`` starts as mean pooling, exactly. A LayerNorm cannot be the identity for every
input (it removes each vector's mean and scale), so this option uses the pre-LayerNorm layout,
where every residual path is an identity and the norm sits inside the FFN branch:

    H = Q + O,        out = H + FFN(LN(H))

and initialises ``Wq = bq = 0`` (every score is 0: uniform attention over the real tokens),
``Wv = Wo = I`` and ``bv = bo = 0`` (O = mean of X), and the FFN's last layer to zero
(FFN(.) = 0). Then ``out = mean(X)``. Nothing is stuck at zero: Wq gets a gradient through
``S`` (random, non-zero), and the FFN's last layer through its non-zero hidden activations.

FFN(x) = W2 ReLU(W1 x + b1) + b2, both layers d x d.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from d2llm.errors import ModelError


class PMA(nn.Module):
    """One-seed multi-head attention pooling with a residual FFN block."""

    def __init__(self, dim: int, num_heads: int = 8, init: Literal["random", "mean"] = "random") -> None:
        super().__init__()
        if dim % num_heads:
            raise ModelError(f"PMA: hidden size {dim} is not divisible by student.pma.num_heads={num_heads}")
        if init not in ("random", "mean"):
            raise ModelError(f"PMA: unknown init {init!r}; expected 'random' or 'mean'")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.init_mode = init
        self.pre_norm = init == "mean"
        self.seed = nn.Parameter(torch.empty(1, dim))
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.norm_ffn = nn.LayerNorm(dim)
        # The post-norm layout also normalises the attention block's output.
        self.norm_attn = None if self.pre_norm else nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.seed)
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.o_proj, *self.ffn[::2]):
            layer.reset_parameters()
        if self.init_mode == "mean":
            nn.init.zeros_(self.q_proj.weight)
            nn.init.zeros_(self.q_proj.bias)
            for layer in (self.v_proj, self.o_proj):
                with torch.no_grad():
                    layer.weight.copy_(torch.eye(self.dim))
                nn.init.zeros_(layer.bias)
            nn.init.zeros_(self.ffn[2].weight)
            nn.init.zeros_(self.ffn[2].bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        """[B, T, d] -> [B, heads, T, head_dim]."""
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, states: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The seed's attention over the tokens: returns (projected query [B, d], output O [B, d])."""
        b = states.shape[0]
        query = self.q_proj(self.seed).expand(b, 1, self.dim)  # [B, 1, d]
        q = self._split_heads(query)  # [B, h, 1, hd]
        k = self._split_heads(self.k_proj(states))  # [B, h, T, hd]
        v = self._split_heads(self.v_proj(states))
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)  # [B, h, 1, T]
        pad = ~attention_mask.bool()[:, None, None, :]
        # Softmax in float32: -inf on padding would give NaN for an all-padding row, the finite
        # minimum gives uniform weights there instead (such rows are never real texts).
        scores = scores.masked_fill(pad, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        heads = weights @ v  # [B, h, 1, hd]
        out = heads.transpose(1, 2).reshape(b, 1, self.dim)
        return query.squeeze(1), self.o_proj(out).squeeze(1)

    def forward(self, states: Tensor, attention_mask: Tensor) -> Tensor:
        """``states [B, T, d]`` (token states), ``attention_mask [B, T]`` (1 = real token) -> ``[B, d]``."""
        if states.shape[-1] != self.dim:
            raise ModelError(f"PMA built for width {self.dim} got token states of width {states.shape[-1]}")
        query, attended = self.attend(states, attention_mask)
        if self.pre_norm:
            h = query + attended
            return h + self.ffn(self.norm_ffn(h))
        h = self.norm_attn(query + attended)
        return self.norm_ffn(h + self.ffn(h))


def mean_pool(states: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the real tokens' states: the plain bi-encoder pooling the student starts from."""
    mask = attention_mask.to(states.dtype).unsqueeze(-1)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
