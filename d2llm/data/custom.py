"""A user's own datasets, declared in params.yaml under ``data.custom``: pairs or IR collections.

A pair entry names one file per split (.csv, .tsv, .jsonl or .parquet) and which of its columns
hold the two texts and the label. An IR entry (``kind: ir``) names a corpus, a queries and a
qrels file (and optionally training qrels) and their columns; every id in the qrels must exist,
and an error names the file and data row. Files are decoded through sources.read_text, so a wrong
encoding or a broken JSON line is reported with its line number like the built-in sources.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from d2llm.config import CustomIRDataset, CustomPairsDataset
from d2llm.data.schema import DatasetSpec, asym_positive_pairs, conform_pairs, normalize_text
from d2llm.data.sources import read_jsonl, read_text
from d2llm.errors import DataError, clip

if TYPE_CHECKING:
    from d2llm.data.sources import IRCollection

FORMATS = (".csv", ".tsv", ".jsonl", ".parquet")


def custom_spec(ds: CustomPairsDataset) -> DatasetSpec:
    if ds.label_kind == "score":
        rule = f"score >= {positive_min_score(ds):g}"
    else:
        rule = f"label_name in {list(ds.positive_labels)}"
    return DatasetSpec(
        name=ds.name,
        task=ds.task,
        label_kind=ds.label_kind,
        source=ds.name,
        label_range=tuple(ds.label_range) if ds.label_range else None,
        label_set=tuple(ds.label_set) if ds.label_set else None,
        positive_rule=rule,
        splits=tuple(sorted(ds.files, key=["train", "dev", "test"].index)),
    )


def positive_min_score(ds: CustomPairsDataset) -> float:
    """Explicit ``positive_min_score``, else 80% up the range (4 of 5 on the STS scale)."""
    if ds.positive_min_score is not None:
        return ds.positive_min_score
    assert ds.label_range is not None  # guaranteed by the config validator
    lo, hi = ds.label_range
    return lo + 0.8 * (hi - lo)


def read_table(path: Path) -> pd.DataFrame:
    """Read a user file by its suffix; every value as a string (labels are parsed later)."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unsupported format {suffix!r}; expected one of {list(FORMATS)}")
    if suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except Exception as err:  # pyarrow raises several unrelated types for a broken file
            raise DataError(f"{path}: not a readable parquet file: {clip(str(err))}") from None
    if suffix == ".jsonl":
        return pd.DataFrame([obj for _, obj in read_jsonl(path, ())])
    text = read_text(path)
    try:
        sep = "\t" if suffix == ".tsv" else ","
        return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: malformed {suffix[1:]} file: {clip(str(err))}") from None


