"""Where the CLI's path arguments point when left out: the preset's layout, unless the command
was pointed at another folder, whose reports then stay inside it (the pipeline's are never
overwritten by an experiment)."""

from __future__ import annotations

from pathlib import Path

from d2llm.cli import build_parser, resolve_default_paths
from d2llm.config import load_params
from d2llm.layout import Layout

ROOT = Path(__file__).resolve().parents[2]


def _resolve(*argv: str, artifacts_dir: str = "."):
    params = load_params(ROOT / "params.yaml", {"artifacts_dir": artifacts_dir})
    return resolve_default_paths(build_parser().parse_args(list(argv)), params), Layout.of(params)


def test_train_defaults_are_the_presets_layout() -> None:
    args, paths = _resolve("train", artifacts_dir="runs/other")
    assert args.out_dir == paths.student_dir == Path("runs/other/models/student")
    assert args.metrics == paths.train_metrics
    assert args.plots_dir == paths.plots_dir


def test_train_into_another_folder_keeps_its_reports_there() -> None:
    args, paths = _resolve("train", "--out-dir", "/tmp/seed1")
    assert args.metrics == Path("/tmp/seed1/train_metrics.json") != paths.train_metrics
    assert args.plots_dir == Path("/tmp/seed1/plots")
    args, _ = _resolve("train", "--out-dir", "/tmp/seed1", "--metrics", "m.json", "--plots-dir", "p")
    assert (args.metrics, args.plots_dir) == (Path("m.json"), Path("p"))  # given ones win


def test_teacher_finetune_into_another_folder_keeps_its_report_there() -> None:
    args, paths = _resolve("teacher-finetune")
    assert args.metrics == paths.teacher_metrics
    args, _ = _resolve("teacher-finetune", "--out-dir", "/tmp/t1")
    assert args.metrics == Path("/tmp/t1/teacher_metrics.json")


def test_evaluating_or_registering_another_student_reads_and_writes_its_own_table() -> None:
    args, _ = _resolve("evaluate")
    assert args.output is None  # the command falls back to evaluation.output
    args, _ = _resolve("evaluate", "--student-dir", "/tmp/seed1")
    assert args.output == Path("/tmp/seed1/metrics.json")
    args, _ = _resolve("evaluate", "--student-dir", "/tmp/seed1", "--output", "x.json")
    assert args.output == Path("x.json")
    args, _ = _resolve("register", "--student-dir", "/tmp/seed1")
    assert args.metrics == Path("/tmp/seed1/metrics.json")
    args, _ = _resolve("register")
    assert args.metrics is None
