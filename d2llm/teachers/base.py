"""The teacher contract: pairs of texts in, ``[z_yes, z_no]`` logits (and features) out.

Any scorer with this contract can teach the student: a causal LM read as a yes/no judge
(``causal_lm.py``) or an encoder with a 2-way head (``cross_encoder.py``). A saved teacher is a
folder with ``teacher.json`` (kind, model reference, pooling, prompts, what weights are stored)
and safetensors weights; ``d2llm.teachers.factory.load_teacher`` restores either kind from it.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from d2llm.batching import Encoding, map_batched
from d2llm.config import TaskKind
from d2llm.errors import ModelError
from d2llm.hub import cpu_bf16_active
from d2llm.teachers.probe import MIN_AGREEMENT, PROBE_PAIRS, agreement

if TYPE_CHECKING:
    import torch

    from d2llm.config import TeacherConfig

log = logging.getLogger(__name__)

TEACHER_JSON = "teacher.json"
PER_TASK_KIND = "per_task"  # teacher.json of one teacher per task kind (d2llm.teachers.per_task)
Pair = tuple[str, str]
WeightsKind = Literal["reference", "full", "lora"]


@dataclass
class TeacherOutput:
    logits: torch.Tensor  # [N, 2] = [z_yes, z_no]
    features: torch.Tensor | None = None  # [N, D]


def log_odds(logits: torch.Tensor) -> np.ndarray:
    """The teacher's yes/no log-odds ``z_yes - z_no`` of logits ``[N, 2]``, as float64 numpy."""
    return (logits[:, 0] - logits[:, 1]).double().cpu().numpy()


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Teacher probability of "yes": ``softmax(logits / T)[:, 0]``."""
    import torch

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits.float() / temperature, dim=-1)[:, 0]


class Teacher(ABC):
    """Common scoring loop; subclasses encode pairs into token ids and run the forward pass."""

    kind: str
    padding_side: Literal["left", "right"] = "right"
    quantization: str = "none"  # "int8" or "bf16" after quantize()

    def __init__(self, cfg: TeacherConfig, tokenizer: Any, device: torch.device) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device

    # ---- what each kind defines

    @abstractmethod
    def encode_pairs(self, pairs: Sequence[Pair], task: TaskKind) -> list[Encoding]:
        """Token ids (and other model inputs) of each pair, unpadded, within max_length."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[n, 2]`` and features ``[n, D]`` of one padded batch (differentiable)."""

    @abstractmethod
    def modules(self) -> list[torch.nn.Module]:
        """The torch modules holding the teacher's weights (for train/eval and devices)."""

    @abstractmethod
    def _save_weights(self, out_dir: Path) -> WeightsKind:
        """Write the weights (safetensors) and tokenizer to ``out_dir``; say what was stored."""

    # ---- shared behaviour

    def train(self, mode: bool = True) -> Teacher:
        for module in self.modules():
            module.train(mode)
        return self

    def eval(self) -> Teacher:
        return self.train(False)

    def score(
        self,
        pairs: Sequence[Pair],
        task: TaskKind,
        with_features: bool = False,
        show_progress: bool | None = None,
    ) -> TeacherOutput:
        """Teacher logits of ``pairs`` (no grad, eval mode), in input order.

        ``show_progress=None`` shows a bar only for work large enough to be worth watching.
        """
        import torch

        if task not in ("sym", "asym"):
            raise ValueError(f"task must be 'sym' or 'asym', got {task!r}")
        if not pairs:
            empty = torch.empty((0, 2))
            return TeacherOutput(empty, torch.empty((0, 0)) if with_features else None)
        self.eval()
        encodings = self.encode_pairs(pairs, task)
        if show_progress is None:
            show_progress = len(pairs) > 20 * self.cfg.batch_size
        # bf16 autocast on CUDA always; on a CPU only when asked (quantize("bf16")): float32 there
        # is exact and comparable, bf16 ~2x faster where the CPU has AVX512-BF16 or AMX.
        bf16 = self._autocasts_bf16()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

        def run(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            logits, feats = self.forward({k: v.to(self.device) for k, v in batch.items()})
            return (logits.float(), feats.float()) if with_features else (logits.float(),)

        with torch.inference_mode(), autocast:
            outputs = map_batched(
                encodings,
                run,
                batch_size=self.cfg.batch_size,
                pad_id=self.tokenizer.pad_token_id,
                side=self.padding_side,
                show_progress=show_progress,
                desc=f"teacher {self.kind}",
            )
        return TeacherOutput(outputs[0], outputs[1] if with_features else None)

    def scoring_info(self) -> dict[str, str]:
        """The engine that computes the scores, its version and dtype (recorded in labels.json)."""
        import torch
        import transformers

        return {
            "engine": "hf",
            "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "dtype": "bfloat16 (autocast)" if self._autocasts_bf16() else "float32",
            **({"quantization": "int8 dynamic (Linear layers)"} if self.quantization == "int8" else {}),
        }

    def _autocasts_bf16(self) -> bool:
        if self.device.type == "cuda":
            return True
        return cpu_bf16_active(self.device, self.quantization == "bf16")

    def quantize(self, kind: str) -> Teacher:
        """In place, for scoring only (labelling, test rows), the teacher's number format on a
        CPU: ``"int8"`` dynamically quantises every Linear layer of its modules, ``"bf16"`` runs
        its forward passes under bf16 autocast (weights stay float32), ``"none"`` leaves it as
        it is. Returns self.

        Both are CPU options: on a GPU the teacher keeps its dtype (``score`` autocasts to bf16
        there already), with a warning.

        The changed teacher must still judge as the float32 one does: its log-odds on the
        fixed probe pairs (``d2llm.teachers.probe``) must correlate at ``MIN_AGREEMENT`` or more
        with the float32 ones, else a ``ModelError`` says so before anything is scored with it
        (decoder LLMs fail this under int8: their activation outliers do not survive it; they
        pass under bf16, the format they were trained in).
        """
        from d2llm.quantization import apply_quantization

        if kind == "none":
            return self
        if kind not in ("int8", "bf16"):
            raise ModelError(f"unknown teacher quantization {kind!r}: use none, int8 or bf16")
        if self.device.type != "cpu":
            log.warning("%s is a CPU option: the teacher on %s stays as is", kind, self.device)
            return self
        before = self._probe_log_odds()
        if kind == "int8":
            for module in self.modules():
                apply_quantization(module, kind, inplace=True)
        self.quantization = kind
        r = agreement(before, self._probe_log_odds())
        if r < MIN_AGREEMENT:
            other = ", or try bf16 (probed the same way)" if kind == "int8" else ""
            raise ModelError(
                f"{kind} quantisation changes this teacher's judgement: its log-odds on "
                f"{before.size} probe pairs correlate with the float32 ones at r = {r:.2f} (at least "
                f"{MIN_AGREEMENT} needed), so its labels would be noise. Score it in float32: set "
                f"labelling.quantization and evaluation.teacher_quantization to none{other}."
            )
        log.info("%s teacher: log-odds agree with float32 at r = %.3f on the probe pairs", kind, r)
        return self

    def _probe_log_odds(self) -> np.ndarray:
        """``z_yes - z_no`` on the probe pairs of both task kinds, in a fixed order."""
        scores = [self.score(pairs, task, show_progress=False).logits for task, pairs in PROBE_PAIRS.items()]
        return np.concatenate([log_odds(logits) for logits in scores])

    def describe(self) -> dict[str, Any]:
        """What ``teacher.json`` records besides the weights kind."""
        return {
            "kind": self.kind,
            "model": self.cfg.model,
            "gguf_file": self.cfg.gguf_file,
            "pooling": self.cfg.pooling,
            "max_length": self.cfg.max_length,
            "prompts": self.cfg.prompts.model_dump(),
        }

    def save_pretrained(self, out_dir: str | Path, include_weights: bool = True) -> Path:
        """Save the teacher to ``out_dir``; without weights only the model reference is kept."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        weights: WeightsKind = self._save_weights(out_dir) if include_weights else "reference"
        meta = {**self.describe(), "weights": weights}
        (out_dir / TEACHER_JSON).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        return out_dir


def read_teacher_json(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TEACHER_JSON
    if not file.is_file():
        raise ModelError(f"{path} is not a saved teacher: {TEACHER_JSON} is missing")
    return json.loads(file.read_text(encoding="utf-8"))


def saved_config(cfg: TeacherConfig, path: str | Path) -> tuple[TeacherConfig, WeightsKind]:
    """``cfg`` with what the saved teacher at ``path`` fixes (kind, model, prompts...); its weights kind."""
    meta = read_teacher_json(path)
    if meta.get("kind") == PER_TASK_KIND:
        raise ModelError(
            f"{path} holds one teacher per task kind (sym/, asym/): load it with "
            "d2llm.teachers.factory.load_teacher, or name one part's folder"
        )
    updated = cfg.model_copy(
        update={
            "kind": meta["kind"],
            "model": meta["model"],
            "gguf_file": meta.get("gguf_file"),
            "pooling": meta["pooling"],
            "max_length": meta["max_length"],
            "prompts": type(cfg.prompts).model_validate(meta["prompts"]),
        }
    )
    return updated, meta["weights"]
