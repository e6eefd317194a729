"""Dev splits: the only data that selects anything (teacher epoch, distilled families, the
student's early-stopping step, recipes, promotion). Test splits are read by
``d2llm.evaluation.evaluate`` alone, for the report.

Each dev split is cut once into two parts (``in_validate_part``, a salted hash of the pair or
question; d2llm.config.SelectionConfig): *select*, which tuning reads (the teacher's epoch and
fusion weights, early stopping, recipes), and *validate*, which nothing is tuned on (the gate on
the datasets worth distilling, promotion, the validation figure of the report).

One ``DevSet`` per prepared pair dataset; its metric follows from the dataset's kind:

| dataset kind | example | metric |
|---|---|---|
| class labels, sym | sick, snli | ``ap``: average precision of ``is_positive`` |
| scores | stsb_en, sick_r | ``spearman`` with the gold score |
| class labels, asym | trecqa | ``map``: mean average precision per question |

Every value is in points (x100). ``dev_score`` turns any scorer's outputs into that number, so
the teacher, the bi-encoder and the student are measured by one function. ``dataset_metric``
is the one answer to "what kind of dataset is this table"; ``sample_rows`` the one seeded
sampler of pair rows (dev, test and the teacher's training pairs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from d2llm.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from d2llm.config import Family, TaskKind

DevMetric = Literal["ap", "spearman", "map"]
# The two parts every dev split is cut into (d2llm.config.SelectionConfig).
DevPart = Literal["select", "validate"]


@dataclass(frozen=True)
class DevSet:
    """Pairs of one dataset's dev split with the gold signal its metric needs."""

    dataset: str
    task: TaskKind
    pairs: list[tuple[str, str]]
    gold: np.ndarray  # is_positive (ap, map) or the gold score (spearman)
    metric: DevMetric
    family: Family  # the student's scoring key (nli, sts, asym): see table_family
    part: DevPart = "select"

    @property
    def name(self) -> str:
        """``<dataset>/<metric>``: the key of this set in every report."""
        return f"{self.dataset}/{self.metric}"


def dataset_metric(df: pd.DataFrame) -> DevMetric:
    """The selection metric of a pair table, which says its kind: ``spearman`` for score datasets,
    ``ap`` / ``map`` for class datasets (those that name their labels in ``label_name``), sym / asym."""
    is_class = bool((df["label_name"].fillna("").astype(str) != "").any())
    if not is_class:
        return "spearman"
    return "map" if str(df["task"].iloc[0]) == "asym" else "ap"


def sample_rows(
    df: pd.DataFrame,
    limit: int | None,
    seed: int,
    *,
    whole_questions: bool = False,
    table_order: bool = True,
) -> pd.DataFrame:
    """At most ``limit`` rows of a pair table, a seeded sample: the one sampler of pairs.

    Dev sets (here), test sets (d2llm.evaluation.evaluate) and the teacher's training pairs
    (d2llm.teachers.finetune) are all capped with it. ``whole_questions`` keeps whole questions
    (every row of a ``text_a``, questions in a seeded order, until the next would pass
    ``limit``) so that rankings per question stay complete (``map``). ``table_order`` returns
    the rows in table order; False keeps the sample's own order (teacher fine-tuning's).
    """
    if limit is None or len(df) <= limit:
        return df
    if not whole_questions:
        sample = df.sample(n=limit, random_state=seed)
        return sample.sort_index() if table_order else sample
    questions = df["text_a"].drop_duplicates().sample(frac=1.0, random_state=seed).tolist()
    sizes = df.groupby("text_a").size()
    kept, total = set(), 0
    for q in questions:
        if total + sizes[q] > limit and kept:
            break
        kept.add(q)
        total += int(sizes[q])
    return df[df["text_a"].isin(kept)]


def dev_part_keys(df: pd.DataFrame) -> pd.Series:
    """The key that decides a dev row's part: its question (asym: a question's candidates stay
    together), else its pair (either order)."""
    import pandas as pd

    from d2llm.data.schema import pair_key

    if str(df["task"].iloc[0]) == "asym":
        return df["text_a"]
    keys = [pair_key(a, b, True) for a, b in zip(df["text_a"], df["text_b"], strict=True)]
    return pd.Series(keys, index=df.index)


def in_validate_part(df: pd.DataFrame, validate_fraction: float) -> pd.Series:
    """Whether each dev row is in the *validate* part (else *select*), by a hash of its key.

    The hash is salted so that the cut is independent of the hash splits made by ``prepare``
    (TREC-QA's dev questions are those whose plain hash is below 0.3: unsalted, they would all
    fall on one side).
    """
    from d2llm.data.sources import hash_fraction

    fractions = dev_part_keys(df).map(lambda key: hash_fraction(f"dev-part:{key}"))
    return fractions < validate_fraction


