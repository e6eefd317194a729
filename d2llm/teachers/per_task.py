"""One teacher per task kind (``teacher.finetune.per_task``): the sym teacher judges sentence
pairs (NLI, STS), the asym one ranks answers and passages (QA, IR).

A single fine-tuned head serves both kinds in the paper. A teacher trained on the QA datasets
alone ranks better than one that also learns entailment and similarity (docs/results.md, "A
teacher per task kind"), and the student's asym branch learns from its labels. Each part is an
ordinary teacher; this class only routes a pair to the part of its task.

Saved layout: ``teacher.json`` (kind ``per_task``), and one saved teacher per part in ``sym/``
and ``asym/``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm.batching import Encoding
from d2llm.config import TASK_KINDS, TaskKind
from d2llm.errors import ModelError
from d2llm.teachers.base import PER_TASK_KIND, TEACHER_JSON, Pair, Teacher, TeacherOutput, WeightsKind

if TYPE_CHECKING:
    import torch


class PerTaskTeacher(Teacher):
    """Routes ``score(pairs, task)`` to the teacher of ``task``; both parts share one config."""

    kind = PER_TASK_KIND

    def __init__(self, parts: dict[TaskKind, Teacher]) -> None:
        if set(parts) != set(TASK_KINDS):
            raise ModelError(f"a per-task teacher needs parts {TASK_KINDS}, got {sorted(parts)}")
        sym = parts["sym"]
        super().__init__(sym.cfg, sym.tokenizer, sym.device)
        self.parts = parts
        self.padding_side = sym.padding_side

    def part(self, task: TaskKind) -> Teacher:
        if task not in self.parts:
            raise ValueError(f"task must be 'sym' or 'asym', got {task!r}")
        return self.parts[task]

    def score(
        self,
        pairs: Sequence[Pair],
        task: TaskKind,
        with_features: bool = False,
        show_progress: bool | None = None,
    ) -> TeacherOutput:
        return self.part(task).score(pairs, task, with_features, show_progress)

    def encode_pairs(self, pairs: Sequence[Pair], task: TaskKind) -> list[Encoding]:
        return self.part(task).encode_pairs(pairs, task)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # A padded batch does not say which task it holds; score() does.
        raise ModelError("a per-task teacher scores through score(pairs, task), or one part's forward")

    def modules(self) -> list[torch.nn.Module]:
        return [m for task in TASK_KINDS for m in self.parts[task].modules()]

    def scoring_info(self) -> dict[str, str]:
        return {**self.parts["sym"].scoring_info(), "teachers": "one per task kind (sym, asym)"}

    def quantize(self, kind: str) -> PerTaskTeacher:
        """Each part in ``kind``, each checked on the probe pairs (``Teacher.quantize``)."""
        for task in TASK_KINDS:
            self.parts[task].quantize(kind)
        self.quantization = self.parts["sym"].quantization
        return self

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "parts": list(TASK_KINDS), "model": self.cfg.model}

    def _save_weights(self, out_dir: Path) -> WeightsKind:
        for task in TASK_KINDS:
            self.parts[task].save_pretrained(out_dir / task)
        return "full"


def is_per_task(path: str | Path) -> bool:
    """Whether the saved teacher at ``path`` is a per-task one (its ``teacher.json`` says so)."""
    file = Path(path) / TEACHER_JSON
    return file.is_file() and json.loads(file.read_text(encoding="utf-8")).get("kind") == PER_TASK_KIND
