"""An evaluation's finished datasets, kept beside its report until the report is written.

``d2llm evaluate`` scores every test set with every system: 12 min of the CPU preset, most of
it in the two IR collections. A run that stops part-way (a crash, Ctrl-C, a Prefect retry)
then scores only the datasets it had not finished: each finished dataset's entry is written to
``<report>.parts/<dataset>.json`` with a fingerprint of everything it was computed from, and
reused only when that fingerprint is unchanged. The folder is removed once the report is written.

The fingerprint covers the config keys of the ``evaluate`` stage (``d2llm.stages``), the d2llm
code, the dataset's prepared table(s), the saved teacher and student folders (contents, less
any training checkpoint) and whether CPU bf16 is in effect on this machine.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from d2llm.jsonfile import write_json

if TYPE_CHECKING:
    from d2llm.config import Params

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python values (json's ``default``)."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in an evaluation part")


class EvaluationParts:
    """The finished dataset entries of one evaluation run, in ``folder``."""

    def __init__(self, folder: Path, inputs: dict[str, Any]):
        self.folder = folder
        self.inputs = inputs  # what every dataset of this run shares

    @classmethod
    def beside(
        cls,
        report: str | Path,
        params: Params,
        teacher_dir: str | Path | None,
        student_dir: str | Path | None,
    ) -> EvaluationParts:
        from d2llm.fingerprint import code_fingerprint, path_fingerprint
        from d2llm.hub import cpu_bf16_allowed
        from d2llm.stages import param_values

        report = Path(report)

        def saved(folder: str | Path | None) -> str | None:
            return None if folder is None else path_fingerprint(folder)

        inputs = {
            "params": param_values("evaluate", params),
            "code": code_fingerprint(),
            "teacher": saved(teacher_dir),
            "student": saved(student_dir),
            "cpu_bf16": cpu_bf16_allowed(),
        }
        return cls(report.with_name(report.name + ".parts"), inputs)

    def _key(self, dataset: str, data: Path) -> str:
        from d2llm.fingerprint import path_fingerprint, value_fingerprint

        return value_fingerprint({**self.inputs, "dataset": dataset, "data": path_fingerprint(data)})

    def get(self, dataset: str, data: Path) -> dict[str, Any] | None:
        """The entry a stopped run finished for ``dataset`` from the same inputs, else None."""
        path = self.folder / f"{dataset}.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("key") != self._key(dataset, data):
            return None
        log.info("evaluation: %s taken from %s (finished by a run that stopped)", dataset, path)
        return saved["entry"]

    def put(self, dataset: str, data: Path, entry: dict[str, Any]) -> None:
        write_json(
            self.folder / f"{dataset}.json", {"key": self._key(dataset, data), "entry": entry}, default=_plain
        )

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
