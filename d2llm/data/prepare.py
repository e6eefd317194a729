"""Raw sources + custom datasets -> canonical parquet tables, written atomically.

``prepare_data`` parses everything in memory first, writes the tables into a temporary folder
next to ``out_dir`` and only then swaps it into place. A parse error, a full disk or a killed
process therefore never leaves a half-written ``data/prepared`` behind, and a previous good
output stays untouched until the new one is complete.

Layout of ``out_dir`` (the contract in docs/architecture.md):
    pairs/<dataset>.parquet
    ir/<dataset>/{corpus,queries,qrels}.parquet
    manifest.json   counts per table and split, dataset specs, sha256 of every raw input
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from d2llm.config import CustomIRDataset, Params
from d2llm.data.catalog import load_catalog
from d2llm.data.custom import load_custom, load_custom_ir
from d2llm.data.fetch import check_source
from d2llm.data.schema import SPLITS, DatasetSpec, asym_positive_pairs, pair_key
from d2llm.data.sources import IRCollection, parse_source
from d2llm.errors import DataError
from d2llm.fingerprint import file_sha256
from d2llm.jsonfile import write_json
from d2llm.layout import CATALOG

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass
class PreparedData:
    """Everything prepare writes, held in memory until it is complete."""

    pairs: dict[str, tuple[DatasetSpec, pd.DataFrame]] = field(default_factory=dict)
    ir: dict[str, IRCollection] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # manifest key -> raw file
    notes: dict[str, str] = field(default_factory=dict)  # table -> what was dropped and why

    def add_pairs(self, name: str, spec: DatasetSpec, df: pd.DataFrame) -> None:
        if name in self.pairs or name in self.ir:
            raise DataError(f"dataset name {name!r} is produced twice; rename the custom dataset")
        self.pairs[name] = (spec, df)


def title_pairs(name: str, collection: IRCollection) -> tuple[DatasetSpec, pd.DataFrame]:
    """Training pairs title -> body from the documents only (never queries or qrels: no test leak)."""
    docs = collection.titles[(collection.titles["title"] != "") & (collection.titles["body"] != "")]
    return asym_positive_pairs(
        f"{name}_titles", name, docs["title"], docs["body"], "always (a document's own title and body)"
    )


def drop_train_test_overlap(name: str, spec: DatasetSpec, df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Drop train pairs that also occur in test (same texts, either order for sym tasks).

    The published SICK and STS-B splits share a few pairs (SICK: 81, STS-B: 12). Training on
    them would leak test labels, so the train copy goes and the official test set stays whole.
    Applied to the built-in sources only: a custom dataset with overlap fails validation instead,
    because there the user has to decide which split is right.
    """
    symmetric = spec.task == "sym"
    keys = pd.Series([pair_key(a, b, symmetric) for a, b in zip(df["text_a"], df["text_b"], strict=True)])
    leaked = (df["split"] == "train") & keys.isin(set(keys[df["split"] == "test"]))
    if not leaked.any():
        return df, ""
    note = f"{int(leaked.sum())} train pairs also in test dropped from train"
    log.warning("%s: %s", name, note)
    return df[~leaked].reset_index(drop=True), note


def drop_empty(name: str, c: IRCollection) -> tuple[IRCollection, str]:
    """Drop documents/queries without text and the qrels that point at them (e.g. Cranfield 471, 995).

    An empty document cannot be encoded or retrieved meaningfully, and validation rejects empty
    text; dropping them here, visibly, is better than failing on the shipped data.
    """
    empty_docs = c.corpus.loc[c.corpus["text"] == "", "doc_id"].tolist()
    empty_queries = c.queries.loc[c.queries["text"] == "", "query_id"].tolist()
    if not empty_docs and not empty_queries:
        return c, ""
    bad_qrels = c.qrels["doc_id"].isin(empty_docs) | c.qrels["query_id"].isin(empty_queries)
    kept = IRCollection(
        corpus=c.corpus[c.corpus["text"] != ""].reset_index(drop=True),
        queries=c.queries[c.queries["text"] != ""].reset_index(drop=True),
        qrels=c.qrels[~bad_qrels].reset_index(drop=True),
        titles=c.titles,
    )
    parts = []
    if empty_docs:
        ids = ", ".join(empty_docs)
        parts.append(f"{len(c.corpus)} documents parsed, {len(empty_docs)} empty dropped ({ids})")
    if empty_queries:
        parts.append(f"{len(empty_queries)} empty queries dropped ({', '.join(empty_queries)})")
    parts.append(f"{int(bad_qrels.sum())} qrels on them dropped")
    note = "; ".join(parts)
    log.warning("%s: %s", name, note)
    return kept, note


