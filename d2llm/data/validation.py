"""Great Expectations suites for the prepared tables, one per table kind (pairs, corpus, queries, qrels).

``validate_prepared`` runs every suite against ``data/prepared``, writes the verdict per table
(``validation_results.json``), GX's full results (``gx_results.json``) and a Data Docs HTML site
under ``report_dir`` on every run (pass or fail: a failed run is exactly
when someone needs to read the report), and raises DataValidationError naming the dataset,
expectation, column, unexpected count and a few examples of each failure.

What pandas must compute first (cross-table facts such as train/test leakage) becomes a helper
column that a plain expectation then checks, so that every rule shows up in the Data Docs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm.config import Params
from d2llm.data.schema import (
    CORPUS_COLUMNS,
    PAIR_COLUMNS,
    PAIR_DTYPES,
    QREL_COLUMNS,
    QUERY_COLUMNS,
    DatasetSpec,
    pair_key,
)
from d2llm.data.tables import load_ir, load_pairs, read_manifest
from d2llm.errors import DataValidationError, clip
from d2llm.jsonfile import write_json

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

LEAK_COLUMN = "leaked_from_train"  # helper column: the pair text when a test pair is also in train
# The verdict per table, and nothing that changes from run to run on the same data: DVC's mine
# and teacher-finetune stages depend on this file, so a rerun of validation that passes again
# must not rerun them. GX's own results (run times, random ids) go to GX_RESULTS_FILE.
RESULTS_FILE = "validation_results.json"
GX_RESULTS_FILE = "gx_results.json"
MAX_EXAMPLES = 5


@dataclass
class Failure:
    table: str
    expectation: str
    column: str | None
    unexpected_count: int | None
    examples: list[Any]
    detail: str = ""

    def describe(self) -> str:
        where = f" column {self.column!r}" if self.column else ""
        count = f": {self.unexpected_count} unexpected value(s)" if self.unexpected_count is not None else ""
        quoted = ", ".join(clip(repr(example)) for example in self.examples[:MAX_EXAMPLES])
        examples = f", e.g. [{quoted}]" if self.examples else ""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.table}: {self.expectation}{where}{count}{examples}{detail}"


@dataclass
class TableResult:
    table: str
    rows: int
    evaluated: int
    failures: list[Failure] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.failures


@dataclass
class ValidationSummary:
    tables: list[TableResult]
    report_dir: Path
    results_path: Path
    docs_index: Path | None

    @property
    def success(self) -> bool:
        return all(t.success for t in self.tables)

    @property
    def failures(self) -> list[Failure]:
        return [f for t in self.tables for f in t.failures]

    def describe(self) -> str:
        lines = [f"{'table':<28} {'rows':>7} {'checks':>7}  result"]
        for t in self.tables:
            status = "ok" if t.success else f"FAILED ({len(t.failures)})"
            lines.append(f"{t.table:<28} {t.rows:>7} {t.evaluated:>7}  {status}")
        lines += [f"  - {f.describe()}" for f in self.failures]
        verdict = "all expectations met" if self.success else f"{len(self.failures)} expectation(s) failed"
        lines.append(f"validation: {verdict}; results {self.results_path}")
        if self.docs_index:
            lines.append(f"Data Docs: {self.docs_index}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "tables": [asdict(t) | {"success": t.success} for t in self.tables],
            "docs_index": str(self.docs_index) if self.docs_index else None,
        }


# --------------------------------------------------------------------------- suites


def _text_expectations(gxe: Any, columns: tuple[str, ...], params: Params) -> list[Any]:
    v = params.validation
    out = []
    for col in columns:
        out.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
        out.append(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=col, min_value=v.min_text_chars, max_value=v.max_text_chars
            )
        )
    return out


def _columns_exist(gxe: Any, columns: tuple[str, ...]) -> list[Any]:
    return [gxe.ExpectColumnToExist(column=c) for c in columns]


def pairs_expectations(spec: DatasetSpec, params: Params) -> list[Any]:
    import great_expectations.expectations as gxe

    out = [gxe.ExpectTableRowCountToBeBetween(min_value=1), *_columns_exist(gxe, PAIR_COLUMNS)]
    out += _text_expectations(gxe, ("text_a", "text_b"), params)
    out += [
        gxe.ExpectColumnValuesToBeOfType(column="label", type_=PAIR_DTYPES["label"]),
        gxe.ExpectColumnValuesToBeOfType(column="is_positive", type_=PAIR_DTYPES["is_positive"]),
        gxe.ExpectColumnValuesToNotBeNull(column="label"),
        gxe.ExpectColumnValuesToBeInSet(column="task", value_set=[spec.task]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(spec.splits)),
        gxe.ExpectColumnValuesToNotBeNull(column="source"),
    ]
    if spec.label_kind == "score":
        assert spec.label_range is not None
        lo, hi = spec.label_range
        out.append(gxe.ExpectColumnValuesToBeBetween(column="label", min_value=lo, max_value=hi))
    else:
        assert spec.label_set is not None
        out.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="label", value_set=[float(i) for i in range(len(spec.label_set))]
            )
        )
        out.append(gxe.ExpectColumnValuesToBeInSet(column="label_name", value_set=list(spec.label_set)))
    if params.validation.check_leakage:
        out.append(gxe.ExpectColumnValuesToBeNull(column=LEAK_COLUMN))
    return out


def ir_expectations(table: str, params: Params, query_ids: list[str], doc_ids: list[str]) -> list[Any]:
    import great_expectations.expectations as gxe

    if table == "corpus":
        return [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            *_columns_exist(gxe, CORPUS_COLUMNS),
            gxe.ExpectColumnValuesToNotBeNull(column="doc_id"),
            gxe.ExpectColumnValuesToBeUnique(column="doc_id"),
            *_text_expectations(gxe, ("text",), params),
        ]
    if table == "queries":
        return [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            *_columns_exist(gxe, QUERY_COLUMNS),
            gxe.ExpectColumnValuesToNotBeNull(column="query_id"),
            gxe.ExpectColumnValuesToBeUnique(column="query_id"),
            *_text_expectations(gxe, ("text",), params),
        ]
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *_columns_exist(gxe, QREL_COLUMNS),
        gxe.ExpectColumnValuesToBeOfType(column="relevance", type_="int64"),
        gxe.ExpectColumnValuesToBeBetween(column="relevance", min_value=0),
        gxe.ExpectColumnValuesToBeInSet(column="query_id", value_set=query_ids),
        gxe.ExpectColumnValuesToBeInSet(column="doc_id", value_set=doc_ids),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["query_id", "doc_id"]),
    ]


# --------------------------------------------------------------------------- helper columns


def add_leak_column(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Mark test pairs that also occur in train (the pair text in LEAK_COLUMN, else null)."""
    symmetric = task == "sym"
    keys = [pair_key(a, b, symmetric) for a, b in zip(df["text_a"], df["text_b"], strict=True)]
    train_keys = {k for k, s in zip(keys, df["split"], strict=True) if s == "train"}
    leaked = [
        k if (s == "test" and k in train_keys) else None for k, s in zip(keys, df["split"], strict=True)
    ]
    out = df.copy()
    out[LEAK_COLUMN] = leaked
    out[LEAK_COLUMN] = out[LEAK_COLUMN].astype("object")
    return out


