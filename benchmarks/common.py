"""What every benchmark shares: the command line, interleaved timing, tables, JSON and plots.

Timings on a shared, noisy machine only mean something side by side: every benchmark measures
all of its systems in one process, interleaving them (system order rotates each repetition, so
no system always runs first or last), and reports the median of the repetitions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm.config import Params, TaskKind, load_params

if TYPE_CHECKING:
    import matplotlib.figure

DEFAULT_OUT_DIR = Path("reports/benchmarks")
SHARED_MACHINE_NOTE = "timings taken on a shared CPU machine: compare ratios, not absolute numbers"


# --------------------------------------------------------------------------- command line


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every benchmark takes: config, overrides, output folder, threads, repetitions."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="config file")
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. -S student.backbone=/path/to/model (repeatable)",
    )
    parser.add_argument("--prepared-dir", type=Path, help="canonical tables (default: data.prepared_dir)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where JSON and PNG go")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling texts and initialising")
    return parser


def load_benchmark_params(args: argparse.Namespace) -> Params:
    """params.yaml with the ``-S key=value`` overrides applied (values parsed as YAML)."""
    import yaml

    overrides: dict[str, Any] = {}
    for text in args.overrides:
        if "=" not in text:
            raise SystemExit(f"override {text!r} must look like key.path=value")
        key, value = text.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return load_params(args.params, overrides)


def setup_torch(threads: int, seed: int) -> None:
    """Fix the thread count (the figures depend on it) and the seeds."""
    import torch

    from d2llm.hub import seed_everything

    if threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    seed_everything(seed)


def start(
    argv: Sequence[str] | None, parse_args: Callable[[list[str]], argparse.Namespace]
) -> tuple[list[str], argparse.Namespace, Params]:
    """The shared start of every benchmark: arguments, logging, config, torch threads and seed."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_benchmark_params(args)
    setup_torch(args.threads, args.seed)
    return argv, args, params


def dev_sample(args: argparse.Namespace, params: Params) -> list[Any]:
    """The seeded sample of ``args.dev``'s dev splits a dev benchmark scores: ``--max-pairs`` per
    set from the ``--part`` (select or validate) of each split (d2llm.evaluation.dev)."""
    from d2llm.evaluation.dev import load_dev_sets

    prepared = args.prepared_dir or params.data.prepared_dir
    fraction = params.selection.validate_fraction
    return load_dev_sets(prepared, args.dev, args.max_pairs, params.seed, args.part, fraction)


def run(
    name: str,
    argv: Sequence[str] | None,
    parse_args: Callable[[list[str]], argparse.Namespace],
    measure: Callable[[argparse.Namespace, Params], dict[str, Any]],
    print_report: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """The whole of a benchmark's ``main``: start, measure, write the JSON report, print it."""
    argv, args, params = start(argv, parse_args)
    results = measure(args, params)
    path = write_report(name, args.out_dir, argv, results)
    print_report(results)
    print(f"wrote {path}")
    return results


@contextmanager
def cpu_bf16_env(choice: str) -> Iterator[None]:
    """``$D2LLM_CPU_BF16`` set to ``choice`` (auto, on, off) inside the block, put back after: a
    benchmark that compares number formats measures bf16 as bf16 on any CPU."""
    from d2llm.hub import CPU_BF16_ENV

    before = os.environ.get(CPU_BF16_ENV)
    os.environ[CPU_BF16_ENV] = choice
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CPU_BF16_ENV, None)
        else:
            os.environ[CPU_BF16_ENV] = before


def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise SystemExit(f"{name} must be >= 1, got {value}")


# --------------------------------------------------------------------------- timing


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def add_clock_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed seconds; cpu: this process's CPU seconds (with --threads 1, the work "
        "itself, whatever other jobs take the cores: the steady measure on a loaded machine)",
    )


def interleaved_timings(
    systems: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Seconds of each callable per repetition (``clock``: see ``CLOCKS``), measured round-robin.

    Each repetition runs every system once; the order rotates by one place per repetition.
    ``warmup`` untimed rounds first (allocator, thread pools and caches settle).
    """
    now = CLOCKS[clock]
    from tqdm.auto import tqdm

    names = list(systems)
    for _ in tqdm(range(warmup), desc="warm-up", unit="round", disable=warmup == 0):
        for name in names:
            systems[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in tqdm(range(repeats), desc="timed repetitions", unit="round"):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = now()
            systems[name]()
            times[name].append(now() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return float(numerator / denominator)


# --------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (they mean little without it)."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats get 4 significant digits, None prints as '-'."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(name: str, out_dir: Path, argv: Sequence[str], results: dict[str, Any]) -> Path:
    """``<out_dir>/<name>.json`` with the run's command line, machine and time added."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "benchmark": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([f"python -m benchmarks.{name}", *argv]),
        "machine": machine_info(),
        "note": SHARED_MACHINE_NOTE,
        **results,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path


def new_figure(
    width: float = 7.0, height: float = 4.0, ncols: int = 1
) -> tuple[matplotlib.figure.Figure, Any]:
    """A matplotlib figure on the Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def save_figure(fig: matplotlib.figure.Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- models


def load_student(params: Params, student_dir: Path | None) -> tuple[Any, str]:
    """The trained student in ``student_dir`` when it exists, else a fresh one from the config.

    An untrained student costs exactly what a trained one costs (same shapes, same operations),
    so timing benchmarks run before training too; quality figures then say "untrained". Either
    way the LoRA adapters are merged into the backbone, as every inference path runs it, and the
    inference settings of ``params`` apply (``student.iem.inference_dtype``,
    ``student.inference_quantization``).
    """
    from d2llm.hub import pick_device
    from d2llm.student.model import D2LLMStudent, inference_options

    device = pick_device(params.device)
    options = inference_options(params.student)
    if student_dir is not None and (Path(student_dir) / "student.json").is_file():
        student = D2LLMStudent.from_pretrained(student_dir, device=device, merged=True, **options)
        return student, f"trained ({student_dir})"
    student = D2LLMStudent.from_config(params.student, device=device).merge_lora(**options)
    return student, f"untrained (from_config, backbone {params.student.backbone})"


def load_teacher(params: Params, teacher_dir: Path | None, task: TaskKind = "sym") -> tuple[Any, str]:
    """The saved teacher in ``teacher_dir`` when it exists, else the configured base model.

    A cross-encoder's untrained head changes its scores, not its cost. Of a teacher per task
    kind (``teacher.finetune.per_task``) the scripts time the part of ``task``: one model, as
    labelling and ranking run it (both parts are the same architecture).
    """
    from d2llm.teachers.base import TEACHER_JSON
    from d2llm.teachers.factory import load_teacher as load
    from d2llm.teachers.per_task import PerTaskTeacher

    if teacher_dir is not None and (Path(teacher_dir) / TEACHER_JSON).is_file():
        teacher = load(params.teacher, teacher_dir, params.device)
        if isinstance(teacher, PerTaskTeacher):
            return teacher.part(task), f"saved ({teacher_dir}, its {task} part)"
        return teacher, f"saved ({teacher_dir})"
    teacher = load(params.teacher, None, params.device)
    return teacher, f"base model, untrained head ({params.teacher.kind} {params.teacher.model})"
