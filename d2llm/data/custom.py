"""A user's own pair datasets, declared in params.yaml under ``data.custom``.

Each entry names one file per split (.csv, .tsv, .jsonl or .parquet) and which of its columns
hold the two texts and the label. Files are decoded through sources.read_text, so a wrong
encoding or a broken JSON line is reported with its line number like the built-in sources.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from d2llm.config import CustomPairsDataset
from d2llm.data.schema import DatasetSpec, conform_pairs, normalize_text
from d2llm.data.sources import read_jsonl, read_text
from d2llm.errors import DataError, clip

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
