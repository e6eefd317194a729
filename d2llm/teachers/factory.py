"""Build a teacher from its config, or restore a saved one from its folder: the one place that
knows every teacher kind (``cross_encoder``, ``causal_lm``, and ``per_task``: one of them per
task kind)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from d2llm.config import TASK_KINDS
from d2llm.errors import ModelError
from d2llm.hub import pick_device
from d2llm.teachers.base import Teacher, WeightsKind, saved_config
from d2llm.teachers.causal_lm import CausalLMTeacher
from d2llm.teachers.cross_encoder import CrossEncoderTeacher
from d2llm.teachers.per_task import PerTaskTeacher, is_per_task

if TYPE_CHECKING:
    import torch

    from d2llm.config import TeacherConfig


def load_teacher(
    cfg: TeacherConfig, path: str | Path | None = None, device: str | torch.device = "auto"
) -> Teacher:
    """A teacher from ``cfg`` alone (base model), or restored from a folder saved by ``save_pretrained``.

    A saved folder's ``teacher.json`` decides kind, model, pooling and prompts (they define what
    the weights mean); ``cfg`` still sets batch size and temperature. A folder of one teacher per
    task kind (``teacher.finetune.per_task``) gives a ``PerTaskTeacher`` of its two parts.
    """
    dev = device if not isinstance(device, str) else pick_device(device)
    if path is not None and is_per_task(path):
        return PerTaskTeacher({task: load_teacher(cfg, Path(path) / task, dev) for task in TASK_KINDS})
    weights_dir: Path | None = None
    weights: WeightsKind = "reference"
    if path is not None:
        cfg, weights = saved_config(cfg, path)
        weights_dir = Path(path) if weights != "reference" else None
    if cfg.kind == "cross_encoder":
        return CrossEncoderTeacher.load(cfg, dev, weights_dir)
    if cfg.kind == "causal_lm":
        return CausalLMTeacher.load(cfg, dev, weights_dir, weights)
    raise ModelError(f"unknown teacher kind {cfg.kind!r}")
