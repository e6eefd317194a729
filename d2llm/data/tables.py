"""Readers of the prepared tables, for the modules downstream of ``d2llm prepare``.

They fail with an ArtifactError that says what is missing and what is available, because the
usual cause is a config naming a dataset that was not prepared (or prepare not run at all).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from d2llm.errors import ArtifactError

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class IRDataset:
    """One prepared IR collection: ``corpus`` (doc_id, text), ``queries`` (query_id, text) and
    ``qrels`` (query_id, doc_id, relevance; > 0 means relevant)."""

    name: str
    corpus: pd.DataFrame
    queries: pd.DataFrame
    qrels: pd.DataFrame

    def relevant(self) -> dict[str, dict[str, int]]:
        """qrels as ``{query_id: {doc_id: relevance}}`` for the relevant pairs only."""
        out: dict[str, dict[str, int]] = {}
        for q, d, r in self.qrels[self.qrels["relevance"] > 0].itertuples(index=False):
            out.setdefault(q, {})[d] = int(r)
        return out


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    path = Path(prepared_dir) / "manifest.json"
    if not path.exists():
        raise ArtifactError(f"{path} not found: run `d2llm prepare` first")
    return json.loads(path.read_text(encoding="utf-8"))


def dataset_families(prepared_dir: str | Path, datasets: Iterable[str]) -> dict[str, str]:
    """``{dataset: family}`` (nli, sts, asym; d2llm.data.schema.dataset_family) for the prepared
    pair datasets among ``datasets``; those not prepared in ``prepared_dir`` are left out."""
    import pandas as pd

    out = {}
    for name in datasets:
        path = Path(prepared_dir) / "pairs" / f"{name}.parquet"
        if path.exists():
            out[name] = table_family(pd.read_parquet(path, columns=["task", "label_name"]))
    return out


def table_family(df: pd.DataFrame) -> Literal["nli", "sts", "asym"]:
    """The family of a pair table (its task kind, and class labels or scores): the IEM branch
    key of a per-family student."""
    from d2llm.data.schema import dataset_family

    is_class = bool((df["label_name"].fillna("").astype(str) != "").any())
    return dataset_family(str(df["task"].iloc[0]), "class" if is_class else "score")


def pair_datasets(prepared_dir: str | Path) -> list[str]:
    return sorted(p.stem for p in (Path(prepared_dir) / "pairs").glob("*.parquet"))


def ir_datasets(prepared_dir: str | Path) -> list[str]:
    return sorted(p.name for p in (Path(prepared_dir) / "ir").glob("*") if p.is_dir())


def load_pairs(prepared_dir: str | Path, dataset: str, split: str | None = None) -> pd.DataFrame:
    """The canonical pair table of ``dataset``, optionally one split, with a fresh 0..n-1 index."""
    import pandas as pd

    path = Path(prepared_dir) / "pairs" / f"{dataset}.parquet"
    if not path.exists():
        raise ArtifactError(
            f"pair dataset {dataset!r} not found in {prepared_dir} "
            f"(available: {pair_datasets(prepared_dir)}); "
            "add it to data.sources/data.custom and run `d2llm prepare`"
        )
    df = pd.read_parquet(path)
    if split is not None:
        if split not in ("train", "dev", "test"):
            raise ArtifactError(f"split {split!r} unknown; expected train, dev or test")
        df = df[df["split"] == split].reset_index(drop=True)
    return df


def load_ir(prepared_dir: str | Path, dataset: str) -> IRDataset:
    import pandas as pd

    folder = Path(prepared_dir) / "ir" / dataset
    if not folder.is_dir():
        raise ArtifactError(
            f"IR dataset {dataset!r} not found in {prepared_dir} (available: {ir_datasets(prepared_dir)}); "
            "run `d2llm prepare` with it in data.sources"
        )
    tables = {t: pd.read_parquet(folder / f"{t}.parquet") for t in ("corpus", "queries", "qrels")}
    return IRDataset(name=dataset, **tables)
