"""Any input, a readable answer: property-based tests (hypothesis) over parsers, custom data and config.

For every generated input the code under test either returns valid tables (the canonical
columns and dtypes) or raises a D2LLMError whose message names the file (and the line or row
when there is one) and quotes values capped in length, never another exception and never a
half-written output folder. Example counts are small so that the module runs in seconds.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from d2llm_data_helpers import custom_params, tree_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2llm.config import Params, load_params, params_from_dict
from d2llm.data.prepare import prepare_data
from d2llm.data.schema import PAIR_COLUMNS, PAIR_DTYPES
from d2llm.data.sources import SICK_FILES, parse_sick, parse_snli, read_jsonl, read_smart, read_text, read_tsv
from d2llm.errors import QUOTE_LIMIT, ConfigError, DataError

FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A message line may hold a path, a key and two capped quotes; a whole value is far longer.
MAX_LINE = 3 * QUOTE_LIMIT + 300

# Text that looks like the files' own content: field separators, quotes, line breaks, non-ASCII.
pieces = st.sampled_from([*'ab é漢\t\n\r",.:-{}[]15', "entailment", "NEUTRAL", "\ufeff", "\x00"])
texty = st.lists(pieces, max_size=12).map("".join)


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per hypothesis example (pytest's tmp_path is one per test)."""
    folder = Path(tempfile.mkdtemp(prefix="d2llm-hyp-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def assert_readable(err: Exception, *must_name: str) -> None:
    message = str(err)
    for name in must_name:
        assert name in message, f"{name!r} not in {message[:300]!r}"
    longest = max(len(line) for line in message.splitlines())
    assert longest <= MAX_LINE, f"a {longest}-char line in {message[:300]!r}"


def assert_pair_table(df: pd.DataFrame) -> None:
    assert tuple(df.columns) == PAIR_COLUMNS
    for col, dtype in PAIR_DTYPES.items():
        if dtype == "str":
            assert all(isinstance(v, str) for v in df[col]), col
        else:
            assert str(df[col].dtype) == dtype, col


# --------------------------------------------------------------------------- low-level readers


@FEW
@given(data=st.binary(max_size=60), bom=st.booleans(), gz=st.booleans())
def test_read_text_decodes_or_names_the_first_bad_byte_and_its_offset(
    data: bytes, bom: bool, gz: bool
) -> None:
    raw = (b"\xef\xbb\xbf" if bom else b"") + data
    with scratch() as folder:
        path = folder / ("x.txt.gz" if gz else "x.txt")
        path.write_bytes(gzip.compress(raw) if gz else raw)
        try:
            text = read_text(path)
        except DataError as err:
            assert_readable(err, str(path), "not valid UTF-8")
            found = re.search(r"line (\d+): not valid UTF-8: byte 0x([0-9a-f]{2}) at offset (\d+)", str(err))
            assert found, str(err)
            line, byte, offset = int(found[1]), int(found[2], 16), int(found[3])
            assert raw[offset] == byte  # the byte named is the one at that offset of the file
            start = 3 if bom else 0
            raw[start:offset].decode("utf-8")  # everything before it decodes: it is the first bad byte
            assert line == raw[:offset].count(b"\n") + 1
            return
    assert "\r" not in text
    assert text == raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")


@FEW
@given(content=texty)
def test_read_tsv_gives_rows_of_the_right_width_or_names_the_line(content: str) -> None:
    with scratch() as folder:
        path = folder / "x.tsv"
        path.write_text(content, encoding="utf-8", newline="")
        try:
            rows = read_tsv(path, 3, header=("a", "b", "c"))
        except DataError as err:
            assert_readable(err, str(path))
            assert re.search(r"line \d+|file is empty", str(err)), str(err)
            return
    assert all(len(fields) == 3 for _, fields in rows)


@FEW
@given(
    records=st.lists(
        st.one_of(
            st.dictionaries(st.sampled_from(["a", "b"]), st.one_of(st.none(), st.integers(), texty)),
            st.lists(st.integers(), max_size=2),
            texty,
        ),
        max_size=5,
    )
)
def test_read_jsonl_gives_objects_with_the_required_keys_or_names_the_line(records: list[Any]) -> None:
    content = "\n".join(json.dumps(r) if not isinstance(r, str) else r for r in records)
    with scratch() as folder:
        path = folder / "x.jsonl"
        path.write_text(content, encoding="utf-8", newline="")
        try:
            objects = read_jsonl(path, ("a",))
        except DataError as err:
            assert_readable(err, str(path), "line ")
            return
    assert all(isinstance(obj, dict) and "a" in obj for _, obj in objects)


@FEW
@given(lines=st.lists(st.one_of(st.sampled_from([".I 1", ".I", ".T", ".W title", ".X"]), texty), max_size=8))
def test_read_smart_gives_records_with_ids_or_names_the_line(lines: list[str]) -> None:
    with scratch() as folder:
        path = folder / "x.all"
        path.write_text("\n".join(lines), encoding="utf-8", newline="")
        try:
            records = read_smart(path)
        except DataError as err:
            assert_readable(err, str(path), "line ")
            return
    assert all(record["I"] for record in records)


# --------------------------------------------------------------------------- source parsers

sick_cell = st.one_of(st.sampled_from(["1", "4.5", "x", "", "ENTAILMENT", "neutral", "-"]), texty)


@FEW
@given(rows=st.lists(st.lists(sick_cell, min_size=4, max_size=6), max_size=4))
def test_sick_parser_gives_canonical_tables_or_names_file_and_line(rows: list[list[str]]) -> None:
    header = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"
    with scratch() as folder:
        for name in SICK_FILES.values():
            (folder / name).write_text(header + "\n", encoding="utf-8")
        bad = folder / SICK_FILES["train"]
        bad.write_text("\n".join([header, *("\t".join(r) for r in rows)]), encoding="utf-8", newline="")
        try:
            data = parse_sick(folder, Params().data)
        except DataError as err:
            assert_readable(err, str(bad), "line ")
            return
    for _spec, df in data.pairs.values():
        assert_pair_table(df)


@FEW
@given(
    records=st.lists(
        st.fixed_dictionaries(
            {
                "gold_label": st.one_of(
                    st.sampled_from(["entailment", "-", "contradiction"]), st.none(), texty
                ),
                "sentence1": st.one_of(texty, st.integers(), st.none()),
                "sentence2": texty,
                "pairID": st.one_of(texty, st.integers()),
            }
        ),
        max_size=4,
    )
)
def test_snli_parser_gives_canonical_tables_or_names_file_and_line(records: list[dict[str, Any]]) -> None:
    with scratch() as folder:
        path = folder / "snli_1.0_dev.jsonl.gz"
        path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in records).encode("utf-8")))
        try:
            data = parse_snli(folder, Params().data)
        except DataError as err:
            assert_readable(err, str(path), "line ")
            return
    for _spec, df in data.pairs.values():
        assert_pair_table(df)


