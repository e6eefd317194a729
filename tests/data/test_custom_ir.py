"""A user's own IR collection in ``data.custom`` (``kind: ir``): prepared, validated, evaluated, mined.

Each test writes a small collection in its own folder: corpus (CSV), queries (JSONL), qrels (TSV)
and training qrels (parquet), with column names other than the canonical ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from d2llm_data_helpers import tree_snapshot

from d2llm.config import Params, params_from_dict
from d2llm.data.prepare import prepare_data
from d2llm.data.tables import load_ir, load_pairs
from d2llm.errors import ConfigError, DataError

DOCS = {
    "D1": "Shock waves form on a wedge in supersonic air flow.",
    "D2": "Boundary layers of air thicken along a flat plate.",
    "D3": "Heat transfer of air flow rises near the stagnation point.",
    "D4": "Wings flutter when aerodynamic and elastic forces couple in air flow.",
    "D5": "Jets of air mix faster with swirl.",
}
QUERIES = {
    "q1": "what happens to flow over a wedge",
    "q2": "how does a boundary layer grow",
    "q3": "when do wings flutter in air flow",
    "q4": "does swirl change air jet mixing",
}
QRELS = [("q1", "D1", 2), ("q2", "D2", 1), ("q2", "D3", 0)]  # evaluation: q1, q2
TRAIN_QRELS = [("q3", "D4", 1), ("q4", "D5", 1)]  # training: q3, q4


def _write_collection(folder: Path, qrels: list[tuple[str, str, Any]] = QRELS) -> dict[str, Any]:
    """Write the four files; return the ``data.custom`` entry pointing at them."""
    pd.DataFrame({"pid": list(DOCS), "body": list(DOCS.values())}).to_csv(folder / "docs.csv", index=False)
    lines = [pd.Series({"qid": q, "question": t}).to_json() for q, t in QUERIES.items()]
    (folder / "queries.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = ["qid\tpid\tgrade", *(f"{q}\t{d}\t{r}" for q, d, r in qrels)]
    (folder / "qrels.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    train = pd.DataFrame(TRAIN_QRELS, columns=["qid", "pid", "grade"])
    train.to_parquet(folder / "train_qrels.parquet")
    return {
        "kind": "ir",
        "name": "aero",
        "corpus": str(folder / "docs.csv"),
        "queries": str(folder / "queries.jsonl"),
        "qrels": str(folder / "qrels.tsv"),
        "train_qrels": str(folder / "train_qrels.parquet"),
        "columns": {
            "doc_id": "pid",
            "doc_text": "body",
            "query_id": "qid",
            "query_text": "question",
            "qrels_doc_id": "pid",
            "relevance": "grade",
        },
    }


def _params(entry: dict[str, Any], **sections: Any) -> Params:
    return params_from_dict({"data": {"sources": [], "custom": [entry]}, **sections})


def test_custom_ir_collection_is_prepared_validated_evaluated_and_mined(tmp_path: Path) -> None:
    from d2llm.data.validation import validate_prepared
    from d2llm.evaluation.evaluate import Bm25System, evaluate_ir_dataset
    from d2llm.mining import mine_negatives

    params = _params(
        _write_collection(tmp_path),
        labelling={"datasets": ["aero_train"]},
        mining={"method": "bm25", "num_negatives": 2, "depth_min": 0, "depth_max": 3},
    )
    out = tmp_path / "prepared"
    manifest = prepare_data(params, tmp_path / "no-raw", out)

    ir = load_ir(out, "aero")
    assert ir.corpus.to_dict("list") == {"doc_id": list(DOCS), "text": list(DOCS.values())}
    assert ir.queries["query_id"].tolist() == list(QUERIES)
    assert ir.qrels.values.tolist() == [list(r) for r in QRELS]
    assert ir.relevant() == {"q1": {"D1": 2}, "q2": {"D2": 1}}
    assert manifest["counts"]["ir/aero/qrels"] == {"total": 3, "relevant": 2}
    assert {"custom/aero/docs.csv", "custom/aero/train_qrels.parquet"} <= set(manifest["raw_inputs"])

    # Training pairs: only the training qrels, never the evaluation queries.
    train = load_pairs(out, "aero_train")
    assert train[["text_a", "text_b"]].values.tolist() == [
        [QUERIES["q3"], DOCS["D4"]],
        [QUERIES["q4"], DOCS["D5"]],
    ]
    assert train["task"].eq("asym").all() and train["split"].eq("train").all()

    # Great Expectations runs the IR suites on it like on the built-ins.
    summary = validate_prepared(params, out, tmp_path / "reports")
    tables = {t.table for t in summary.tables}
    assert {"ir/aero/corpus", "ir/aero/queries", "ir/aero/qrels", "pairs/aero_train"} <= tables
    assert summary.success

    # Evaluation reads it by name (evaluation.ir_datasets), with the judged queries only.
    entry = evaluate_ir_dataset("aero", ir.corpus, ir.queries, ir.qrels, {"bm25": Bm25System()})
    assert entry["n_queries"] == 2 and entry["n_docs"] == len(DOCS)
    assert 0 < entry["metrics"]["bm25"]["ndcg@10"] <= 100

    # Mining draws the negatives of aero_train from the collection's whole corpus.
    mined = mine_negatives(params, out, tmp_path / "negatives.parquet")
    assert len(mined) == 2
    for positive, negatives in mined[["positive", "negatives"]].itertuples(index=False):
        assert positive not in negatives and set(negatives) <= set(DOCS.values())
    assert any(set(n) & {DOCS["D1"], DOCS["D2"], DOCS["D3"]} for n in mined["negatives"])


def _prepare_fails(tmp_path: Path, params: Params, match: str) -> None:
    """The bad input raises DataError matching ``match``; the previous output stays as it was."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "previous.txt").write_text("good output", encoding="utf-8")
    before = tree_snapshot(out)
    with pytest.raises(DataError, match=match):
        prepare_data(params, tmp_path / "no-raw", out)
    assert tree_snapshot(out) == before


