"""The fine-tuned teacher's dev report (``dev_report.json`` in its folder), and what it decides.

Written by teacher fine-tuning (d2llm.teachers.finetune): the teacher's dev metrics
(``dev_after``), the plain bi-encoder's on the same pairs (``dev_baseline``) and, with
``teacher.fusion: biencoder``, the fused teacher's (``dev_fused``) and the fusion weights
(``fusion``, read by d2llm.teachers.fusion). Labelling reads it to gate the datasets worth
distilling (``teacher_gains``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from d2llm.jsonfile import write_json

DEV_REPORT_FILE = "dev_report.json"


def write_dev_report(teacher_dir: str | Path, report: dict[str, Any]) -> None:
    write_json(Path(teacher_dir) / DEV_REPORT_FILE, report, indent=1, sort_keys=True)


def read_dev_report(teacher_dir: str | Path) -> dict[str, Any] | None:
    """The teacher's dev metrics against the bi-encoder's, or None for a teacher never fine-tuned."""
    path = Path(teacher_dir) / DEV_REPORT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def teacher_gains(report: dict[str, Any], min_gain: float) -> dict[str, dict[str, Any]]:
    """Per dev set: teacher and bi-encoder dev metric, the gain, and whether it is worth distilling.

    A dataset is distilled only where the fine-tuned teacher beats the plain bi-encoder by at
    least ``min_gain`` points on its dev split: elsewhere the student would learn to be worse.
    """
    # With fusion the fused scores are the teacher that labels the groups: judge those.
    after, base = report.get("dev_fused") or report.get("dev_after", {}), report.get("dev_baseline", {})
    out = {}
    for key, teacher_value in after.items():
        if key == "main" or key not in base:
            continue
        gain = teacher_value - base[key]
        out[key.split("/")[0]] = {
            "metric": key.split("/")[1],
            "teacher": teacher_value,
            "bi-encoder": base[key],
            "gain": gain,
            "distil": bool(gain >= min_gain),
        }
    return out
