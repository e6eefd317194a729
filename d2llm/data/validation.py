"""Great Expectations suites for the prepared tables, one per table kind (pairs, corpus, queries, qrels).

``validate_prepared`` runs every suite against ``data/prepared``, writes the verdict per table
(``validation_results.json``), GX's full results (``gx_results.json``) and a Data Docs HTML site
under ``report_dir`` on every run (pass or fail: a failed run is exactly
when someone needs to read the report), and raises DataValidationError naming the dataset,
expectation, column, unexpected count and a few examples of each failure.

What pandas must compute first (cross-table facts such as train/test leakage, text lengths)
becomes a helper column that a plain expectation then checks, so that every rule shows up in the
Data Docs. Built-in datasets are also checked against their profile (d2llm.data.profiles): rows
per split, the share of positives per split and text lengths, each split's rule a GX expectation
with a ``row_condition`` on ``split``. The leakage check runs across datasets too: no train pair
of any prepared dataset may be a test pair of another one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm.config import Params
from d2llm.data.profiles import IR_PROFILES, PAIR_PROFILES, PairProfile
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
# helper column of train rows: "<other dataset> test: <pair text>" when the pair is a test pair there
CROSS_LEAK_COLUMN = "in_test_of_other_dataset"
CHARS_COLUMN = "{}_chars"  # helper columns text_a_chars, text_b_chars: lengths in characters
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
        out.append(gxe.ExpectColumnValuesToBeNull(column=CROSS_LEAK_COLUMN))
    return out


def profile_expectations(profile: PairProfile, params: Params) -> list[Any]:
    """A built-in dataset's profile as expectations: rows and positive share per split, text lengths.

    Per-split rules carry a ``row_condition`` (GX's ``Column("split") == split``), so the Data
    Docs show each one, with its observed value, like any other expectation.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    rows = profile.split_rows(params.data)
    lo, hi = profile.total_rows()
    out = [
        gxe.ExpectTableRowCountToBeBetween(min_value=lo, max_value=hi),
        gxe.ExpectColumnDistinctValuesToEqualSet(column="split", value_set=list(rows)),
    ]
    for split, (lo, hi) in rows.items():
        where = {"row_condition": Column("split") == split}
        out.append(gxe.ExpectTableRowCountToBeBetween(min_value=lo, max_value=hi, **where))
        if split in profile.positives:
            share_lo, share_hi = profile.positives[split]
            out.append(
                gxe.ExpectColumnMeanToBeBetween(
                    column="is_positive", min_value=share_lo, max_value=share_hi, **where
                )
            )
    for column in profile.chars:
        mean_lo, mean_hi = profile.mean_chars(column)
        out.append(
            gxe.ExpectColumnMeanToBeBetween(
                column=CHARS_COLUMN.format(column), min_value=mean_lo, max_value=mean_hi
            )
        )
        out.append(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=column, min_value=params.validation.min_text_chars, max_value=profile.max_chars(column)
            )
        )
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


def add_chars_columns(df: pd.DataFrame) -> pd.DataFrame:
    """text_a_chars, text_b_chars: the length of each text in characters (for mean-length rules)."""
    out = df.copy()
    for column in ("text_a", "text_b"):
        out[CHARS_COLUMN.format(column)] = out[column].str.len().astype("float64")
    return out


def index_test_pairs(tables: dict[str, tuple[DatasetSpec, pd.DataFrame]]) -> dict[str, list[str]]:
    """``{ordered pair key: [dataset, ...]}`` of every test pair of every dataset.

    A test pair of a sym dataset is indexed in both orders, so that a train pair matches it in
    either order; a test pair of an asym dataset only as (query, passage).
    """
    index: dict[str, list[str]] = {}
    for name, (spec, df) in tables.items():
        test = df[df["split"] == "test"]
        for a, b in zip(test["text_a"], test["text_b"], strict=True):
            keys = {pair_key(a, b, False)} | ({pair_key(b, a, False)} if spec.task == "sym" else set())
            for key in keys:
                if name not in index.setdefault(key, []):
                    index[key].append(name)
    return index