def _labels(df: pd.DataFrame, ds: CustomPairsDataset, path: Path) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(label, label_name, is_positive) columns from the raw label column."""
    raw = df[ds.columns.label]
    if ds.label_kind == "score":
        label = pd.to_numeric(raw, errors="coerce").astype("float64")
        bad = label.isna() & raw.notna()
        if bad.any():
            row = int(bad.idxmax())
            raise DataError(
                f"{path}: data row {row + 1}: label {clip(repr(raw.iloc[row]))} "
                f"in column {ds.columns.label!r} is not a number"
            )
        return label, pd.Series([""] * len(df)), label >= positive_min_score(ds)
    names = raw.map(lambda v: "" if v is None else str(v).strip())
    assert ds.label_set is not None
    unknown = ~names.isin(ds.label_set)
    if unknown.any():
        row = int(unknown.idxmax())
        raise DataError(
            f"{path}: data row {row + 1}: label {clip(repr(names.iloc[row]))} in column {ds.columns.label!r} "
            f"is not in label_set {ds.label_set} ({int(unknown.sum())} such rows)"
        )
    label = names.map(ds.label_set.index).astype("float64")
    return label, names, names.isin(ds.positive_labels)


def load_custom(
    ds: CustomPairsDataset, base_dir: Path = Path(".")
) -> tuple[DatasetSpec, pd.DataFrame, list[Path]]:
    """Read every split file of one custom dataset into a canonical pair table."""
    frames, files = [], []
    for split in ("train", "dev", "test"):
        if split not in ds.files:
            continue
        path = Path(ds.files[split])
        path = path if path.is_absolute() else base_dir / path
        files.append(path)
        df = read_table(path).reset_index(drop=True)
        wanted = {"text_a": ds.columns.text_a, "text_b": ds.columns.text_b, "label": ds.columns.label}
        missing = [f"{col!r} (for {canon})" for canon, col in wanted.items() if col not in df.columns]
        if missing:
            raise DataError(
                f"{path}: dataset {ds.name!r}: missing column(s) {', '.join(missing)}; "
                f"the file has {clip(repr(list(df.columns)))} - fix the file or data.custom[].columns"
            )
        label, label_name, positive = _labels(df, ds, path)
        frames.append(
            pd.DataFrame(
                {
                    "text_a": df[ds.columns.text_a].map(normalize_text),
                    "text_b": df[ds.columns.text_b].map(normalize_text),
                    "label": label,
                    "label_name": label_name,
                    "task": ds.task,
                    "source": ds.name,
                    "split": split,
                    "is_positive": positive.astype(bool),
                }
            )
        )
    table = conform_pairs(pd.concat(frames, ignore_index=True), f"custom dataset {ds.name!r}")
    return custom_spec(ds), table, files


# --------------------------------------------------------------------------- IR collections


def _ir_table(path: Path, dataset: str, wanted: dict[str, str]) -> pd.DataFrame:
    """The file's mapped columns under their canonical names; errors name file and columns."""
    df = read_table(path).reset_index(drop=True)
    missing = [f"{col!r} (for {canon})" for canon, col in wanted.items() if col not in df.columns]
    if missing:
        raise DataError(
            f"{path}: IR dataset {dataset!r}: missing column(s) {', '.join(missing)}; "
            f"the file has {list(df.columns)} - fix the file or data.custom[].columns"
        )
    return pd.DataFrame({canon: df[col] for canon, col in wanted.items()})


def _ids(frame: pd.DataFrame, column: str, path: Path, unique: bool) -> pd.Series:
    ids = frame[column].map(
        lambda v: "" if v is None or (isinstance(v, float) and v != v) else str(v).strip()
    )
    empty = ids == ""
    if empty.any():
        row = int(empty.idxmax())
        raise DataError(f"{path}: data row {row + 1}: {column} is empty")
    if unique:
        repeated = ids.duplicated()
        if repeated.any():
            row = int(repeated.idxmax())
            raise DataError(f"{path}: data row {row + 1}: {column} {ids.iloc[row]!r} repeats an earlier row")
    return ids


def _texts(frame: pd.DataFrame, path: Path) -> pd.Series:
    texts = frame["text"].map(normalize_text)
    empty = texts == ""
    if empty.any():
        row = int(empty.idxmax())
        raise DataError(f"{path}: data row {row + 1}: text is empty ({int(empty.sum())} such rows)")
    return texts


