"""Where each pipeline artefact lives by default (relative to the project root).

The CLI defaults, the Prefect flow and dvc.yaml use these same locations.
"""

from __future__ import annotations

from pathlib import Path

# The data catalogue: what `d2llm fetch-data` puts into data.raw_dir and how it checks it.
CATALOG = Path("data/raw/catalog.yaml")
NEGATIVES = Path("data/negatives/negatives.parquet")
TEACHER_DIR = Path("models/teacher")
LABELS_DIR = Path("data/labels")
STUDENT_DIR = Path("models/student")
INDEX_ROOT = Path("index")
REPORTS_DIR = Path("reports")
TRAIN_METRICS = REPORTS_DIR / "train_metrics.json"
TEACHER_METRICS = REPORTS_DIR / "teacher_metrics.json"
PLOTS_DIR = REPORTS_DIR / "plots"