# --------------------------------------------------------------------------- running GX


def _context(report_dir: Path) -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX logs every config save at INFO; the d2llm CLI runs at INFO, so keep GX to warnings.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    report_dir.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=str(report_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    context.variables.save()
    return context


def _run_suite(
    context: Any, table: str, df: pd.DataFrame, expectations: list[Any]
) -> tuple[TableResult, Any]:
    """Validate one table with one suite; GX names are derived from the table name."""
    import great_expectations as gx

    name = table.replace("/", "__")
    source = context.data_sources.add_or_update_pandas(name="d2llm_prepared")
    asset = next((a for a in source.assets if a.name == name), None) or source.add_dataframe_asset(name=name)
    batch = next((b for b in asset.batch_definitions if b.name == "whole"), None)
    batch = batch or asset.add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=name, data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=name, validation_definitions=[definition], result_format={"result_format": "SUMMARY"}
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": df})
    result = next(iter(run.run_results.values()))
    failures = [_failure(table, r) for r in result.results if not r.success]
    return TableResult(table=table, rows=len(df), evaluated=len(result.results), failures=failures), result


def _failure(table: str, r: Any) -> Failure:
    config = r.expectation_config
    res = r.result or {}
    detail = ""
    if r.exception_info and r.exception_info.get("raised_exception"):
        detail = f"error: {clip(str(r.exception_info.get('exception_message', '')))}"
    elif "observed_value" in res:
        detail = f"observed {clip(repr(res['observed_value']))}"
    return Failure(
        table=table,
        expectation=config.type,
        column=config.kwargs.get("column") or (",".join(config.kwargs.get("column_list", [])) or None),
        unexpected_count=res.get("unexpected_count"),
        examples=list(res.get("partial_unexpected_list") or [])[:MAX_EXAMPLES],
        detail=detail,
    )


def _tables(params: Params, prepared_dir: Path) -> list[tuple[str, pd.DataFrame, list[Any]]]:
    """(table name, dataframe with helper columns, expectations) for every prepared table."""
    manifest = read_manifest(prepared_dir)
    out = []
    for name, raw_spec in manifest["pairs"].items():
        spec = DatasetSpec.from_json(raw_spec)
        df = load_pairs(prepared_dir, name)
        if params.validation.check_leakage:
            df = add_leak_column(df, spec.task)
        out.append((f"pairs/{name}", df, pairs_expectations(spec, params)))
    for name in manifest["ir"]:
        ir = load_ir(prepared_dir, name)
        query_ids = sorted(ir.queries["query_id"].dropna().unique().tolist())
        doc_ids = sorted(ir.corpus["doc_id"].dropna().unique().tolist())
        for table in ("corpus", "queries", "qrels"):
            expectations = ir_expectations(table, params, query_ids, doc_ids)
            out.append((f"ir/{name}/{table}", getattr(ir, table), expectations))
    return out


def validate_prepared(params: Params, prepared_dir: str | Path, report_dir: str | Path) -> ValidationSummary:
    """Run every suite, write JSON results and Data Docs, raise DataValidationError on any failure."""
    prepared_dir, report_dir = Path(prepared_dir), Path(report_dir)
    tables = _tables(params, prepared_dir)
    context = _context(report_dir)
    results, raw = [], {}
    for table, df, expectations in tables:
        log.info("validating %s (%d rows, %d expectations)", table, len(df), len(expectations))
        table_result, gx_result = _run_suite(context, table, df, expectations)
        results.append(table_result)
        raw[table] = gx_result.to_json_dict()
    context.build_data_docs()
    docs_index = report_dir / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    summary = ValidationSummary(
        tables=results,
        report_dir=report_dir,
        results_path=report_dir / RESULTS_FILE,
        docs_index=docs_index if docs_index.exists() else None,
    )
    write_json(report_dir / GX_RESULTS_FILE, raw, default=str)
    write_json(summary.results_path, summary.to_json() | {"prepared_dir": str(prepared_dir)}, default=str)
    if not summary.success:
        raise DataValidationError(
            f"{len(summary.failures)} expectation(s) failed on {prepared_dir} "
            f"(report: {summary.results_path}):\n"
            + "\n".join(f"  - {f.describe()}" for f in summary.failures)
        )
    return summary