def test_unknown_doc_id_in_qrels_names_file_and_row(tmp_path: Path) -> None:
    entry = _write_collection(tmp_path, [*QRELS, ("q1", "D9", 1)])
    _prepare_fails(tmp_path, _params(entry), r"qrels\.tsv: data row 4: doc id 'D9' is not in .*docs\.csv")


def test_unknown_query_id_in_qrels(tmp_path: Path) -> None:
    entry = _write_collection(tmp_path, [("q7", "D1", 1)])
    _prepare_fails(
        tmp_path, _params(entry), r"qrels\.tsv: data row 1: query id 'q7' is not in .*queries\.jsonl"
    )


def test_non_integer_relevance(tmp_path: Path) -> None:
    entry = _write_collection(tmp_path, [("q1", "D1", "high")])
    _prepare_fails(tmp_path, _params(entry), r"qrels\.tsv: data row 1: relevance 'high' in column 'grade'")


def test_missing_column_names_the_mapping(tmp_path: Path) -> None:
    entry = _write_collection(tmp_path)
    entry["columns"]["doc_text"] = "content"
    _prepare_fails(tmp_path, _params(entry), r"docs\.csv: IR dataset 'aero': missing column\(s\) 'content'")


def test_duplicate_doc_id(tmp_path: Path) -> None:
    entry = _write_collection(tmp_path)
    with (tmp_path / "docs.csv").open("a", encoding="utf-8") as fh:
        fh.write("D2,again\n")
    _prepare_fails(tmp_path, _params(entry), r"docs\.csv: data row 6: doc_id 'D2' repeats an earlier row")


def test_query_judged_for_training_and_evaluation(tmp_path: Path) -> None:
    entry = _write_collection(tmp_path, [*QRELS, ("q3", "D1", 0)])
    _prepare_fails(
        tmp_path,
        _params(entry),
        r"train_qrels\.parquet: data row 1: query 'q3' is also judged in .*qrels\.tsv",
    )


def test_train_pairs_name_may_not_clash() -> None:
    pairs = {"name": "aero_train", "task": "asym", "label_kind": "score", "label_range": [0, 1]}
    ir = {"kind": "ir", "name": "aero", "corpus": "c", "queries": "q", "qrels": "r", "train_qrels": "t"}
    with pytest.raises(ConfigError, match="'aero_train' is used twice"):
        params_from_dict({"data": {"custom": [pairs | {"files": {"train": "x.csv"}}, ir]}})
