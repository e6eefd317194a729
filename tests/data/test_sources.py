"""Parsers on the real shipped files (counts from each SOURCE.md) and on malformed inputs."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from d2llm.config import DataConfig
from d2llm.data.sources import (
    BUILTIN_DATASETS,
    SOURCES,
    hash_fraction,
    parse_source,
    read_jsonl,
    read_smart,
    read_text,
    read_tsv,
)
from d2llm.errors import DataError

CFG = DataConfig()


def split_counts(df) -> dict[str, int]:
    return df["split"].value_counts().to_dict()


def test_stsb_en_counts_and_positives(raw_dir: Path) -> None:
    spec, df = parse_source("stsb_en", raw_dir, CFG).pairs["stsb_en"]
    assert split_counts(df) == {"train": 5749, "dev": 1500, "test": 1379}
    assert spec.label_range == (0, 5) and df["label"].between(0, 5).all()
    assert (df["is_positive"] == (df["label"] >= 4)).all()
    first = df.iloc[0]
    assert (first.text_a, first.text_b, first.label) == (
        "A plane is taking off.",
        "An air plane is taking off.",
        5.0,
    )


def test_sick_gives_nli_and_relatedness(raw_dir: Path) -> None:
    pairs = parse_source("sick", raw_dir, CFG).pairs
    _, nli = pairs["sick"]
    _, rel = pairs["sick_r"]
    assert split_counts(nli) == {"train": 4500, "dev": 500, "test": 4927}
    by_split = nli.groupby("split")["label_name"].value_counts().to_dict()
    assert by_split[("train", "entailment")] == 1299 and by_split[("test", "contradiction")] == 720
    # class id = index in (entailment, neutral, contradiction); positive = entailment
    assert nli.loc[nli.label_name == "neutral", "label"].eq(1.0).all()
    assert (nli["is_positive"] == (nli["label_name"] == "entailment")).all()
    assert rel["label"].min() == 1.0 and rel["label"].max() == 5.0
    # The CRLF test file leaves no carriage return in the texts.
    assert not rel["text_b"].str.contains("\r").any()
    first = rel.iloc[0]
    assert first.label == 4.5 and first.is_positive  # 4.5 >= 4


def test_snli_drops_no_consensus_and_splits_stably(raw_dir: Path) -> None:
    _, df = parse_source("snli", raw_dir, CFG).pairs["snli"]
    assert len(df) == 9842  # 10000 - 158 rows with gold_label "-"
    assert df["label_name"].value_counts().to_dict() == {
        "entailment": 3329,
        "contradiction": 3278,
        "neutral": 3235,
    }
    dev_share = (df["split"] == "dev").mean()
    assert 0.08 < dev_share < 0.12
    again = parse_source("snli", raw_dir, CFG).pairs["snli"][1]
    assert again["split"].tolist() == df["split"].tolist()
    more_dev = parse_source("snli", raw_dir, DataConfig(snli_dev_fraction=0.3)).pairs["snli"][1]
    # a larger fraction only moves train rows into dev (thresholding one fixed hash per pair)
    assert set(df.index[df.split == "dev"]) <= set(more_dev.index[more_dev.split == "dev"])


def test_trecqa_counts_and_split_by_question(raw_dir: Path) -> None:
    spec, df = parse_source("trecqa", raw_dir, CFG).pairs["trecqa"]
    assert (spec.task, spec.label_set) == ("asym", ("no", "yes"))
    # SOURCE.md: train 4718 pairs / 93 questions / 348 positives; dev (our test) 1148 / 81 / 222.
    train_file = df[df["split"] != "test"]
    test = df[df["split"] == "test"]
    assert (len(train_file), train_file["text_a"].nunique(), int(train_file["is_positive"].sum())) == (
        4718,
        93,
        348,
    )
    assert (len(test), test["text_a"].nunique(), int(test["is_positive"].sum())) == (1148, 81, 222)
    # The selection split is carved from train by question: no question is on both sides.
    by_split = df.groupby("text_a")["split"].nunique()
    assert (by_split == 1).all()
    dev_questions = df.loc[df["split"] == "dev", "text_a"].unique()
    assert len(dev_questions) == 18 and all(hash_fraction(q) < CFG.trecqa_dev_fraction for q in dev_questions)
    assert (df["label_name"] == df["is_positive"].map({True: "yes", False: "no"})).all()
    # PTB bracket and quote tokens become characters; the texts keep their words.
    assert not df["text_b"].str.contains("-LRB-|-RRB-|``", regex=True).any()
    first = df.iloc[0]
    assert (
        first.text_a
        == 'Who is the author of the book , " The Iron Lady : A Biography of Margaret Thatcher " ?'
    )
    assert first.text_b.endswith("by Hugo Young ( Farrar , Straus & Giroux )")


def test_trecqa_bad_label_names_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "trecqa"
    folder.mkdir()
    (folder / "train.csv").write_text("qtext,label,atext\nwho ?,1,him .\nwho ?,2,her .\n", encoding="utf-8")
    (folder / "dev.csv").write_text("qtext,label,atext\nwhat ?,0,it .\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.csv: line 3: label 2; expected 0 or 1"):
        parse_source("trecqa", tmp_path, CFG)
    (folder / "train.csv").write_text("question,label,answer\nwho ?,1,him .\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.csv: line 1: header"):
        parse_source("trecqa", tmp_path, CFG)


def test_hash_fraction_is_a_fixed_function() -> None:
    assert hash_fraction("abc") == hash_fraction("abc")
    assert 0 <= hash_fraction("x") < 1
    # sha256("abc") starts with ba7816bf8f01cfea
    assert hash_fraction("abc") == 0xBA7816BF8F01CFEA / 2**64


def test_cranfield_collection(raw_dir: Path) -> None:
    c = parse_source("cranfield", raw_dir, CFG).ir["cranfield"]
    assert len(c.corpus) == 1400 and len(c.queries) == 225 and len(c.qrels) == 1837
    # query ids are positions in cran.qry: the third query (.I 004) is "3"
    assert c.queries.query_id.tolist()[:3] == ["1", "2", "3"]
    assert c.queries.text.iloc[2].startswith("what problems of heat conduction in composite slabs")
    # codes 1..4 -> relevance 4..1, code -1 -> 0
    assert c.qrels.relevance.value_counts().to_dict() == {4: 128, 3: 387, 2: 734, 1: 363, 0: 225}
    first = c.qrels.iloc[0]
    assert (first.query_id, first.doc_id, first.relevance) == ("1", "184", 3)  # "1 184 2"
    assert set(c.qrels.doc_id) <= set(c.corpus.doc_id)
    # the body repeats the title in the file; titles/bodies for training pairs do not
    t = c.titles.iloc[0]
    assert t.title == "experimental investigation of the aerodynamics of a wing in a slipstream ."
    assert t.body.startswith("an experimental study of a wing")
    assert (c.corpus.text == "").sum() == 2  # documents 471 and 995 are empty in the file


def test_cisi_collection(raw_dir: Path) -> None:
    c = parse_source("cisi", raw_dir, CFG).ir["cisi"]
    assert len(c.corpus) == 1460 and len(c.queries) == 111 and len(c.qrels) == 3114
    assert c.qrels.query_id.nunique() == 76
    assert set(c.qrels.relevance) == {1}
    assert set(c.qrels.query_id) <= set(c.queries.query_id) and set(c.qrels.doc_id) <= set(c.corpus.doc_id)
    assert c.corpus.text.iloc[0].startswith(
        "18 Editions of the Dewey Decimal Classifications. The present study"
    )


def test_chinese_sources(raw_dir: Path) -> None:
    _, zh = parse_source("stsb_zh", raw_dir, CFG).pairs["stsb_zh"]
    assert split_counts(zh) == {"train": 5231, "dev": 1458, "test": 1361}
    _, oc = parse_source("ocnli", raw_dir, CFG).pairs["ocnli"]
    assert split_counts(oc) == {"train": 10000 - 15, "dev": 3000 - 50}
    _, atec = parse_source("atec", raw_dir, CFG).pairs["atec"]
    assert split_counts(atec) == {"dev": 20000, "test": 20000}
    assert int(atec.loc[atec.split == "dev", "is_positive"].sum()) == 3688


def test_registry_matches_config_names() -> None:
    from typing import get_args

    from d2llm.config import DataConfig as DC

    literal = DC.model_fields["sources"].annotation
    assert set(get_args(get_args(literal)[0])) == set(SOURCES)
    assert set(SOURCES) <= BUILTIN_DATASETS


# --------------------------------------------------------------------------- malformed files


def test_bom_and_crlf_are_normalised(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_bytes(b"\xef\xbb\xbfa\tb\r\nc\td\r\n")
    assert read_text(path) == "a\tb\nc\td\n"
    assert [f for _, f in read_tsv(path, 2)] == [["a", "b"], ["c", "d"]]


def test_latin1_bytes_in_utf8_file_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_bytes(b"ok\tfine\n" + "café\tcrème\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"x\.tsv: line 2: not valid UTF-8.*expected a UTF-8"):
        read_text(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n' * 200)[:-20])
    with pytest.raises(DataError, match=r"x\.jsonl\.gz: not a complete gzip file"):
        read_text(path)


def test_bad_json_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl: line 2: not valid JSON"):
        read_jsonl(path, ("a",))
    path.write_text('{"a": 1}\n{"b": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: missing key\(s\) \['a'\]"):
        read_jsonl(path, ("a",))


def test_wrong_field_count_and_header(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_text("h1\th2\na\tb\nonly-one\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: 1 tab-separated fields; expected 2"):
        read_tsv(path, 2, ("h1", "h2"))
    with pytest.raises(DataError, match=r"line 1: header is \['h1', 'h2'\]; expected \['x', 'y'\]"):
        read_tsv(path, 2, ("x", "y"))


def test_smart_records_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "docs"
    path.write_text(".I 7\n.T\nA title\n.W\nline one\nline two\n.W\nmore\n.I 8\n.W\nx\n", encoding="utf-8")
    assert read_smart(path) == [
        {"I": "7", "T": "A title", "W": "line one line two more"},
        {"I": "8", "W": "x"},
    ]
    path.write_text("stray text\n.I 1\n.W\nx\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"docs: line 1: text before the first '.I <id>' record"):
        read_smart(path)


def test_missing_source_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"source 'cisi': folder .*cisi not found"):
        parse_source("cisi", tmp_path, CFG)