def build_tables(params: Params, raw_dir: Path, catalog_path: Path) -> PreparedData:
    """Parse every configured source (its files checked against the catalogue) and custom dataset."""
    cfg = params.data
    out = PreparedData()
    catalog = load_catalog(catalog_path) if cfg.sources else None
    for source in cfg.sources:
        check_source(source, catalog.source(source), raw_dir)  # type: ignore[union-attr]
        parsed = parse_source(source, raw_dir, cfg)
        for path in parsed.files:
            out.files[path.relative_to(raw_dir).as_posix()] = path
        for table, note in parsed.notes.items():  # what the parser itself dropped or repaired
            _add_note(out, table, note)
        for name, (spec, df) in parsed.pairs.items():
            df, note = drop_train_test_overlap(name, spec, df)
            _add_note(out, f"pairs/{name}", note)
            out.add_pairs(name, spec, df)
        for name, collection in parsed.ir.items():
            collection, note = drop_empty(name, collection)
            out.ir[name] = collection
            _add_note(out, f"ir/{name}/corpus", note)
            if cfg.ir_train_pairs == "title_body":
                spec, df = title_pairs(name, collection)
                out.add_pairs(spec.name, spec, df)
    for ds in cfg.custom:
        if isinstance(ds, CustomIRDataset):
            files = add_custom_ir(out, ds)
        else:
            spec, df, files = load_custom(ds)
            out.add_pairs(ds.name, spec, df)
        for path in files:
            out.files[f"custom/{ds.name}/{path.name}"] = path
    return out


def _add_note(out: PreparedData, table: str, note: str) -> None:
    if note:
        out.notes[table] = f"{out.notes[table]}; {note}" if table in out.notes else note


def add_custom_ir(out: PreparedData, ds: CustomIRDataset) -> list[Path]:
    """Add a user's IR collection (and its training pairs, if any); returns the files read."""
    collection, train, files = load_custom_ir(ds)
    if ds.name in out.ir or ds.name in out.pairs:
        raise DataError(f"dataset name {ds.name!r} is produced twice; rename the custom dataset")
    out.ir[ds.name] = collection
    if train is not None:
        spec, df = train
        out.add_pairs(spec.name, spec, df)
    return files


def count_tables(data: PreparedData) -> dict[str, dict[str, int]]:
    """Row counts per table and split (IR tables have only a total)."""
    counts: dict[str, dict[str, int]] = {}
    for name, (_, df) in sorted(data.pairs.items()):
        per_split = df["split"].value_counts()
        counts[f"pairs/{name}"] = {s: int(per_split.get(s, 0)) for s in SPLITS} | {"total": len(df)}
    for name, c in sorted(data.ir.items()):
        counts[f"ir/{name}/corpus"] = {"total": len(c.corpus)}
        relevant = c.qrels["relevance"] > 0
        judged = int(c.queries["query_id"].isin(c.qrels.loc[relevant, "query_id"]).sum())
        counts[f"ir/{name}/queries"] = {"total": len(c.queries), "with_qrels": judged}
        counts[f"ir/{name}/qrels"] = {"total": len(c.qrels), "relevant": int(relevant.sum())}
    return counts


def _write(data: PreparedData, folder: Path) -> dict[str, Any]:
    (folder / "pairs").mkdir(parents=True)
    for name, (_, df) in data.pairs.items():
        df.to_parquet(folder / "pairs" / f"{name}.parquet", index=False)
    for name, c in data.ir.items():
        (folder / "ir" / name).mkdir(parents=True)
        for table in ("corpus", "queries", "qrels"):
            getattr(c, table).to_parquet(folder / "ir" / name / f"{table}.parquet", index=False)
    manifest = {
        "version": MANIFEST_VERSION,
        "pairs": {name: spec.to_json() for name, (spec, _) in sorted(data.pairs.items())},
        "ir": sorted(data.ir),
        "counts": count_tables(data),
        "notes": data.notes,
        "raw_inputs": {key: file_sha256(path) for key, path in sorted(data.files.items())},
    }
    write_json(folder / MANIFEST, manifest, ensure_ascii=False)
    return manifest


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp`` with renames (atomic on one filesystem)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if old is not None:
            old.rename(out_dir)  # put the previous good output back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_data(
    params: Params, raw_dir: str | Path, out_dir: str | Path, catalog: str | Path = CATALOG
) -> dict[str, Any]:
    """Parse, write and swap in the canonical tables; returns the manifest (with ``counts``).

    Every raw file of a built-in source is checked against its sha256 in ``catalog`` first.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir() and params.data.sources:
        raise DataError(f"raw data folder {raw_dir} not found: run `d2llm fetch-data` first")
    data = build_tables(params, raw_dir, Path(catalog))
    if not data.pairs and not data.ir:
        raise DataError("nothing to prepare: data.sources and data.custom are both empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the swapped-in folder should not be
    try:
        manifest = _write(data, tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %d pair datasets and %d IR collections in %s", len(data.pairs), len(data.ir), out_dir)
    return manifest


def print_counts(manifest: dict[str, Any], file: TextIO | None = None) -> None:
    """Print row counts per table and split (and what was dropped) as an aligned table."""
    file = file or sys.stdout
    counts: dict[str, dict[str, int]] = manifest.get("counts", manifest)
    notes: dict[str, str] = manifest.get("notes", {})
    width = max([len("table"), *(len(t) for t in counts)])
    head = f"{'table':<{width}}  {'train':>7}  {'dev':>7}  {'test':>7}  {'total':>7}  notes"
    print(head, file=file)
    print("-" * len(head), file=file)
    for table, row in counts.items():
        cells = [f"{row[s]:>7}" if s in row else f"{'-':>7}" for s in (*SPLITS, "total")]
        extra = [f"{k} {v}" for k, v in row.items() if k not in (*SPLITS, "total")]
        if table in notes:
            extra.append(notes[table])
        print(f"{table:<{width}}  {'  '.join(cells)}  {'; '.join(extra)}".rstrip(), file=file)
