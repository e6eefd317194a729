"""Run the D2LLM student under mteb (the benchmark the paper reports through).

mteb's ``EncoderProtocol`` (mteb 2.x) asks for ``encode(inputs, *, task_metadata, hf_split,
hf_subset, prompt_type)``, ``similarity(a, b)`` (matrix) and ``similarity_pairwise(a, b)``
(row-wise). A D2LLM student is not a plain embedding model: its similarity is the IEM logit,
which has one branch per task kind. So this wrapper

- returns the PMA vectors from ``encode`` and remembers the task it was called for;
- scores with the IEM in ``similarity`` / ``similarity_pairwise``: the ``sym`` branch for
  STS and PairClassification tasks, ``asym`` for Retrieval and Reranking (the first argument
  is then the query side, as mteb passes it). Other task types (classification, clustering)
  use only the embeddings; asking them for an IEM similarity is an error.

mteb is NOT a dependency of d2llm: nothing here imports it unless a task is given by name
only (``task_name=...``), to look its type up. ``pip install d2llm[mteb]`` adds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from d2llm.errors import ModelError

if TYPE_CHECKING:
    import torch

# mteb task type -> IEM scoring key (a per-family student has nli and sts branches; the
# paper's two-branch IEM scores both with sym).
TASK_KIND: dict[str, str] = {
    "STS": "sts",
    "PairClassification": "nli",
    "Retrieval": "asym",
    "Reranking": "asym",
    "InstructionRetrieval": "asym",
    "InstructionReranking": "asym",
}


def task_kind(task_type: str) -> str:
    """The IEM branch for an mteb task type; ModelError for types the IEM does not score."""
    try:
        return TASK_KIND[task_type]
    except KeyError:
        raise ModelError(
            f"mteb task type {task_type!r} has no IEM branch: the student scores pairs for "
            f"{sorted(TASK_KIND)} only (use its embeddings for other task types)"
        ) from None


def _texts(inputs: Any) -> list[str]:
    """Sentences from a list of strings or an mteb DataLoader of ``{"text": [...]}`` batches."""
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, Sequence):
        return [str(t) for t in inputs]
    texts: list[str] = []
    for batch in inputs:  # a DataLoader[BatchedInput]
        if not isinstance(batch, Mapping) or "text" not in batch:
            raise ModelError("mteb inputs must be batches with a 'text' field (text-only tasks)")
        texts.extend(str(t) for t in batch["text"])
    return texts


class D2LLMMtebModel:
    """An mteb-compatible encoder around a D2LLM student (or anything with its API)."""

    def __init__(self, student: Any, batch_size: int = 32, task_types: Mapping[str, str] | None = None):
        self.student = student
        self.batch_size = batch_size
        # Task name -> mteb task type, for callers that pass task_name without mteb installed.
        self.task_types = dict(task_types or {})
        self.current_task_type: str | None = None

    # ---- which task are we in

    def _task_type(self, task_metadata: Any, task_name: str | None) -> str | None:
        if task_metadata is not None:
            return str(task_metadata.type)
        if task_name is None:
            return None
        if task_name in self.task_types:
            return self.task_types[task_name]
        try:
            import mteb
        except ImportError:
            raise ModelError(
                f"task {task_name!r}: its type is unknown; install mteb (pip install d2llm[mteb]) "
                "or pass task_types={name: type} to D2LLMMtebModel"
            ) from None
        return str(mteb.get_task(task_name).metadata.type)

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any = None,
        task_name: str | None = None,
        hf_split: str | None = None,
        hf_subset: str | None = None,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """PMA vectors ``[N, d]`` as float32 numpy; records the task for the similarity calls."""
        import torch

        task_type = self._task_type(task_metadata, task_name)
        if task_type is not None:
            self.current_task_type = task_type
        texts = _texts(inputs)
        batch_size = int(kwargs.get("batch_size", self.batch_size))
        with torch.inference_mode():
            return self.student.encode(texts, batch_size=batch_size).float().cpu().numpy()

    # ---- IEM similarity

    def _kind(self) -> str:
        if self.current_task_type is None:
            raise ModelError("similarity needs a task: call encode(..., task_metadata=...) first")
        return task_kind(self.current_task_type)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """IEM logits ``[n1, n2]``: row i scores ``embeddings1[i]`` against every ``embeddings2[j]``."""
        import torch

        kind = self._kind()
        a, b = _as_2d(embeddings1), _as_2d(embeddings2)
        with torch.inference_mode():
            cache = self.student.passage_cache(b)
            return self.student.score_matrix(a, cache, kind).float().cpu().numpy()

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """IEM logits ``[n]`` of the row-aligned pairs ``(embeddings1[i], embeddings2[i])``."""
        import torch

        kind = self._kind()
        a, b = _as_2d(embeddings1), _as_2d(embeddings2)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"similarity_pairwise needs equal row counts, got {a.shape[0]} and {b.shape[0]}")
        with torch.inference_mode():
            return self.student.score_vectors(a, b, kind).reshape(-1).float().cpu().numpy()


def _as_2d(x: Any) -> torch.Tensor:
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.float()
    return t.unsqueeze(0) if t.dim() == 1 else t