def rankable_questions(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of questions with both a right and a wrong candidate: the only ones MAP ranks, so
    a sample of pairs is not spent on questions that cannot count (most of WikiQA's)."""
    by_question = df.groupby("text_a")["is_positive"]
    mixed = by_question.transform("max").astype(bool) & ~by_question.transform("min").astype(bool)
    return df[mixed]


def load_dev_set(
    prepared_dir: str | Path,
    dataset: str,
    max_pairs: int | None,
    seed: int,
    part: DevPart,
    validate_fraction: float,
) -> DevSet:
    """One part of the dev split of a prepared pair dataset (a seeded sample of at most ``max_pairs``).

    ``part`` is ``select`` (what tuning may read) or ``validate`` (what it may not): see
    ``in_validate_part`` and d2llm.config.SelectionConfig.
    """
    from d2llm.data.tables import load_pairs, table_family

    table = load_pairs(prepared_dir, dataset)
    df = table[table["split"] == "dev"]
    if df.empty:
        raise DataError(f"dataset {dataset!r} has no dev split in {prepared_dir}; choose another dev dataset")
    tasks = df["task"].unique().tolist()
    if len(tasks) != 1:
        raise DataError(f"dataset {dataset!r} mixes task kinds {tasks}; a dataset must have one")
    metric = dataset_metric(table)
    if metric == "map":
        df = rankable_questions(df)
    if not df.empty:
        validate = in_validate_part(df, validate_fraction)
        df = df[validate] if part == "validate" else df[~validate]
    if df.empty:
        raise DataError(
            f"the {part} part of {dataset!r}'s dev split is empty; change selection.validate_fraction"
        )
    df = sample_rows(df, max_pairs, seed, whole_questions=metric == "map")
    if metric == "spearman":
        gold = df["label"].to_numpy(dtype=float)
    else:
        gold = df["is_positive"].to_numpy(dtype=float)
        if gold.min() == gold.max():
            raise DataError(
                f"the {part} part of {dataset!r}'s dev split has only one class: {metric} is undefined"
            )
    return DevSet(
        dataset=dataset,
        task=tasks[0],
        pairs=list(zip(df["text_a"], df["text_b"], strict=True)),
        gold=gold,
        metric=metric,
        family=table_family(table),
        part=part,
    )


def load_dev_sets(
    prepared_dir: str | Path,
    datasets: Sequence[str],
    max_pairs: int | None,
    seed: int,
    part: DevPart,
    validate_fraction: float,
) -> list[DevSet]:
    return [load_dev_set(prepared_dir, name, max_pairs, seed, part, validate_fraction) for name in datasets]


def dev_sets_id(dev_sets: Sequence[DevSet]) -> str:
    """sha256 of exactly what ``dev_sets`` hold (datasets, parts, pairs, gold): two reports with
    the same id were measured on the same pairs."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for dev in dev_sets:
        record = {"name": dev.name, "part": dev.part, "pairs": dev.pairs, "gold": dev.gold.tolist()}
        digest.update(json.dumps(record, ensure_ascii=False).encode())
    return digest.hexdigest()


def dev_score(dev: DevSet, scores: Sequence[float] | np.ndarray) -> float:
    """The dev metric of ``scores`` (one per pair of ``dev``), in points."""
    from d2llm.evaluation import metrics as M

    scores = np.asarray(scores, dtype=float)
    if dev.metric == "ap":
        return 100.0 * M.average_precision(scores, dev.gold)
    if dev.metric == "spearman":
        return 100.0 * M.spearman(scores, dev.gold)
    questions = [a for a, _ in dev.pairs]
    return M.answer_selection_metrics(questions, scores, dev.gold)["map"]


def mean_metric(values: dict[str, float]) -> float:
    """The mean over dev sets: the single number selection maximises (NaN when there is none)."""
    finite = [v for v in values.values() if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def task_kind_mean(values: dict[str, float], dev_sets: Sequence[DevSet]) -> float:
    """The mean of the sym sets' mean and the asym sets' mean (a kind without sets is left out):
    ranking and sentence-pair judgements weigh the same, however many sets each kind has."""
    kinds = {dev.name: dev.task for dev in dev_sets}
    by_kind = [
        mean_metric({n: v for n, v in values.items() if kinds.get(n) == kind}) for kind in ("sym", "asym")
    ]
    return mean_metric({kind: v for kind, v in zip(("sym", "asym"), by_kind, strict=True)})
