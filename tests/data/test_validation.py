"""Great Expectations validation: the shipped data passes; each kind of bad data fails clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from d2llm_data_helpers import CATALOG, catalog_for, custom_params, tree_snapshot

from d2llm.config import Params, params_from_dict
from d2llm.data.prepare import prepare_data
from d2llm.data.validation import LEAK_COLUMN, add_leak_column, validate_prepared
from d2llm.errors import DataValidationError

DOCS = Path("gx") / "uncommitted" / "data_docs" / "local_site" / "index.html"


def test_shipped_data_passes_and_reports(prepared, tmp_path: Path) -> None:
    folder, _ = prepared
    before = tree_snapshot(folder)
    report = tmp_path / "report"
    summary = validate_prepared(Params(), folder, report)
    assert summary.success and not summary.failures
    assert {t.table for t in summary.tables} >= {
        "pairs/sick",
        "pairs/stsb_en",
        "ir/cranfield/qrels",
        "ir/cisi/corpus",
    }
    assert all(t.evaluated >= 7 for t in summary.tables)
    text = summary.describe()
    assert "validation: all expectations met" in text and "pairs/snli" in text
    verdict = (report / "validation_results.json").read_text()
    assert json.loads(verdict)["success"] is True
    assert "pairs/sick" in json.loads((report / "gx_results.json").read_text())
    assert (report / DOCS).exists()
    # a second run over the same report folder works (add_or_update of every GX object), and
    # writes the same verdict byte for byte: DVC's mine and teacher stages depend on that file,
    # so validating the same data again must not rerun them (GX's run times stay in gx_results)
    assert validate_prepared(Params(), folder, report).success
    assert (report / "validation_results.json").read_text() == verdict
    assert tree_snapshot(folder) == before  # validation never touches the data


def test_leak_helper_column_hand_worked() -> None:
    df = pd.DataFrame(
        {
            "text_a": ["A cat", "b", "x", "dog", "b"],
            "text_b": ["a dog", "c", "y", "a  CAT", "c"],
            "split": ["train", "train", "train", "test", "dev"],
        }
    )
    sym = add_leak_column(df, "sym")
    assert sym[LEAK_COLUMN].tolist() == [None, None, None, None, None]
    df.loc[3, "text_a"] = "a DOG"  # now the reverse of train row 0 (sym: order does not matter)
    assert add_leak_column(df, "sym")[LEAK_COLUMN].tolist()[3] == "a cat ||| a dog"
    assert add_leak_column(df, "asym")[LEAK_COLUMN].tolist()[3] is None


def _validation_fails(
    tmp_path: Path, params: Params, raw_dir: Path | None = None, catalog: Path = CATALOG
) -> str:
    """Prepare, then validate: must raise; the report is written and the prepared data is unchanged."""
    out, report = tmp_path / "prepared", tmp_path / "report"
    prepare_data(params, raw_dir or tmp_path, out, catalog=catalog)
    before = tree_snapshot(out)
    with pytest.raises(DataValidationError) as err:
        validate_prepared(params, out, report)
    results = json.loads((report / "validation_results.json").read_text())
    assert results["success"] is False
    assert (report / DOCS).exists()
    assert tree_snapshot(out) == before
    return str(err.value)


def _score_dataset(tmp_path: Path, rows: dict[str, list[tuple[str, str, float]]]) -> Params:
    files = {}
    for split, triples in rows.items():
        pd.DataFrame(triples, columns=["text_a", "text_b", "label"]).to_csv(
            tmp_path / f"{split}.csv", index=False
        )
        files[split] = f"{split}.csv"
    ds = {"name": "mine", "task": "sym", "label_kind": "score", "label_range": [0, 5], "files": files}
    return custom_params(tmp_path, [ds])


def test_empty_text(tmp_path: Path) -> None:
    params = _score_dataset(
        tmp_path, {"train": [("a cat", "a dog", 3.0), ("a bird", "", 1.0), ("x", "y", 2.0)]}
    )
    msg = _validation_fails(tmp_path, params)
    assert (
        "pairs/mine: expect_column_value_lengths_to_be_between column 'text_b': 1 unexpected value(s)" in msg
    )


def test_label_out_of_range(tmp_path: Path) -> None:
    params = _score_dataset(tmp_path, {"train": [("a", "b", 3.0), ("c", "d", 7.5), ("e", "f", -1.0)]})
    msg = _validation_fails(tmp_path, params)
    assert "pairs/mine: expect_column_values_to_be_between column 'label': 2 unexpected value(s)" in msg
    assert "7.5" in msg and "-1.0" in msg


def test_train_test_leakage(tmp_path: Path) -> None:
    params = _score_dataset(
        tmp_path,
        {
            "train": [("A man runs.", "A person jogs.", 4.0), ("x", "y", 1.0)],
            "test": [("a person jogs.", "A man runs.", 4.0)],
        },
    )
    msg = _validation_fails(tmp_path, params)
    assert (
        "pairs/mine: expect_column_values_to_be_null column 'leaked_from_train': 1 unexpected value(s)" in msg
    )
    assert "a man runs. ||| a person jogs." in msg
    # switching the check off in params.validation lets the same data pass
    relaxed = params_from_dict(params.model_dump(mode="json") | {"validation": {"check_leakage": False}})
    assert validate_prepared(relaxed, tmp_path / "prepared", tmp_path / "report2").success


def _tiny_cisi(tmp_path: Path, docs: list[str], rels: list[str]) -> tuple[Path, Path]:
    """A tiny CISI-format collection and a catalogue that vouches for its files: (raw, catalogue)."""
    raw = tmp_path / "raw"
    (raw / "cisi").mkdir(parents=True)
    body = "".join(f".I {i}\n.T\nTitle {n}\n.W\nBody text {n}.\n" for n, i in enumerate(docs))
    (raw / "cisi" / "CISI.ALL").write_text(body, encoding="utf-8")
    (raw / "cisi" / "CISI.QRY").write_text(".I 1\n.W\nwhat is it?\n.I 2\n.W\nwhy?\n", encoding="utf-8")
    (raw / "cisi" / "CISI.REL").write_text("".join(f"{r} 0 0.000000\n" for r in rels), encoding="utf-8")
    return raw, catalog_for(raw, "cisi", tmp_path / "catalog.yaml")


def test_unknown_qrels_ids(tmp_path: Path) -> None:
    raw, catalog = _tiny_cisi(tmp_path, ["1", "2", "3"], ["1 1", "1 9", "7 2"])
    params = params_from_dict({"data": {"sources": ["cisi"], "ir_train_pairs": "none"}})
    msg = _validation_fails(tmp_path, params, raw, catalog)
    assert (
        "ir/cisi/qrels: expect_column_values_to_be_in_set column 'doc_id': 1 unexpected value(s), e.g. ['9']"
        in msg
    )
    assert "expect_column_values_to_be_in_set column 'query_id': 1 unexpected value(s), e.g. ['7']" in msg


def test_duplicate_ids(tmp_path: Path) -> None:
    raw, catalog = _tiny_cisi(tmp_path, ["1", "2", "2"], ["1 1", "1 1"])
    params = params_from_dict({"data": {"sources": ["cisi"], "ir_train_pairs": "none"}})
    msg = _validation_fails(tmp_path, params, raw, catalog)
    assert "ir/cisi/corpus: expect_column_values_to_be_unique column 'doc_id': 2 unexpected value(s)" in msg
    assert "ir/cisi/qrels: expect_compound_columns_to_be_unique column 'query_id,doc_id'" in msg


def test_cli_validate_failure_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from d2llm.cli import main

    params = _score_dataset(tmp_path, {"train": [("a", "b", 9.0)]})
    (tmp_path / "p.yaml").write_text(json.dumps(params.model_dump(mode="json")), encoding="utf-8")
    out, report = tmp_path / "prepared", tmp_path / "report"
    assert main(["--params", str(tmp_path / "p.yaml"), "prepare", "--out-dir", str(out)]) == 0
    args = [
        "--params",
        str(tmp_path / "p.yaml"),
        "validate",
        "--prepared-dir",
        str(out),
        "--report-dir",
        str(report),
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert (
        "error: 1 expectation(s) failed" in err and "column 'label': 1 unexpected value(s), e.g. [9.0]" in err
    )
    assert (report / "validation_results.json").exists()
