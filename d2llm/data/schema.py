"""The canonical tables every other module reads (see docs/architecture.md, "Canonical tables").

Parsers and custom datasets produce these tables; ``conform`` is the single gate that checks
the columns are there and casts them to the declared dtypes, so a parser cannot silently ship
an object column of mixed ints and strings to the trainer.

A ``DatasetSpec`` travels with every pair table (it is written into manifest.json) and tells the
validator which labels are legal for that dataset: a score range, or a class set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from d2llm.errors import DataError, clip

if TYPE_CHECKING:
    import pandas as pd

SPLITS: tuple[str, ...] = ("train", "dev", "test")
TASKS: tuple[str, ...] = ("sym", "asym")

PAIR_COLUMNS: tuple[str, ...] = (
    "text_a",
    "text_b",
    "label",
    "label_name",
    "task",
    "source",
    "split",
    "is_positive",
)
PAIR_DTYPES: dict[str, str] = {
    "text_a": "str",
    "text_b": "str",
    "label": "float64",
    "label_name": "str",
    "task": "str",
    "source": "str",
    "split": "str",
    "is_positive": "bool",
}

# IR ids are strings: collections number their documents in different ways, and the metric
# libraries (pytrec_eval, ir-measures) key runs and qrels by string ids.
CORPUS_COLUMNS: tuple[str, ...] = ("doc_id", "text")
CORPUS_DTYPES: dict[str, str] = {"doc_id": "str", "text": "str"}
QUERY_COLUMNS: tuple[str, ...] = ("query_id", "text")
QUERY_DTYPES: dict[str, str] = {"query_id": "str", "text": "str"}
QREL_COLUMNS: tuple[str, ...] = ("query_id", "doc_id", "relevance")
QREL_DTYPES: dict[str, str] = {"query_id": "str", "doc_id": "str", "relevance": "int64"}

IR_TABLES: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "corpus": (CORPUS_COLUMNS, CORPUS_DTYPES),
    "queries": (QUERY_COLUMNS, QUERY_DTYPES),
    "qrels": (QREL_COLUMNS, QREL_DTYPES),
}

# Class ids of the three-way NLI datasets: the order is part of the contract (label = class id).
NLI_CLASSES: tuple[str, ...] = ("entailment", "neutral", "contradiction")


def dataset_family(task: str, label_kind: str) -> Literal["nli", "sts", "asym"]:
    """``asym`` for query -> passage data; for sym data ``nli`` when labels are classes (entailment,
    paraphrase: a yes/no judgement) and ``sts`` when they are graded scores (relatedness).

    Class datasets may have any number of classes: three for SICK, SNLI and OCNLI (NLI_CLASSES),
    two for RTE (entailment / not_entailment) and the paraphrase sets MSRP and Twitter URL (no /
    yes). Consumers read ``is_positive`` (the dataset's positive class against the rest), never
    the class id, whose meaning differs per ``label_set``.

    A per-family student (``student.iem.branches: family``) scores each family with its own IEM
    branch: SICK and SICK-R are the same pairs, judged for entailment and for relatedness.
    """
    if task == "asym":
        return "asym"
    return "nli" if label_kind == "class" else "sts"


@dataclass(frozen=True)
class DatasetSpec:
    """What a pair dataset's labels mean, so that validation can check them."""

    name: str
    task: Literal["sym", "asym"]
    label_kind: Literal["score", "class"]
    source: str
    label_range: tuple[float, float] | None = None  # score datasets, inclusive
    label_set: tuple[str, ...] | None = None  # class datasets; label = index into this
    positive_rule: str = ""  # human-readable, for docs and the manifest
    splits: tuple[str, ...] = field(default=SPLITS)

    @property
    def family(self) -> Literal["nli", "sts", "asym"]:
        """The kind of judgement: see :func:`dataset_family`."""
        return dataset_family(self.task, self.label_kind)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["label_range"] = list(self.label_range) if self.label_range else None
        out["label_set"] = list(self.label_set) if self.label_set else None
        out["splits"] = list(self.splits)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DatasetSpec:
        return cls(
            name=raw["name"],
            task=raw["task"],
            label_kind=raw["label_kind"],
            source=raw["source"],
            label_range=tuple(raw["label_range"]) if raw.get("label_range") else None,
            label_set=tuple(raw["label_set"]) if raw.get("label_set") else None,
            positive_rule=raw.get("positive_rule", ""),
            splits=tuple(raw.get("splits", SPLITS)),
        )


def normalize_text(text: object) -> str:
    """Collapse runs of whitespace (line breaks of SMART files, tabs, CR) to single spaces."""
    if text is None:
        return ""
    if isinstance(text, float) and text != text:  # NaN from pandas readers
        return ""
    return " ".join(str(text).split())


def pair_key(a: str, b: str, symmetric: bool) -> str:
    """Identity of a pair for leakage checks: case- and whitespace-insensitive, unordered if symmetric."""
    a, b = " ".join(str(a).lower().split()), " ".join(str(b).lower().split())
    if symmetric and b < a:
        a, b = b, a
    return f"{a} ||| {b}"


def conform(df: pd.DataFrame, columns: tuple[str, ...], dtypes: dict[str, str], what: str) -> pd.DataFrame:
    """Return ``df`` with exactly ``columns`` in order, cast to ``dtypes``; DataError if any is missing."""
    if len(df) == 0 and len(df.columns) == 0:  # built from no rows at all: an empty table, not an error
        df = df.reindex(columns=list(columns))
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}; expected {list(columns)}")
    out = df.loc[:, list(columns)].reset_index(drop=True)
    for col in columns:
        try:
            out[col] = out[col].astype(dtypes[col])
        except (TypeError, ValueError) as err:
            raise DataError(
                f"{what}: column {col!r} cannot be read as {dtypes[col]}: {clip(str(err))}"
            ) from None
    return out


def conform_pairs(df: pd.DataFrame, what: str) -> pd.DataFrame:
    return conform(df, PAIR_COLUMNS, PAIR_DTYPES, what)


def conform_ir(df: pd.DataFrame, table: str, what: str) -> pd.DataFrame:
    columns, dtypes = IR_TABLES[table]
    return conform(df, columns, dtypes, what)


def asym_positive_pairs(
    name: str, source: str, text_a: Any, text_b: Any, positive_rule: str
) -> tuple[DatasetSpec, pd.DataFrame]:
    """A train-only asym pair table whose every row is a positive (label 1.0), with its spec.

    Used for training pairs derived from IR collections: titles -> bodies, queries -> their
    judged-relevant documents.
    """
    import pandas as pd

    df = pd.DataFrame(
        {
            "text_a": text_a,
            "text_b": text_b,
            "label": 1.0,
            "label_name": "",
            "task": "asym",
            "source": source,
            "split": "train",
            "is_positive": True,
        }
    )
    spec = DatasetSpec(
        name=name,
        task="asym",
        label_kind="score",
        source=source,
        label_range=(1.0, 1.0),
        positive_rule=positive_rule,
        splits=("train",),
    )
    return spec, conform_pairs(df.reset_index(drop=True), name)
