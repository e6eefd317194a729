"""The ``d2llm`` command line: one subcommand per pipeline step.

Every subcommand reads params.yaml (``--params``), takes its input and output paths as
arguments (defaults from params), and calls one library function. DVC stages and Prefect tasks
call the same functions, so the three entry points cannot drift apart. Heavy libraries are
imported inside the commands so that ``d2llm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from d2llm import layout
from d2llm.config import Params, load_params
from d2llm.errors import D2LLMError

log = logging.getLogger("d2llm")

Command = Callable[[argparse.Namespace, Params], int | None]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str) -> Callable[[Command], Command]:
    """Register a subcommand; the function's ``add_arguments`` attribute adds its options."""

    def register(fn: Command) -> Command:
        _COMMANDS[name] = (fn, getattr(fn, "add_arguments", lambda p: None), help)
        return fn

    return register


def arguments(add: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
    def attach(fn: Command) -> Command:
        fn.add_arguments = add  # type: ignore[attr-defined]
        return fn

    return attach


def _parse_override(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


# --------------------------------------------------------------------------- commands


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw-dir", type=Path, help="shipped raw data (default: data.raw_dir)")
    p.add_argument("--out-dir", type=Path, help="canonical tables (default: data.prepared_dir)")


@command("prepare", "parse the raw datasets into canonical parquet tables")
@arguments(_prepare_args)
def cmd_prepare(args: argparse.Namespace, params: Params) -> int:
    from d2llm.data.prepare import prepare_data, print_counts

    counts = prepare_data(
        params, raw_dir=args.raw_dir or params.data.raw_dir, out_dir=args.out_dir or params.data.prepared_dir
    )
    print_counts(counts)
    return 0


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prepared-dir", type=Path, help="canonical tables (default: data.prepared_dir)")
    p.add_argument(
        "--report-dir", type=Path, help="GX results and Data Docs (default: validation.report_dir)"
    )


@command("validate", "validate the canonical tables with Great Expectations")
@arguments(_validate_args)
def cmd_validate(args: argparse.Namespace, params: Params) -> int:
    from d2llm.data.validation import validate_prepared

    summary = validate_prepared(
        params,
        prepared_dir=args.prepared_dir or params.data.prepared_dir,
        report_dir=args.report_dir or params.validation.report_dir,
    )
    print(summary.describe())
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels-dir", type=Path, default=layout.LABELS_DIR, help="labelled groups")
    p.add_argument("--prepared-dir", type=Path, help="canonical tables, for the dev split")
    p.add_argument("--out-dir", type=Path, default=layout.STUDENT_DIR, help="where the best student goes")
    p.add_argument("--metrics", type=Path, default=layout.TRAIN_METRICS, help="training summary JSON")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")


@command("train", "distil the teacher's labels into the student (resumes from a checkpoint)")
@arguments(_train_args)
def cmd_train(args: argparse.Namespace, params: Params) -> int:
    import json

    from d2llm.training import train_student

    result = train_student(
        params,
        labels_dir=args.labels_dir,
        prepared_dir=args.prepared_dir or params.data.prepared_dir,
        out_dir=args.out_dir,
        resume=not args.no_resume,
    )
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    print(
        f"dev {params.training.dev_metric}: start {result.initial_metric:.2f} -> "
        f"best {result.best_metric:.2f} at step {result.best_step} of {result.steps} "
        f"({result.seconds:.0f} s); student in {args.out_dir}"
    )
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2llm", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="config file")
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        type=_parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. -S training.lr=1e-4 (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, add_arguments, help_text) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        params = load_params(args.params, dict(args.overrides))
        return _COMMANDS[args.command][0](args, params) or 0
    except D2LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