# --------------------------------------------------------------------------- custom datasets

label_cell = st.one_of(
    st.sampled_from(["0", "0.5", "1", "nan", "inf", "", "yes", "no", " yes "]),
    st.floats(allow_nan=True),
    texty,
)
CUSTOM = [
    {"name": "mine", "task": "sym", "label_kind": "score", "label_range": [0, 1]},
    {
        "name": "mine",
        "task": "asym",
        "label_kind": "class",
        "label_set": ["yes", "no"],
        "positive_labels": ["yes"],
    },
]


def _write_custom(path: Path, rows: list[tuple[Any, Any, Any]], header: list[str]) -> None:
    if path.suffix == ".jsonl":
        lines = [json.dumps(dict(zip(header, row, strict=False))) for row in rows]
        path.write_text("\n".join(lines), encoding="utf-8")
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t" if path.suffix == ".tsv" else ",")
    writer.writerows([header, *rows])
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")


@FEW
@given(
    spec=st.sampled_from(CUSTOM),
    suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]),
    header=st.sampled_from(
        [["text_a", "text_b", "label"], ["text_a", "label"], ["label", "text_b", "text_a", "x"]]
    ),
    rows=st.lists(st.tuples(texty, texty, label_cell), max_size=5),
)
def test_custom_dataset_gives_valid_tables_or_names_the_file_and_leaves_no_output(
    spec: dict[str, Any], suffix: str, header: list[str], rows: list[tuple[Any, Any, Any]]
) -> None:
    with scratch() as folder:
        path = folder / f"train{suffix}"
        _write_custom(path, rows, header)
        params = custom_params(folder, [spec | {"files": {"train": path.name}}])
        out = folder / "out"
        out.mkdir()
        (out / "previous.txt").write_text("good output", encoding="utf-8")
        before = tree_snapshot(out)
        try:
            prepare_data(params, folder / "no-raw", out)
        except DataError as err:
            assert_readable(err, str(path))
            assert tree_snapshot(out) == before  # the previous output is untouched
            assert not [p for p in folder.iterdir() if p.name.startswith(".out")]  # no half-written temp
            return
        df = pd.read_parquet(out / "pairs" / "mine.parquet")
    assert_pair_table(df)
    assert len(df) == len(rows)


