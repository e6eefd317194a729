"""The learning-rate schedule shared by teacher fine-tuning and student distillation."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor at each step: linear warm-up to 1 over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(total_steps - warmup_steps, 1))

    return factor


def warmup_decay_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """``linear_warmup_decay`` over ``total_steps``, the first ``warmup_ratio`` of them warming up."""
    import torch

    factor = linear_warmup_decay(total_steps, int(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
