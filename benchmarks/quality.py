"""The quality table of the default preset: bi-encoder baseline / teacher / student, side by side.

Rows: each evaluation dataset's main metric (STS-B test Spearman, SICK NLI AP, SICK-R Spearman,
Cranfield and CISI nDCG@10 with the default params), in points (x100), plus the fraction of the
teacher's gain over the baseline that the student recovers: (student - base) / (teacher - base).

The numbers come from the pipeline's evaluate stage (``evaluation.output``, reports/metrics.json)
when that file is fresh: newer than params.yaml and than every file of the student and teacher
folders, and written for those same folders. Otherwise ``d2llm.evaluation.evaluate.evaluate_systems``
runs now (``--force`` always re-evaluates) and its JSON goes next to this benchmark's, never over
the pipeline's file.

    python -m benchmarks.quality [--student-dir models/student] [--teacher-dir models/teacher]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from d2llm import layout

NAME = "quality"
SYSTEMS = ("bi-encoder", "teacher", "student")
LABELS = {  # dataset -> how the table names it
    "stsb_en": "STS-B",
    "sick": "SICK NLI",
    "sick_r": "SICK-R",
    "cranfield": "Cranfield",
    "cisi": "CISI",
}
METRIC_LABELS = {"ap": "AP", "spearman": "Spearman", "ndcg@10": "nDCG@10", "accuracy": "Acc"}

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--metrics", type=Path, default=None, help="evaluate output (default: evaluation.output)")
    p.add_argument("--student-dir", type=Path, default=layout.STUDENT_DIR, help="trained student")
    p.add_argument("--teacher-dir", type=Path, default=layout.TEACHER_DIR, help="saved teacher")
    p.add_argument("--force", action="store_true", help="evaluate now even if the metrics file is fresh")
    p.add_argument("--max-pairs", type=int, default=None, help="sample of each test split (when evaluating)")
    p.add_argument("--max-queries", type=int, default=None, help="sample of each IR query set (idem)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- freshness


def _newest_mtime(paths: Sequence[Path]) -> float:
    times = []
    for path in paths:
        if path.is_dir():
            times += [f.stat().st_mtime for f in path.rglob("*") if f.is_file()]
        elif path.is_file():
            times.append(path.stat().st_mtime)
    return max(times, default=0.0)


def freshness(
    metrics_path: Path, student_dir: Path | None, teacher_dir: Path | None, params_path: Path
) -> tuple[bool, str]:
    """Whether ``metrics_path`` can be reused as it is, and why (not)."""
    if not metrics_path.is_file():
        return False, f"{metrics_path} does not exist"
    try:
        results = json.loads(metrics_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return False, f"{metrics_path} is not valid JSON ({err})"
    if not isinstance(results, dict) or not {"datasets", "systems"} <= set(results):
        return False, f"{metrics_path} is not an evaluation result (no datasets/systems)"
    sources = results.get("sources", {})
    for key, wanted in (("student_dir", student_dir), ("teacher_dir", teacher_dir)):
        recorded = sources.get(key)
        if wanted is not None and recorded is not None and Path(recorded).resolve() != Path(wanted).resolve():
            return False, f"{metrics_path} was written for {key} {recorded}, not {wanted}"
    inputs = [p for p in (student_dir, teacher_dir, params_path) if p is not None]
    newest = _newest_mtime(inputs)
    if metrics_path.stat().st_mtime < newest:
        return False, f"{metrics_path} is older than the student, teacher or params it depends on"
    return True, f"{metrics_path} is newer than the student, teacher and params"


# --------------------------------------------------------------------------- the table


def recovered(baseline: float | None, teacher: float | None, student: float | None) -> float | None:
    """The student's share of the teacher's gain, by the evaluation report's rule: none where the
    teacher wins by ``RECOVERY_MIN_GAIN`` points or less (the report and this table must agree)."""
    from d2llm.evaluation.evaluate import RECOVERY_MIN_GAIN
    from d2llm.evaluation.metrics import gain_recovered

    return gain_recovered(baseline, teacher, student, RECOVERY_MIN_GAIN)


def quality_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per dataset: main metric of each system and the student's recovered gain."""
    rows = []
    for name, entry in results["datasets"].items():
        main = entry["main_metric"]
        values = {s: entry["metrics"].get(s, {}).get(main) for s in SYSTEMS}
        rows.append(
            {
                "dataset": name,
                "label": LABELS.get(name, name),
                "metric": main,
                **values,
                "recovered": recovered(values["bi-encoder"], values["teacher"], values["student"]),
            }
        )
    return rows


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over datasets (only for a system with a number on every row)."""
    means = {}
    for s in SYSTEMS:
        values = [r[s] for r in rows]
        means[s] = float(np.mean(values)) if values and all(v is not None for v in values) else None
    share = recovered(means["bi-encoder"], means["teacher"], means["student"])
    return {"dataset": "mean", "label": "mean", "metric": "main", **means, "recovered": share}


def load_or_evaluate(args: argparse.Namespace, params: Any) -> tuple[dict[str, Any], str]:
    from d2llm.evaluation.evaluate import evaluate_systems

    metrics_path = args.metrics or params.evaluation.output
    fresh, reason = freshness(metrics_path, args.student_dir, args.teacher_dir, args.params)
    if fresh and not args.force:
        log.info("reading %s: %s", metrics_path, reason)
        return json.loads(metrics_path.read_text(encoding="utf-8")), f"read {metrics_path} ({reason})"
    why = "--force" if fresh else reason
    log.info("evaluating now: %s", why)
    evaluation = params.evaluation.model_copy(
        update={k: v for k, v in (("max_pairs", args.max_pairs), ("max_queries", args.max_queries)) if v}
    )
    params = params.model_copy(update={"evaluation": evaluation})
    output = args.out_dir / f"{NAME}_metrics.json"
    results = evaluate_systems(
        params,
        args.prepared_dir or params.data.prepared_dir,
        args.teacher_dir,
        args.student_dir,
        output=output,
    )
    return results, f"evaluated now ({why}); full results in {output}"


def print_report(report: dict[str, Any]) -> None:
    def pts(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    header = ["dataset", "metric", *SYSTEMS, "student recovers"]
    rows = [
        [r["label"], METRIC_LABELS.get(r["metric"], r["metric"]), *[pts(r[s]) for s in SYSTEMS],
         "-" if r["recovered"] is None else f"{r['recovered']:.0%}"]
        for r in [*report["rows"], report["mean"]]
    ]  # fmt: skip
    print(f"\nQuality of the default preset (points; {report['source']})")
    print(common.format_table(header, rows))
    for note in report["notes"]:
        print(f"note: {note}")


def plot(report: dict[str, Any], path: Path) -> Path:
    rows = report["rows"]
    fig, ax = common.new_figure(max(6.0, 1.4 * len(rows)), 4.0)
    x = np.arange(len(rows))
    width = 0.27
    for i, s in enumerate(SYSTEMS):
        values = [np.nan if r[s] is None else r[s] for r in rows]
        ax.bar(x + (i - 1) * width, values, width, label=s)
    for i, r in enumerate(rows):
        if r["recovered"] is not None:
            top = max(v for v in (r[s] for s in SYSTEMS) if v is not None)
            ax.annotate(f"{r['recovered']:.0%}", (x[i], top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{r['label']}\n{METRIC_LABELS.get(r['metric'], r['metric'])}" for r in rows])
    ax.set_ylabel("points (x100)")
    ax.set_title("Baseline / teacher / student (% = share of the teacher's gain the student recovers)")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    return common.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv, args, params = common.start(argv, parse_args)
    results, source = load_or_evaluate(args, params)
    rows = quality_rows(results)
    report: dict[str, Any] = {
        "source": source,
        "systems_present": [s for s in SYSTEMS if s in results.get("systems", [])],
        "notes": results.get("notes", []),
        "rows": rows,
        "mean": mean_row(rows),
    }
    report["plot"] = str(plot(report, args.out_dir / f"{NAME}.png"))
    path = common.write_report(NAME, args.out_dir, argv, report)
    print_report(report)
    print(f"wrote {path} and {report['plot']}")
    return report


if __name__ == "__main__":
    main()