@FEW
@given(content=texty, suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_custom_dataset_from_arbitrary_text_never_raises_anything_else(content: str, suffix: str) -> None:
    with scratch() as folder:
        path = folder / f"train{suffix}"
        path.write_text(content, encoding="utf-8", newline="")
        params = custom_params(folder, [CUSTOM[0] | {"files": {"train": path.name}}])
        try:
            prepare_data(params, folder / "no-raw", folder / "out")
        except DataError as err:
            assert_readable(err, str(path))
            assert not (folder / "out").exists()
            return
        assert_pair_table(pd.read_parquet(folder / "out" / "pairs" / "mine.parquet"))


# --------------------------------------------------------------------------- config

KNOWN_KEYS = ["seed", "device", "training", "training.lr", "training.dev_datasets", "mining.num_negatives",
              "mining.depth_max", "student.lora.r", "data.custom", "data.sources", "teacher.prompts.sym",
              "evaluation.pair_datasets", "nonsense", "training.nonsense"]  # fmt: skip
values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), texty, st.text(min_size=300, max_size=600)
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texty, inner, max_size=3)),
    max_leaves=6,
)


def _tree(assignments: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in assignments.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = value
    return tree


@FEW
@given(assignments=st.dictionaries(st.sampled_from(KNOWN_KEYS), values, max_size=4))
def test_any_config_is_valid_params_or_a_config_error_naming_each_bad_key(
    assignments: dict[str, Any],
) -> None:
    try:
        params = params_from_dict(_tree(assignments), "generated.yaml")
    except ConfigError as err:
        assert_readable(err, "invalid config generated.yaml")
        problems = str(err).splitlines()[1:]
        assert problems and all(line.startswith("  - ") for line in problems), str(err)
        return
    assert isinstance(params, Params)


@FEW
@given(
    text=st.one_of(texty, st.builds(yaml.safe_dump, st.dictionaries(st.one_of(texty, st.integers()), values)))
)
def test_any_params_file_loads_or_gives_a_config_error(text: str) -> None:
    with scratch() as folder:
        path = folder / "params.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_params(path)
        except ConfigError as err:
            assert_readable(err, str(path))


def test_the_utf8_error_names_the_bad_byte_and_its_offset_after_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_bytes(b"\xef\xbb\xbfok\tfine\n" + "ab café\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_text(path)
    # offset 3 (BOM) + 8 ("ok\tfine\n") + 6 ("ab caf"): the é, not the line's first byte.
    assert f"{path}: line 2: not valid UTF-8: byte 0xe9 at offset 17 in the file (byte 7 of the line" in str(
        err.value
    )


# --------------------------------------------------------------------------- huge values


def test_a_huge_config_value_is_quoted_capped_with_its_length() -> None:
    with pytest.raises(ConfigError) as err:
        params_from_dict({"teacher": {"batch_size": "x" * 200_000}})
    assert "teacher.batch_size" in str(err.value)
    assert "… (200002 chars)" in str(err.value)  # repr adds the two quotes
    assert len(str(err.value)) < 1000


def test_a_huge_bad_label_is_quoted_capped_with_its_length(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    _write_custom(path, [("a", "b", "y" * 200_000)], ["text_a", "text_b", "label"])
    params = custom_params(tmp_path, [CUSTOM[0] | {"files": {"train": path.name}}])
    with pytest.raises(DataError) as err:
        prepare_data(params, tmp_path / "no-raw", tmp_path / "out")
    assert f"{path}: data row 1: label 'yyy" in str(err.value)
    assert "… (200002 chars)" in str(err.value)
    assert len(str(err.value)) < 1000


def test_early_stopping_without_a_dev_dataset_is_rejected_by_the_config() -> None:
    # Each dev dataset's metric follows from its kind (d2llm.evaluation.dev), so no metric name
    # can be asked for that the loop cannot compute; an empty list is the one impossible value.
    with pytest.raises(ConfigError, match=r"training\.dev_datasets: List should have at least 1 item"):
        params_from_dict({"training": {"dev_datasets": []}})
    with pytest.raises(ConfigError, match=r"unknown key 'training\.dev_metric'"):
        params_from_dict({"training": {"dev_metric": "ndcg@10"}})


def test_a_huge_text_failing_validation_is_quoted_capped(tmp_path: Path) -> None:
    from d2llm.data.validation import validate_prepared
    from d2llm.errors import DataValidationError

    path = tmp_path / "train.csv"
    rows = [("a dog runs", "a dog is running", "1"), ("z" * 200_000, "a cat", "0")]
    _write_custom(path, rows, ["text_a", "text_b", "label"])
    params = custom_params(tmp_path, [CUSTOM[0] | {"files": {"train": path.name}}])
    prepare_data(params, tmp_path / "no-raw", tmp_path / "prepared")
    with pytest.raises(DataValidationError) as err:
        validate_prepared(params, tmp_path / "prepared", tmp_path / "report")
    assert "'zzzz" in str(err.value) and "… (200002 chars)" in str(err.value)
    assert len(str(err.value)) < 2000