def _qrels(path: Path, ds: CustomIRDataset, query_ids: set[str], doc_ids: set[str]) -> pd.DataFrame:
    c = ds.columns
    frame = _ir_table(
        path, ds.name, {"query_id": c.query_id, "doc_id": c.qrels_doc_id, "relevance": c.relevance}
    )
    qids, dids = _ids(frame, "query_id", path, unique=False), _ids(frame, "doc_id", path, unique=False)
    relevance = pd.to_numeric(frame["relevance"], errors="coerce")
    bad = relevance.isna() | (relevance != relevance.round())
    if bad.any():
        row = int(bad.idxmax())
        raise DataError(
            f"{path}: data row {row + 1}: relevance {frame['relevance'].iloc[row]!r} in column "
            f"{c.relevance!r} is not an integer"
        )
    for ids, known, what in ((dids, doc_ids, "doc id"), (qids, query_ids, "query id")):
        unknown = ~ids.isin(known)
        if unknown.any():
            row = int(unknown.idxmax())
            source = ds.corpus if what == "doc id" else ds.queries
            raise DataError(
                f"{path}: data row {row + 1}: {what} {ids.iloc[row]!r} is not in {source} "
                f"({int(unknown.sum())} such rows)"
            )
    pairs = pd.DataFrame({"query_id": qids, "doc_id": dids, "relevance": relevance.astype("int64")})
    repeated = pairs.duplicated(["query_id", "doc_id"])
    if repeated.any():
        row = int(repeated.idxmax())
        raise DataError(
            f"{path}: data row {row + 1}: query {qids.iloc[row]!r} and doc {dids.iloc[row]!r} "
            "are judged twice"
        )
    return pairs


def load_custom_ir(
    ds: CustomIRDataset, base_dir: Path = Path(".")
) -> tuple[IRCollection, tuple[DatasetSpec, pd.DataFrame] | None, list[Path]]:
    """Read one custom IR collection: ``(IRCollection, train pairs spec and table or None, files)``."""
    from d2llm.data.schema import conform_ir
    from d2llm.data.sources import IRCollection

    def resolve(name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else base_dir / path

    c = ds.columns
    corpus_path, queries_path, qrels_path = resolve(ds.corpus), resolve(ds.queries), resolve(ds.qrels)
    corpus = _ir_table(corpus_path, ds.name, {"doc_id": c.doc_id, "text": c.doc_text})
    corpus = pd.DataFrame(
        {"doc_id": _ids(corpus, "doc_id", corpus_path, True), "text": _texts(corpus, corpus_path)}
    )
    queries = _ir_table(queries_path, ds.name, {"query_id": c.query_id, "text": c.query_text})
    queries = pd.DataFrame(
        {"query_id": _ids(queries, "query_id", queries_path, True), "text": _texts(queries, queries_path)}
    )
    doc_ids, query_ids = set(corpus["doc_id"]), set(queries["query_id"])
    qrels = _qrels(qrels_path, ds, query_ids, doc_ids)
    files = [corpus_path, queries_path, qrels_path]
    what = f"custom IR dataset {ds.name!r}"
    collection = IRCollection(
        corpus=conform_ir(corpus, "corpus", what),
        queries=conform_ir(queries, "queries", what),
        qrels=conform_ir(qrels, "qrels", what),
        titles=pd.DataFrame({"doc_id": [], "title": [], "body": []}),
    )
    if ds.train_qrels is None:
        return collection, None, files
    train_path = resolve(ds.train_qrels)
    files.append(train_path)
    train = _qrels(train_path, ds, query_ids, doc_ids)
    leaked = train["query_id"].isin(set(qrels["query_id"]))
    if leaked.any():
        row = int(leaked.idxmax())
        raise DataError(
            f"{train_path}: data row {row + 1}: query {train['query_id'].iloc[row]!r} is also judged in "
            f"{qrels_path} (evaluation): a query is either for training or for evaluation"
        )
    return collection, qrels_train_pairs(ds.name, train, corpus, queries), files


def qrels_train_pairs(
    name: str, train: pd.DataFrame, corpus: pd.DataFrame, queries: pd.DataFrame
) -> tuple[DatasetSpec, pd.DataFrame]:
    """Asym training pairs query text -> relevant document text from training qrels."""
    relevant = train[train["relevance"] > 0]
    doc_text = dict(zip(corpus["doc_id"], corpus["text"], strict=True))
    query_text = dict(zip(queries["query_id"], queries["text"], strict=True))
    return asym_positive_pairs(
        f"{name}_train",
        name,
        relevant["query_id"].map(query_text),
        relevant["doc_id"].map(doc_text),
        "always (a query and a document its training qrels judge relevant)",
    )
