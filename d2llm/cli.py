"""The ``d2llm`` command line: one subcommand per pipeline step.

Every subcommand reads params.yaml (``--params``), takes its input and output paths as
arguments (defaults from params), and calls one library function. DVC stages and Prefect tasks
call the same functions, so the three entry points cannot drift apart. Heavy libraries are
imported inside the commands so that ``d2llm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2llm import layout
from d2llm.config import Params, load_params
from d2llm.errors import D2LLMError
from d2llm.layout import Layout

log = logging.getLogger("d2llm")

Command = Callable[[argparse.Namespace, Params], int | None]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}
# Commands that write no pipeline artefact run without the working copy's lock (d2llm.lock);
# every other one refuses (or waits, --wait) while another pipeline run holds it.
_READ_ONLY = {"index", "search", "ir-select"}
# Commands that keep their work when stopped, and where (said when Ctrl-C stops one).
_RESUMES_FROM = {
    "teacher-finetune": "its checkpoint",
    "label": "its finished shards",
    "train": "its checkpoint",
    "index": "its last encoded chunk",
}


@dataclass(frozen=True)
class _AtLayout:
    """An argument's default: a path of the preset's layout (``Layout.of(params)``, so under the
    params' ``artifacts_dir``), filled in by ``main`` once the params are read.

    ``inside=(argument, name)``: when that other argument is given on the command line, this one
    defaults to ``<its value>/name`` instead. A run into another folder (``train --out-dir``)
    keeps its reports there and never overwrites the pipeline's (which DVC tracks and
    ``register`` reads). ``attr=None``: no layout default (the command decides).
    """

    attr: str | None
    child: str | None = None
    inside: tuple[str, str] | None = None

    def resolve(self, paths: Layout, given: dict[str, Any]) -> Path | None:
        if self.inside is not None and given.get(self.inside[0]) is not None:
            return Path(given[self.inside[0]]) / self.inside[1]
        if self.attr is None:
            return None
        path = getattr(paths, self.attr)
        return path / self.child if self.child else path

    def __str__(self) -> str:  # what --help shows
        if self.attr is None:
            return "set by the command"
        return f"{self.resolve(layout.DEFAULT, {})} under artifacts_dir"


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


def parse_override(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


# --------------------------------------------------------------------------- commands


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw-dir", type=Path, help="where the sources go (default: data.raw_dir)")
    p.add_argument(
        "--mirror",
        type=Path,
        help="a folder of <folder>/<file> copies, tried first "
        "(default: $D2LLM_DATA_MIRROR; then ../shared/data)",
    )
    p.add_argument("--catalog", type=Path, default=layout.CATALOG, help="the data catalogue")
    p.add_argument(
        "--source", action="append", help="fetch this source only (repeatable; default: data.sources)"
    )
    p.add_argument("--no-download", action="store_true", help="mirrors only: never use the network")


@command("fetch-data", "fetch the raw datasets of data.sources (mirror or pinned URL), verified by sha256")
@arguments(_fetch_args)
def cmd_fetch_data(args: argparse.Namespace, params: Params) -> int:
    from d2llm.data.catalog import load_catalog
    from d2llm.data.fetch import fetch_data, mirror_places

    report = fetch_data(
        load_catalog(args.catalog),
        args.source or params.data.sources,
        args.raw_dir or params.data.raw_dir,
        mirror_places(args.mirror),
        download=not args.no_download,
    )
    print(report.describe())
    return 0


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
    p.add_argument("--labels-dir", type=Path, default=_AtLayout("labels_dir"), help="labelled groups")
    p.add_argument("--prepared-dir", type=Path, help="canonical tables, for the dev split")
    p.add_argument(
        "--out-dir", type=Path, default=_AtLayout("student_dir"), help="where the best student goes"
    )
    p.add_argument(
        "--metrics",
        type=Path,
        default=_AtLayout("train_metrics", inside=("out_dir", "train_metrics.json")),
        help="training summary JSON (default: reports/, or <out-dir>/train_metrics.json with --out-dir)",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--plots-dir",
        type=Path,
        default=_AtLayout("plots_dir", inside=("out_dir", "plots")),
        help="dev metric and loss curves (JSON lists; <out-dir>/plots with --out-dir)",
    )


@command("train", "distil the teacher's labels into the student (resumes from a checkpoint)")
@arguments(_train_args)
def cmd_train(args: argparse.Namespace, params: Params) -> int:
    """One process, or (``training.distributed.nproc_per_node`` > 1) this command under torchrun.

    Started by torchrun (by hand, on one node or several, or by ``run_training``), this process
    is one rank; rank 0 alone writes the summary and curves.
    """
    from d2llm.distributed import env_rank
    from d2llm.jsonfile import write_json
    from d2llm.training import run_training, write_curves

    prepared_dir = args.prepared_dir or params.data.prepared_dir
    result = run_training(params, args.labels_dir, prepared_dir, args.out_dir, resume=not args.no_resume)
    if env_rank() != 0:
        return 0
    write_json(args.metrics, result.to_dict(), indent=1)
    write_curves(result.history, args.plots_dir)
    print(
        f"dev mean of {params.training.dev_datasets}: start {result.initial_metric:.2f} -> "
        f"best {result.best_metric:.2f} at step {result.best_step} of {result.steps} "
        f"({result.seconds:.0f} s); student in {args.out_dir}"
    )
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prepared-dir", type=Path, help="canonical tables (default: data.prepared_dir)")
    p.add_argument(
        "--teacher-dir", type=Path, default=_AtLayout("teacher_dir"), help="saved teacher (or skipped)"
    )
    p.add_argument(
        "--student-dir", type=Path, default=_AtLayout("student_dir"), help="saved student (or skipped)"
    )
    p.add_argument(
        "--output",
        type=Path,
        default=_AtLayout(None, inside=("student_dir", "metrics.json")),
        help="metrics JSON (default: evaluation.output, or <student-dir>/metrics.json with --student-dir)",
    )
    p.add_argument("--plot", type=Path, help="also draw the gains over the bi-encoder to this PNG")


@command("evaluate", "compare bi-encoder, teacher and student (and BM25 for IR) on the test data")
@arguments(_evaluate_args)
def cmd_evaluate(args: argparse.Namespace, params: Params) -> int:
    from d2llm.evaluation.evaluate import evaluate_systems, format_table

    output = args.output or params.evaluation.output
    results = evaluate_systems(
        params, args.prepared_dir or params.data.prepared_dir, args.teacher_dir, args.student_dir, output
    )
    print(format_table(results))
    print(f"metrics written to {output}")
    if args.plot is not None:
        from d2llm.evaluation.plots import gain_figure

        figure = gain_figure(results)
        if figure is None:
            print("no plot: the report has no intervals (bootstrap_resamples 0, or no bi-encoder)")
        else:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(args.plot, dpi=120)
            print(f"gains plot written to {args.plot}")
    return 0


def _ir_select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prepared-dir", type=Path, help="canonical tables (default: data.prepared_dir)")
    p.add_argument(
        "--teacher-dir", type=Path, default=_AtLayout("teacher_dir"), help="saved teacher (its IR protocol)"
    )
    p.add_argument("--no-teacher", action="store_true", help="choose the passage scheme only")
    p.add_argument(
        "--student-dir",
        type=Path,
        action="append",
        help="saved student whose search settings (first stage, depth) to choose; repeat for seeds",
    )
    p.add_argument(
        "--output", type=Path, default=_AtLayout("reports_dir", "ir_selection.json"), help="report JSON"
    )


@command(
    "ir-select",
    "choose the passage scheme, the teacher's IR protocol and the student's search on the IR dev collection",
)
@arguments(_ir_select_args)
def cmd_ir_select(args: argparse.Namespace, params: Params) -> int:
    from d2llm.evaluation.ir_selection import format_report, select_ir_settings
    from d2llm.jsonfile import write_json

    teacher_dir = None if args.no_teacher or not args.teacher_dir.is_dir() else args.teacher_dir
    prepared = args.prepared_dir or params.data.prepared_dir
    report = select_ir_settings(params, prepared, teacher_dir, args.student_dir)
    write_json(args.output, report)
    print(format_report(report))
    print(f"report written to {args.output}")
    return 0


def _index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student-dir", type=Path, default=_AtLayout("student_dir"), help="saved student")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--dataset", help="prepared IR dataset whose corpus is indexed (default: cranfield)")
    source.add_argument("--corpus", type=Path, help="a document file: .csv, .tsv, .jsonl or .parquet")
    p.add_argument("--id-column", default="doc_id", help="--corpus column of document ids (default: doc_id)")
    p.add_argument("--text-column", default="text", help="--corpus column of document texts (default: text)")
    p.add_argument("--prepared-dir", type=Path, help="canonical tables (default: data.prepared_dir)")
    p.add_argument("--out-dir", type=Path, help="index folder (default: index/<dataset or file name>)")
    p.add_argument("--model-version", help="recorded in the manifest (default: the student dir)")
    p.add_argument(
        "--no-resume", action="store_true",
        help="encode every passage anew instead of going on from a stopped build of the same inputs",
    )  # fmt: skip


@command("index", "encode a corpus once with the student (PMA vectors + cached IEM projections; resumable)")
@arguments(_index_args)
def cmd_index(args: argparse.Namespace, params: Params) -> int:
    import pandas as pd

    from d2llm.errors import ArtifactError
    from d2llm.hub import pick_device
    from d2llm.search import build_index, read_corpus_file
    from d2llm.student.model import D2LLMStudent, inference_options

    if args.corpus is not None:
        corpus = read_corpus_file(args.corpus, args.id_column, args.text_column)
        name, out_dir = str(args.corpus), args.out_dir or Layout.of(params).index_root / args.corpus.stem
    else:
        dataset = args.dataset or "cranfield"
        corpus_path = (args.prepared_dir or params.data.prepared_dir) / "ir" / dataset / "corpus.parquet"
        if not corpus_path.is_file():
            raise ArtifactError(f"no corpus for {dataset!r} at {corpus_path}: run `d2llm prepare` first")
        corpus = pd.read_parquet(corpus_path)
        name, out_dir = dataset, args.out_dir or Layout.of(params).index_root / dataset
    student = D2LLMStudent.from_pretrained(
        args.student_dir,
        device=pick_device(params.device),
        merged=True,
        **inference_options(params.student),
    )
    index = build_index(
        student,
        corpus,
        out_dir,
        model_version=args.model_version or str(args.student_dir),
        batch_size=params.evaluation.batch_size,
        search_cfg=params.search,
        resume=not args.no_resume,
    )
    print(
        f"indexed {len(index)} documents of {name} as {index.n_passages} passages into {out_dir} "
        f"(first stage: {index.manifest['first_stage_ann']}), with their BM25 for hybrid search"
    )
    return 0


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", nargs="?", help="the search query (or --queries FILE)")
    p.add_argument(
        "--queries", type=Path, help="a text file of queries, one per line: the model loads once for all"
    )
    p.add_argument(
        "--json", action="store_true",
        help="one JSON object per hit (query, rank, doc_id, score, passage, text) instead of the table",
    )  # fmt: skip
    p.add_argument("-k", type=int, default=10, help="number of documents to show (each by its best passage)")
    p.add_argument(
        "--index-dir", type=Path, default=_AtLayout("index_root", "cranfield"), help="index folder"
    )
    p.add_argument(
        "--student-dir", type=Path, default=_AtLayout("student_dir"), help="the student that built it"
    )
    p.add_argument("--mode", choices=["full", "two_stage"], help="default: search.mode")
    p.add_argument("--first-stage", choices=["bm25", "cosine"], help="default: search.first_stage")
    p.add_argument(
        "--rerank-depth", type=int, help="two-stage candidate documents M (default: search.rerank_depth)"
    )
    p.add_argument(
        "--lexical-weight",
        type=float,
        help="BM25's weight in hybrid scoring (default: search.lexical_weight)",
    )


@contextmanager
def _quiet_model_loading() -> Iterator[None]:
    """No weight-loading progress bar and no library FutureWarnings: a search prints its results."""
    import warnings

    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _search_queries(args: argparse.Namespace) -> list[str]:
    """The query on the command line, or the non-blank lines of ``--queries`` (one of the two)."""
    from d2llm.errors import ConfigError, DataError

    if (args.query is None) == (args.queries is None):
        raise ConfigError("give one query, or --queries FILE with one query per line (not both)")
    if args.query is not None:
        return [args.query]
    if not args.queries.is_file():
        raise DataError(f"--queries {args.queries}: no such file")
    queries = [line.strip() for line in args.queries.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not queries:
        raise DataError(f"--queries {args.queries}: no query in it (one per line)")
    return queries


@command("search", "search an index with the student and print ranked documents with scores")
@arguments(_search_args)
def cmd_search(args: argparse.Namespace, params: Params) -> int:
    import json
    import textwrap

    from tqdm.auto import tqdm

    from d2llm.search import load_index, search
    from d2llm.student.model import D2LLMStudent, inference_options

    queries = _search_queries(args)  # before the model loads: a bad file costs nothing
    with _quiet_model_loading():
        student = D2LLMStudent.from_pretrained(
            args.student_dir, device="cpu", merged=True, **inference_options(params.student)
        )
    index = load_index(
        args.index_dir, student, ef_search=params.search.hnsw_ef_search, nprobe=params.search.ivf_nprobe
    )
    lexical_weight = params.search.lexical_weight if args.lexical_weight is None else args.lexical_weight
    settings = {
        "k": args.k,
        "mode": args.mode or params.search.mode,
        "first_stage": args.first_stage or params.search.first_stage,
        "rerank_depth": args.rerank_depth or params.search.rerank_depth,
        "chunk_size": params.search.chunk_size,
        "aggregation": params.search.aggregation,
        "first_weight": params.search.first_weight,
        "lexical_weight": lexical_weight,
    }
    many = len(queries) > 1
    for query in tqdm(queries, desc="search", unit="query", disable=not many, leave=False):
        hits = search(student, index, query, **settings)
        if many and not args.json:
            print(f"query: {query}")
        for rank, hit in enumerate(hits, start=1):
            if args.json:
                row = {"query": query, "rank": rank, "doc_id": hit.doc_id, "score": hit.score}
                print(json.dumps(row | {"passage": hit.passage, "text": hit.text}, ensure_ascii=False))
            else:
                snippet = textwrap.shorten(hit.text, width=100, placeholder=" ...")
                print(f"{rank:>3}  {hit.score:9.4f}  {hit.doc_id:>8}  {snippet}")
    return 0


def _mine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prepared-dir", type=Path, help="canonical tables (default: data.prepared_dir)")
    p.add_argument("--out", type=Path, default=_AtLayout("negatives"))


@command("mine", "mine hard negatives (BM25 and bi-encoder) for the labelling datasets")
@arguments(_mine_args)
def cmd_mine(args: argparse.Namespace, params: Params) -> int:
    from d2llm.mining import mine_negatives

    out = mine_negatives(params, args.prepared_dir or params.data.prepared_dir, args.out)
    print(f"{len(out)} anchors with {params.mining.num_negatives} negatives each -> {args.out}")
    return 0


def _teacher_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prepared-dir", type=Path, help="canonical tables (default: data.prepared_dir)")
    p.add_argument("--out-dir", type=Path, default=_AtLayout("teacher_dir"), help="saved teacher folder")
    p.add_argument(
        "--metrics",
        type=Path,
        default=_AtLayout("teacher_metrics", inside=("out_dir", "teacher_metrics.json")),
        help="fine-tuning report JSON (default: reports/, or <out-dir>/teacher_metrics.json with --out-dir)",
    )
    p.add_argument(
        "--no-resume", action="store_true",
        help="train afresh instead of going on from <out-dir>/checkpoint of a stopped run",
    )  # fmt: skip


@command("teacher-finetune", "fine-tune the teacher on gold labels and save it (resumes from its checkpoint)")
@arguments(_teacher_finetune_args)
def cmd_teacher_finetune(args: argparse.Namespace, params: Params) -> int:
    import json

    from d2llm.teachers.dev_report import format_dev_table, read_dev_report
    from d2llm.teachers.finetune import finetune_teacher

    prepared_dir = args.prepared_dir or params.data.prepared_dir
    result = finetune_teacher(params, prepared_dir, args.out_dir, resume=not args.no_resume)
    summary = json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2)
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(summary + "\n", encoding="utf-8")
    report = read_dev_report(args.out_dir)
    print(format_dev_table(report) if report else summary)
    print(f"report written to {args.metrics}")
    return 0


def _label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--negatives", type=Path, default=_AtLayout("negatives"))
    p.add_argument("--teacher-dir", type=Path, default=_AtLayout("teacher_dir"))
    p.add_argument("--out-dir", type=Path, default=_AtLayout("labels_dir"))
    p.add_argument("--overwrite", action="store_true", help="replace labels made from other groups/teacher")
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="who scores the shards: this process or Ray actors (default: labelling.executor)",
    )
    p.add_argument("--ray-address", help="Ray cluster to join (default: labelling.ray.address, RAY_ADDRESS)")


@command("label", "build training groups and score them with the teacher (resumable shards)")
@arguments(_label_args)
def cmd_label(args: argparse.Namespace, params: Params) -> int:
    from d2llm.labelling import label_groups

    changes: dict[str, Any] = {}
    if args.executor:
        changes["labelling.executor"] = args.executor
    if args.ray_address:
        changes["labelling.ray.address"] = args.ray_address
    params = _with_settings(params, changes)
    summary = label_groups(params, args.negatives, args.teacher_dir, args.out_dir, overwrite=args.overwrite)
    print(summary)
    return 0


def _label_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels-dir", type=Path, default=_AtLayout("labels_dir"))
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")


@command("label-stats", "how sure the teacher is of each dataset's positives and negatives (labels folder)")
@arguments(_label_stats_args)
def cmd_label_stats(args: argparse.Namespace, params: Params) -> int:
    from d2llm.jsonfile import write_json
    from d2llm.labelling.shards import load_labels
    from d2llm.labelling.stats import DOUBTED_POSITIVE, doubted_datasets, format_label_stats, label_stats

    stats = label_stats(load_labels(args.labels_dir), params.teacher.temperature)
    print(format_label_stats(stats))
    doubted = doubted_datasets(stats)
    if doubted:
        print(
            f"positives below a mean s of {DOUBTED_POSITIVE}: {', '.join(doubted)} "
            f"(loss.ci_variant is {params.loss.ci_variant}; docs/model.md says why that matters)"
        )
    if args.json:
        write_json(args.json, [r.to_dict() for r in stats], indent=1)
    return 0


def _with_settings(params: Params, changes: dict[str, Any]) -> Params:
    """``params`` with dotted settings replaced, validated again like params.yaml."""
    if not changes:
        return params
    from d2llm.config import _set_dotted, params_from_dict

    raw = params.model_dump(mode="json")
    for dotted, value in changes.items():
        _set_dotted(raw, dotted, value)
    return params_from_dict(raw, "command-line options")


def _register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student-dir", type=Path, default=_AtLayout("student_dir"), help="saved student")
    p.add_argument("--index-dir", type=Path, help="a search index built by this student (optional)")
    p.add_argument(
        "--metrics",
        type=Path,
        default=_AtLayout(None, inside=("student_dir", "metrics.json")),
        help="evaluation results JSON (default: evaluation.output; <student-dir>/metrics.json when "
        "--student-dir is given), recorded when the file exists",
    )


@command("register", "log the student as an MLflow pyfunc model and register a new version")
@arguments(_register_args)
def cmd_register(args: argparse.Namespace, params: Params) -> int:
    from d2llm.tracking.registry import register_student

    metrics = args.metrics or params.evaluation.output
    if metrics in (params.evaluation.output, args.student_dir / "metrics.json") and not metrics.is_file():
        metrics = None  # the default report does not exist (not evaluated): registered without metrics
    version = register_student(params, args.student_dir, args.index_dir, metrics)
    print(f"registered {version.name} version {version.version} (metrics: {metrics or 'none'})")
    return 0


def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", help="registered version to promote (default: the newest)")


@command("promote", "make a version the challenger and promote it to champion if it beats the champion")
@arguments(_promote_args)
def cmd_promote(args: argparse.Namespace, params: Params) -> int:
    from d2llm.tracking.registry import promote_version

    version, decision = promote_version(params, args.version)
    verdict = "promoted to champion" if decision.promote else "not promoted"
    print(f"{params.tracking.registered_model} v{version} {verdict}: {decision.reason}")
    return 0


# --------------------------------------------------------------------------- entry point


def _takes_the_lock() -> bool:
    """Whether this process takes the working copy's pipeline lock (d2llm.lock).

    Of the processes of one torchrun job, rank 0 takes it for all (on several nodes the working
    copy is shared, so one lock file serves every node); a step run for a process that holds the
    lock (torchrun workers of ``d2llm.distributed.launch_torchrun``, a labelling Ray job) does
    not take it again.
    """
    from d2llm.distributed import env_rank
    from d2llm.lock import LOCK_HELD_ENV

    return os.environ.get(LOCK_HELD_ENV) != "1" and env_rank() == 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2llm", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="config file")
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. -S training.lr=1e-4 (repeatable)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="when another pipeline run holds this working copy, wait this long for it (default: refuse)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, add_arguments, help_text) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def resolve_default_paths(args: argparse.Namespace, params: Params) -> argparse.Namespace:
    """In place: every path argument left at its layout default becomes that path (``_AtLayout``)."""
    paths = Layout.of(params)
    # Paths given on the command line (a layout default may follow one of them).
    given = {key: value for key, value in vars(args).items() if not isinstance(value, _AtLayout)}
    for key, value in vars(args).items():
        if isinstance(value, _AtLayout):
            setattr(args, key, value.resolve(paths, given))
    return args


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Libraries that narrate every step at INFO (GX registers each expectation) drown our lines.
    for noisy in ("great_expectations", "bm25s", "httpx", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        params = load_params(args.params, dict(args.overrides))
        resolve_default_paths(args, params)
        run = _COMMANDS[args.command][0]
        from d2llm.lock import pipeline_lock

        if args.command in _READ_ONLY or not _takes_the_lock():
            return run(args, params) or 0

        with pipeline_lock(wait=args.wait):
            return run(args, params) or 0
    except D2LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = _RESUMES_FROM.get(args.command)
        again = f": run it again to go on from {kept}" if kept else ""
        print(f"\ninterrupted: d2llm {args.command} stopped{again}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


if __name__ == "__main__":
    raise SystemExit(main())