def add_cross_leak_column(
    name: str, df: pd.DataFrame, task: str, index: dict[str, list[str]]
) -> pd.DataFrame:
    """Mark train pairs that are a test pair of ANOTHER prepared dataset (CROSS_LEAK_COLUMN).

    The value names that dataset and the pair: ``"stsb_en test: a ||| b"``. Either order counts
    when either dataset is sym. Leaks within one dataset are LEAK_COLUMN's (on its test rows).
    """
    import pandas as pd

    marks: list[str | None] = []
    for a, b, split in zip(df["text_a"], df["text_b"], df["split"], strict=True):
        mark = None
        if split == "train":
            keys = [pair_key(a, b, False)] + ([pair_key(b, a, False)] if task == "sym" else [])
            others = [other for key in keys for other in index.get(key, []) if other != name]
            if others:
                mark = f"{' and '.join(sorted(set(others)))} test: {pair_key(a, b, task == 'sym')}"
        marks.append(mark)
    out = df.copy()
    out[CROSS_LEAK_COLUMN] = pd.Series(marks, index=df.index, dtype="object")  # None stays None
    return out


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
        observed = res["observed_value"]
        observed = observed.item() if hasattr(observed, "item") else observed  # numpy scalar
        detail = f"observed {clip(repr(observed))}"
    condition = config.kwargs.get("row_condition")
    if condition:  # a per-split rule: say which rows it was about
        detail = f"rows where {_condition_text(condition)}" + (f"; {detail}" if detail else "")
    return Failure(
        table=table,
        expectation=config.type,
        column=config.kwargs.get("column") or (",".join(config.kwargs.get("column_list", [])) or None),
        unexpected_count=res.get("unexpected_count"),
        examples=list(res.get("partial_unexpected_list") or [])[:MAX_EXAMPLES],
        detail=detail,
    )


def _condition_text(condition: Any) -> str:
    """``split == 'dev'`` for GX's serialised comparison condition; anything else as it is."""
    if isinstance(condition, dict) and condition.get("type") == "comparison":
        column = condition.get("column", {})
        name = column.get("name", column) if isinstance(column, dict) else column
        return f"{name} {condition.get('operator')} {condition.get('parameter')!r}"
    return str(condition)


def _tables(params: Params, prepared_dir: Path) -> list[tuple[str, pd.DataFrame, list[Any]]]:
    """(table name, dataframe with helper columns, expectations) for every prepared table."""
    manifest = read_manifest(prepared_dir)
    pairs = {
        name: (DatasetSpec.from_json(raw_spec), load_pairs(prepared_dir, name))
        for name, raw_spec in manifest["pairs"].items()
    }
    # Every test pair of every dataset: no train pair of any dataset may be one of them.
    index = index_test_pairs(pairs) if params.validation.check_leakage else {}
    out = []
    for name, (spec, df) in pairs.items():
        expectations = pairs_expectations(spec, params)
        if params.validation.check_leakage:
            df = add_cross_leak_column(name, add_leak_column(df, spec.task), spec.task, index)
        if name in PAIR_PROFILES:  # a built-in dataset (custom ones may not reuse the names)
            df = add_chars_columns(df)
            expectations += profile_expectations(PAIR_PROFILES[name], params)
        out.append((f"pairs/{name}", df, expectations))
    for name in manifest["ir"]:
        ir = load_ir(prepared_dir, name)
        query_ids = sorted(ir.queries["query_id"].dropna().unique().tolist())
        doc_ids = sorted(ir.corpus["doc_id"].dropna().unique().tolist())
        for table in ("corpus", "queries", "qrels"):
            expectations = ir_expectations(table, params, query_ids, doc_ids)
            if name in IR_PROFILES:
                lo, hi = IR_PROFILES[name].table_rows(table)
                expectations.append(_row_count(lo, hi))
            out.append((f"ir/{name}/{table}", getattr(ir, table), expectations))
    return out


def _row_count(lo: int, hi: int) -> Any:
    import great_expectations.expectations as gxe

    return gxe.ExpectTableRowCountToBeBetween(min_value=lo, max_value=hi)


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
