"""The fine-tuned teacher's dev report (``dev_report.json`` in its folder), and what it decides.

Written by teacher fine-tuning (d2llm.teachers.finetune): the teacher's dev metrics
(``dev_after``), the plain bi-encoder's on the same pairs (``dev_baseline``) and, with
``teacher.fusion: biencoder``, the fused teacher's (``dev_fused``) and the fusion weights
(``fusion``, read by d2llm.teachers.fusion), all on the *select* parts of the dev splits, and
the same three on the *validate* parts (``validate_after``, ``validate_baseline``,
``validate_fused``: the fusion weights fitted on select, applied there). Labelling reads it to
gate the datasets worth distilling (``teacher_gains``, on validate).
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


def teacher_gains(report: dict[str, Any], min_gain: float | None = None) -> dict[str, dict[str, Any]]:
    """Per dev set: teacher and bi-encoder metric, the gain, and (given ``min_gain``) whether it is
    worth distilling.

    A dataset is distilled only where the fine-tuned teacher beats the plain bi-encoder by at
    least ``min_gain`` points: elsewhere the student would learn to be worse. The gain is read on
    the *validate* parts of the dev splits (``validate_*``): the select parts chose the teacher's
    epoch and fusion weights, and on them the fused gain is >= 0 by construction (``w = 1`` is
    the bi-encoder). Reports written before the split have only the select figures (``dev_*``).
    With fusion the fused scores are the teacher that labels the groups: those are judged.
    """
    part = "validate" if "validate_baseline" in report else "dev"
    teacher = report.get(f"{part}_fused") or report.get(f"{part}_after", {})
    base = report.get(f"{part}_baseline", {})
    out = {}
    for key, teacher_value in teacher.items():
        if key == "main" or key not in base:
            continue
        gain = teacher_value - base[key]
        out[key.split("/")[0]] = {
            "metric": key.split("/")[1],
            "part": "validate" if part == "validate" else "select",
            "teacher": teacher_value,
            "bi-encoder": base[key],
            "gain": gain,
        }
        if min_gain is not None:
            out[key.split("/")[0]]["distil"] = bool(gain >= min_gain)
    return out


def format_dev_table(report: dict[str, Any]) -> str:
    """The teacher against the bi-encoder per dev set, raw and fused, on both parts of the dev
    splits (select: what chose the epoch and weights; validate: what nothing was tuned on), in
    points, as a markdown table."""
    parts = [p for p in ("dev", "validate") if f"{p}_baseline" in report]
    header = ["dev set"]
    for part in parts:
        label = "select" if part == "dev" else "validate"
        header += [f"{label}: bi-encoder", f"{label}: raw teacher", f"{label}: fused teacher"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    names = [k for k in report.get("dev_baseline", {}) if k != "main"]
    for name in [*names, "main"]:
        cells = [name if name != "main" else "mean"]
        for part in parts:
            for key in ("baseline", "after", "fused"):
                value = report.get(f"{part}_{key}", {}).get(name)
                cells.append("-" if value is None else f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
