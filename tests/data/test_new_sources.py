"""The seven sources added together (TREC-QA TRAIN-ALL, WikiQA, SelQA, RTE, MSRP, Twitter URL, CACM).

Counts are those of each ../shared/data/<folder>/SOURCE.md, on the real files (each source is
parsed once per session). The derived overlap lists (not catalogued, so not in data/raw) are
read from the data mirror to check the copies embedded in d2llm.data.sources.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from d2llm_data_helpers import REPO, custom_params

from d2llm.config import DataConfig, params_from_dict
from d2llm.data.prepare import prepare_data
from d2llm.data.sources import (
    MSRP_STSB_TEST_OVERLAP,
    RTE_LABELS,
    TRECQA_TRAIN_ALL_HELD_OUT_OVERLAP,
    YES_NO,
    SourceData,
    hash_fraction,
    parse_source,
    read_json_array,
    sentence_digest,
    trecqa_split_key,
)
from d2llm.data.validation import (
    CROSS_LEAK_COLUMN,
    add_cross_leak_column,
    index_test_pairs,
    validate_prepared,
)
from d2llm.errors import DataError, DataValidationError

CFG = DataConfig()
NEW_SOURCES = ("trecqa_train_all", "wikiqa", "selqa", "rte", "msrp", "twitter_url", "cacm")


@pytest.fixture(scope="session")
def parsed(raw_dir: Path) -> Callable[[str], SourceData]:
    """``parsed(name)``: the source parsed from data/raw with the default config, once per session."""
    cache: dict[str, SourceData] = {}

    def get(name: str) -> SourceData:
        if name not in cache:
            cache[name] = parse_source(name, raw_dir, CFG)
        return cache[name]

    return get


def pairs_of(parsed: Callable[[str], SourceData], name: str) -> pd.DataFrame:
    return parsed(name).pairs[name][1]


def per_split(df: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """split -> (rows, positives)."""
    return {s: (len(g), int(g["is_positive"].sum())) for s, g in df.groupby("split")}


def shared_file(folder: str, name: str) -> Path:
    """A file of the data mirror: $D2LLM_DATA_MIRROR when set, else ../shared/data next to the repo."""
    places = [Path(os.environ["D2LLM_DATA_MIRROR"])] if os.environ.get("D2LLM_DATA_MIRROR") else []
    places.append(REPO.parent / "shared" / "data")
    for place in places:
        if (place / folder / name).is_file():
            return place / folder / name
    pytest.fail(
        f"{folder}/{name} not found in {[str(p) for p in places]}: this test checks a derived list "
        "that is not catalogued (so not in data/raw); point $D2LLM_DATA_MIRROR at the data mirror "
        "(laid out as <mirror>/<folder>/<file>) or provide ../shared/data next to the repository"
    )


def read_shared_tsv(folder: str, name: str) -> list[dict[str, str]]:
    with shared_file(folder, name).open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


# --------------------------------------------------------------------------- TREC-QA TRAIN-ALL


def test_trecqa_train_all_counts_and_held_out_drop(parsed) -> None:
    spec, df = parsed("trecqa_train_all").pairs["trecqa_train_all"]
    assert (spec.task, spec.label_kind, spec.label_set, spec.splits) == (
        "asym",
        "class",
        YES_NO,
        ("train", "dev"),
    )
    # SOURCE.md: 53 428 pairs (6 421 positive), 1 229 questions; the 14 dropped are negatives
    assert (len(df), int(df["is_positive"].sum())) == (53428 - 14, 6421)
    assert parsed("trecqa_train_all").notes == {
        "pairs/trecqa_train_all": "14 candidate pairs whose sentence is in the held-out TREC-QA test dropped"
    }
    assert df["text_a"].nunique() == 1229 - 2  # two questions are asked twice (ids 1400/2092, 1489/2294)
    assert (df["label_name"] == df["is_positive"].map({True: "yes", False: "no"})).all()
    assert df.loc[df["is_positive"], "label"].eq(1.0).all()
    # a question's candidates stay in one split, chosen by trecqa's rule
    assert (df.groupby("text_a")["split"].nunique() == 1).all()
    dev = df.loc[df["split"] == "dev", "text_a"].unique()
    assert all(hash_fraction(trecqa_split_key(q)) < CFG.trecqa_dev_fraction for q in dev)
    assert 0.25 < len(dev) / df["text_a"].nunique() < 0.35
    # PTB brackets and quotes undone as for trecqa
    assert not df["text_b"].str.contains("-LRB-|-RRB-|``", regex=True).any()
    first = df.iloc[0]
    assert (
        first.text_a
        == 'Who is the author of the book , " The Iron Lady : A Biography of Margaret Thatcher " ?'
    )
    assert (
        first.text_b
        == "the IRON LADY ; A Biography of Margaret Thatcher by Hugo Young ( Farrar , Straus & Giroux )"
    )


def test_trecqa_questions_in_both_sources_are_in_the_same_split(parsed) -> None:
    """No TREC-QA dev question is trained on through TRAIN-ALL, and trecqa's own split is unchanged."""
    trecqa = pairs_of(parsed, "trecqa")
    train_all = pairs_of(parsed, "trecqa_train_all")
    own = trecqa[trecqa["split"] != "test"].groupby("text_a")["split"].first()
    # the split key masks number tokens, which trecqa's texts have as "<num>" already: on trecqa
    # it is the plain normalised text, so every trecqa split is what it was before
    assert all(trecqa_split_key(q) == q for q in trecqa["text_a"].unique())
    assert all((hash_fraction(q) < CFG.trecqa_dev_fraction) == (s == "dev") for q, s in own.items())
    # 81 of the 93 train.csv questions are in TRAIN-ALL with identical text; the other 12 with
    # digits where train.csv has "<num>" ("... in 1989 ?" / "... in <num> ?"), matched by the key
    exact = set(own.index) & set(train_all["text_a"])
    assert len(own) == 93 and len(exact) == 81
    keyed = train_all.groupby(train_all["text_a"].map(trecqa_split_key))["split"].agg(set)
    assert set(own.index) <= set(keyed.index)
    assert {q for q in own.index if q not in exact} == {q for q in own.index if "<num>" in q}
    assert all(keyed[q] == {s} for q, s in own.items())  # same split in both sources
    assert (own == "dev").sum() == 18
    # and no question of trecqa's test split is in TRAIN-ALL, not even with its numbers masked
    test_questions = set(trecqa.loc[trecqa["split"] == "test", "text_a"])
    assert not test_questions & set(keyed.index)


def test_trecqa_train_all_held_out_list_matches_the_shared_file() -> None:
    rows = read_shared_tsv("trecqa-train-all", "OVERLAP_answer_sentences_in_wang_test.tsv")
    assert len(rows) == 14 and {r["label"] for r in rows} == {"neg"}
    from_file = {(r["question_id"], sentence_digest(r["sentence"])) for r in rows}
    assert from_file == TRECQA_TRAIN_ALL_HELD_OUT_OVERLAP


# --------------------------------------------------------------------------- WikiQA, SelQA


def test_wikiqa_counts(parsed) -> None:
    spec, df = parsed("wikiqa").pairs["wikiqa"]
    assert (spec.task, spec.label_set, spec.splits) == ("asym", YES_NO, ("train", "dev"))
    assert per_split(df) == {"train": (20360, 1040), "dev": (2733, 140)}
    answerable = df.groupby(["split", "text_a"])["is_positive"].any().groupby("split").agg(["size", "sum"])
    assert answerable.to_dict("index") == {
        "dev": {"size": 296, "sum": 126},
        "train": {"size": 2118, "sum": 873},
    }
    first = df.iloc[0]
    assert (first.text_a, first.text_b, first.label_name) == (
        "how are glacier caves formed?",
        "A partly submerged glacier cave on Perito Moreno Glacier .",
        "no",
    )


def test_selqa_counts_and_split_by_section(parsed) -> None:
    spec, df = parsed("selqa").pairs["selqa"]
    assert (spec.task, spec.label_set, spec.splits) == ("asym", YES_NO, ("train", "dev"))
    # SOURCE.md: 785 questions, 9 419 candidates, 893 positive; 42 candidates are empty strings
    assert (len(df) + 42, int(df["is_positive"].sum())) == (9419, 893)
    assert parsed("selqa").notes == {"pairs/selqa": "42 empty candidate sentences dropped"}
    assert df["text_a"].nunique() == 784  # one question text is asked twice
    assert per_split(df) == {"train": (6539, 616), "dev": (2838, 277)}
    # questions about one section share its candidates: none of them is on both sides
    assert not set(df.loc[df.split == "train", "text_a"]) & set(df.loc[df.split == "dev", "text_a"])
    assert (df["text_b"] != "").all()


# --------------------------------------------------------------------------- RTE, MSRP, Twitter URL


def test_rte_counts_and_labels(parsed) -> None:
    spec, df = parsed("rte").pairs["rte"]
    assert (spec.task, spec.label_set, spec.splits) == ("sym", RTE_LABELS, ("train", "dev"))
    assert per_split(df) == {"train": (2490, 1249), "dev": (277, 146)}
    assert (df["label"] == df["label_name"].map({"entailment": 0.0, "not_entailment": 1.0})).all()
    assert (df["is_positive"] == (df["label_name"] == "entailment")).all()
    assert df.iloc[0].text_b == "Weapons of Mass Destruction Found in Iraq."


def test_msrp_counts_after_the_stsb_test_drop(parsed) -> None:
    spec, df = parsed("msrp").pairs["msrp"]
    assert (spec.task, spec.label_set, spec.splits) == ("sym", YES_NO, ("train", "dev"))
    # SOURCE.md: train 3 576 (2 407 / 1 169), val 500 (346 / 154); after the drop
    # train 3 428 (2 341 / 1 087), val = our dev 476 (334 / 142)
    assert per_split(df) == {"train": (3428, 2341), "dev": (476, 334)}
    assert parsed("msrp").notes == {
        "pairs/msrp": "172 rows with a sentence in STS-B test dropped (148 train, 24 val)"
    }
    # what the drop is for: no MSRP sentence left is a sentence of STS-B's test split
    stsb = pairs_of(parsed, "stsb_en")
    stsb_test = {
        s.lower() for s in pd.concat([stsb.loc[stsb.split == "test", c] for c in ("text_a", "text_b")])
    }
    assert not {s.lower() for s in pd.concat([df["text_a"], df["text_b"]])} & stsb_test
    assert df.iloc[0].text_a.startswith('Amrozi accused his brother, whom he called "the witness"')


def test_msrp_overlap_list_matches_the_shared_file() -> None:
    rows = read_shared_tsv("msrp", "OVERLAP_with_STSB_test.tsv")
    listed = {(r["split"], r["#1 ID"], r["#2 ID"]) for r in rows if r["split"] in ("train", "val")}
    assert len(listed) == 172 and sum(1 for s, _, _ in listed if s == "train") == 148
    assert listed == MSRP_STSB_TEST_OVERLAP


def test_twitter_url_counts_and_split_by_first_sentence(parsed) -> None:
    spec, df = parsed("twitter_url").pairs["twitter_url"]
    assert (spec.task, spec.label_set, spec.splits) == ("sym", YES_NO, ("train", "dev"))
    assert (len(df), int(df["is_positive"].sum())) == (42200, 11167)
    # SOURCE.md counts 3 554 distinct first sentences with the empty string after the final
    # line break; there are 3 553 sentences
    assert df["text_a"].nunique() == 3553
    assert (df.groupby("text_a")["split"].nunique() == 1).all()
    assert all(hash_fraction(a) < CFG.twitter_url_dev_fraction for a in df.loc[df.split == "dev", "text_a"])
    assert per_split(df) == {"train": (38100, 10093), "dev": (4100, 1074)}


def test_dev_fractions_move_whole_groups(raw_dir: Path) -> None:
    more = DataConfig(selqa_dev_fraction=0.5, twitter_url_dev_fraction=0.3)
    for name in ("selqa", "twitter_url"):
        df = parse_source(name, raw_dir, more).pairs[name][1]
        assert (df.groupby("text_a")["split"].nunique() == 1).all()
        share = (df["split"] == "dev").mean()
        assert abs(share - getattr(more, f"{name}_dev_fraction")) < 0.06


# --------------------------------------------------------------------------- CACM


def test_cacm_collection_and_the_split_id(parsed) -> None:
    source = parsed("cacm")
    c = source.ir["cacm"]
    assert len(c.corpus) == 3204 and c.corpus["doc_id"].is_unique
    assert set(c.corpus["doc_id"]) == {str(i) for i in range(1, 3205)}  # 2856 is there, 28 once
    doc = dict(zip(c.corpus["doc_id"], c.corpus["text"], strict=True))
    assert doc["2856"].startswith("The Synthetic Approach to Decision Table Conversion. Previous approaches")
    assert doc["28"] == "Request for Methods or Programs"
    assert source.notes == {"ir/cacm/corpus": "record '28 56' read as document 2856 (split id in the file)"}
    assert len(c.queries) == 64 and c.queries["query_id"].tolist()[:3] == ["1", "2", "3"]
    assert c.queries["text"].iloc[0].startswith("What articles exist which deal with TSS")
    # qrels "01 1410 0 0": query 1, binary
    assert (len(c.qrels), c.qrels["query_id"].nunique(), set(c.qrels["relevance"])) == (796, 52, {1})
    assert tuple(c.qrels.iloc[0]) == ("1", "1410", 1)
    assert set(c.qrels["query_id"]) <= set(c.queries["query_id"]) and set(c.qrels["doc_id"]) <= set(doc)
    assert not c.qrels.duplicated(["query_id", "doc_id"]).any()
    # title + abstract: 1 587 documents have an abstract; document 3193 has no title (so
    # cacm_titles has 1 586 pairs)
    assert (c.titles["body"] != "").sum() == 1587
    assert c.titles.loc[c.titles["title"] == "", "doc_id"].tolist() == ["3193"]


def _cacm_folder(tmp_path: Path, ids: list[str]) -> Path:
    folder = tmp_path / "cacm"
    folder.mkdir(exist_ok=True)
    docs = "".join(f".I {i}\r\n.T\r\nTitle {n}\r\n.W\r\nAbstract {n}.\r\n" for n, i in enumerate(ids))
    (folder / "cacm.all").write_text(docs, encoding="utf-8")
    (folder / "query.text").write_text(".I 1\n.W\n what is it?\n", encoding="utf-8")
    (folder / "qrels.text").write_text("01 1  0 0\n", encoding="utf-8")
    return folder


def test_cacm_split_id_is_repaired_only_where_expected(tmp_path: Path) -> None:
    ids = ["1", "2855", "28\r\n56", "2857"]
    _cacm_folder(tmp_path, ids)
    c = parse_source("cacm", tmp_path, CFG).ir["cacm"]
    assert c.corpus["doc_id"].tolist() == ["1", "2855", "2856", "2857"]
    # the same split id anywhere else would be mis-labelled silently: refused, naming the line
    _cacm_folder(tmp_path, ["1", "28\r\n56", "2857"])
    with pytest.raises(
        DataError, match=r"cacm\.all: line 6: split record id '28 56' between records 1 and 2857"
    ):
        parse_source("cacm", tmp_path, CFG)
    _cacm_folder(tmp_path, ["1", "28", "28"])
    with pytest.raises(DataError, match=r"cacm\.all: line 11: document id 28 again \(first at line 6\)"):
        parse_source("cacm", tmp_path, CFG)
    _cacm_folder(tmp_path, ["1", "x7"])
    with pytest.raises(DataError, match=r"cacm\.all: line 6: record id 'x7'; expected an integer"):
        parse_source("cacm", tmp_path, CFG)
    folder = _cacm_folder(tmp_path, ["1"])
    (folder / "qrels.text").write_text("01 1 0 0\n02 1 0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"qrels\.text: line 2: 3 fields; expected 'query_id doc_id 0 0'"):
        parse_source("cacm", tmp_path, CFG)


# --------------------------------------------------------------------------- malformed input


def _gz(path: Path, text: str) -> None:
    path.write_bytes(gzip.compress(text.encode("utf-8")))


def _trecqa_train_all(tmp_path: Path, question: str, positive: str, negative: str) -> Path:
    folder = tmp_path / "trecqa-train-all"
    folder.mkdir(exist_ok=True)
    _gz(folder / "Train1-2393.Question.POSInput.gz", question)
    _gz(folder / "Train1-2393.Positive-M.POSInput.gz", positive)
    _gz(folder / "Train1-2393.Negative-M.POSInput.gz", negative)
    return folder


def test_trecqa_train_all_malformed_blocks_name_file_and_line(tmp_path: Path) -> None:
    q = "<Q 1 >\r\nWho ?\r\n</Q>\r\n<Q 2 >\r\nWhat ?\r\n</Q>\r\n"
    a = "<A 1 >\r\nHim .\r\n</A>\r\n<A 2 >\r\n</A>\r\n"
    _trecqa_train_all(tmp_path, q, a, a.replace("<A 2 >\r\n</A>\r\n", ""))
    with pytest.raises(
        DataError, match=r"Negative-M\.POSInput\.gz: no block <A 2 > for the question of .* line 4"
    ):
        parse_source("trecqa_train_all", tmp_path, CFG)
    _trecqa_train_all(tmp_path, q, a, a.replace("</A>\r\n<A 2 >", "<A 2 >"))
    with pytest.raises(
        DataError, match=r"Negative-M\.POSInput\.gz: line 3: '<A 2 >' opens a block inside block <A 1 >"
    ):
        parse_source("trecqa_train_all", tmp_path, CFG)
    _trecqa_train_all(tmp_path, q, a.replace("<A 2 >", "<A 2>"), a)
    with pytest.raises(DataError, match=r"Positive-M\.POSInput\.gz: line 4: malformed tag '<A 2>'"):
        parse_source("trecqa_train_all", tmp_path, CFG)
    _trecqa_train_all(tmp_path, q.replace("Who ?", "Who ?\r\nand why ?"), a, a)
    with pytest.raises(DataError, match=r"Question\.POSInput\.gz: line 1: block <Q 1 > holds 2 lines"):
        parse_source("trecqa_train_all", tmp_path, CFG)
    _trecqa_train_all(tmp_path, q, a + "<A 3 >\r\nStray .\r\n", a)
    with pytest.raises(DataError, match=r"Positive-M\.POSInput\.gz: line 6: block <A 3 > is not closed"):
        parse_source("trecqa_train_all", tmp_path, CFG)
    # well-formed, but not the catalogued files: the held-out drop list would miss its pairs
    _trecqa_train_all(tmp_path, q, a, a)
    with pytest.raises(
        DataError, match=r"14 of the 14 candidate pairs known to overlap the held-out TREC-QA test"
    ):
        parse_source("trecqa_train_all", tmp_path, CFG)


def test_tsv_sources_bad_label_and_field_count_name_file_and_line(tmp_path: Path) -> None:
    wiki = tmp_path / "wikiqa"
    wiki.mkdir()
    header = "QuestionID\tQuestion\tDocumentID\tDocumentTitle\tSentenceID\tSentence\tLabel\r\n"
    good = "Q1\twho?\tD1\tT\tD1-0\tHim .\t1\r\n"
    _gz(wiki / "WikiQA-train.tsv.gz", header + good + "Q1\twho?\tD1\tT\tD1-1\tHer .\t2\r\n")
    _gz(wiki / "WikiQA-dev.tsv.gz", header + good)
    with pytest.raises(DataError, match=r"WikiQA-train\.tsv\.gz: line 3: Label 2; expected 0 or 1"):
        parse_source("wikiqa", tmp_path, CFG)
    _gz(wiki / "WikiQA-train.tsv.gz", header + good + "Q1\twho?\tD1-1\tHer .\t0\r\n")
    with pytest.raises(DataError, match=r"WikiQA-train\.tsv\.gz: line 3: 5 tab-separated fields; expected 7"):
        parse_source("wikiqa", tmp_path, CFG)

    rte = tmp_path / "rte"
    rte.mkdir()
    (rte / "train.tsv").write_text(
        "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tcontradiction\n", encoding="utf-8"
    )
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rte/train\.tsv: line 2: label 'contradiction'; expected one of"):
        parse_source("rte", tmp_path, CFG)

    msrp = tmp_path / "msrp"
    msrp.mkdir()
    head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    (msrp / "msr-para-train.tsv").write_text(head + "yes\t1\t2\tA.\tB.\n", encoding="utf-8")
    (msrp / "msr-para-val.tsv").write_text(head, encoding="utf-8")
    with pytest.raises(DataError, match=r"msr-para-train\.tsv: line 2: Quality 'yes' is not an integer"):
        parse_source("msrp", tmp_path, CFG)


def test_twitter_url_parallel_files_must_line_up(tmp_path: Path) -> None:
    folder = tmp_path / "twitter-url" / "train"
    folder.mkdir(parents=True)
    (folder / "a.toks").write_text("a one\na two\na three\n", encoding="utf-8")
    (folder / "b.toks").write_text("b one\nb two\nb three\n", encoding="utf-8")
    (folder / "sim.txt").write_text("0\n1\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"sim\.txt: line 3: missing; expected parallel files .*sim\.txt: 2 lines"
    ):
        parse_source("twitter_url", tmp_path, CFG)
    (folder / "sim.txt").write_text("0\n1\nmaybe\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"sim\.txt: line 3: label 'maybe' is not an integer"):
        parse_source("twitter_url", tmp_path, CFG)
    (folder / "b.toks").write_text("b one\n\nb three\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.toks: line 2: blank line"):
        parse_source("twitter_url", tmp_path, CFG)


def test_selqa_json_errors_name_the_line_and_item(tmp_path: Path) -> None:
    folder = tmp_path / "selqa"
    folder.mkdir()
    item = {"question": "Who?", "article": "A", "section": "S", "candidates": ["Him.", ""], "answers": [0]}
    bad = item | {"answers": [5]}
    path = folder / "selqa-ass-dev.json"
    path.write_text(json.dumps([item]) + "\n", encoding="utf-8")
    df = parse_source("selqa", tmp_path, CFG).pairs["selqa"][1]
    assert df[["text_b", "label_name"]].values.tolist() == [["Him.", "yes"]]  # the empty one dropped
    path.write_text("[\n" + json.dumps(item) + ",\n" + json.dumps(bad) + "\n]\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"selqa-ass-dev\.json: line 3 \(item 2, column 1\): answers \[5\]; expected"
    ):
        parse_source("selqa", tmp_path, CFG)
    path.write_text('[{"question": "Who?"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1 \(item 1, column 2\): missing key\(s\) \['article'"):
        parse_source("selqa", tmp_path, CFG)
    path.write_text('[{"question": "Who?",]', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: not valid JSON"):
        read_json_array(path, ())


# --------------------------------------------------------------------------- validation


def test_cross_source_leak_helper_hand_worked() -> None:
    def table(split: str, a: list[str], b: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"text_a": a, "text_b": b, "split": split})

    tables = {
        "sym_test": (_spec("sym"), table("test", ["A cat", "q"], ["a dog", "p"])),
        "asym_test": (_spec("asym"), table("test", ["who?"], ["him."])),
    }
    index = index_test_pairs(tables)
    train = table("train", ["a DOG", "him.", "who?", "x"], ["a cat", "who?", "him.", "y"])
    sym = add_cross_leak_column("mine", train, "sym", index)[CROSS_LEAK_COLUMN].tolist()
    # sym: either order, against sym and asym test sets
    hit = "asym_test test: him. ||| who?"
    assert sym == ["sym_test test: a cat ||| a dog", hit, hit, None]
    asym = add_cross_leak_column("mine", train, "asym", index)[CROSS_LEAK_COLUMN].tolist()
    # asym against asym: (query, passage) order only; against a sym test set either order
    assert asym == ["sym_test test: a dog ||| a cat", None, "asym_test test: who? ||| him.", None]
    # a dataset's own test pairs are LEAK_COLUMN's business, not this column's
    assert add_cross_leak_column("sym_test", train, "sym", index)[CROSS_LEAK_COLUMN].tolist()[0] is None


def _spec(task: str):
    from d2llm.data.schema import DatasetSpec

    return DatasetSpec(name="x", task=task, label_kind="score", source="x", label_range=(0, 5))  # type: ignore[arg-type]


def test_a_train_pair_in_another_datasets_test_fails_validation(tmp_path: Path) -> None:
    def write(name: str, rows: list[tuple[str, str, float]]) -> str:
        pd.DataFrame(rows, columns=["text_a", "text_b", "label"]).to_csv(tmp_path / name, index=False)
        return name

    score = {"task": "sym", "label_kind": "score", "label_range": [0, 5]}
    datasets = [
        score
        | {"name": "eval_set", "files": {"test": write("e.csv", [("A man runs.", "A person jogs.", 4.0)])}},
        score
        | {
            "name": "train_set",
            "files": {"train": write("t.csv", [("a person jogs.", "A man  runs.", 4.0), ("x", "y", 1.0)])},
        },
    ]
    params = custom_params(tmp_path, datasets)
    out, report = tmp_path / "prepared", tmp_path / "report"
    prepare_data(params, tmp_path / "no-raw", out)
    with pytest.raises(DataValidationError) as err:
        validate_prepared(params, out, report)
    msg = str(err.value)
    assert (
        f"pairs/train_set: expect_column_values_to_be_null column '{CROSS_LEAK_COLUMN}': "
        "1 unexpected value(s), e.g. ['eval_set test: a man runs. ||| a person jogs.']" in msg
    )
    assert "pairs/eval_set" not in msg  # the test set itself is fine
    relaxed = params_from_dict(params.model_dump(mode="json") | {"validation": {"check_leakage": False}})
    assert validate_prepared(relaxed, out, tmp_path / "report2").success


@pytest.fixture(scope="module")
def prepared_new(tmp_path_factory: pytest.TempPathFactory, raw_dir: Path) -> tuple[Path, object]:
    """The seven new sources, with the test sets they could leak into (STS-B, TREC-QA), prepared once."""
    params = params_from_dict({"data": {"sources": [*NEW_SOURCES, "stsb_en", "trecqa"]}})
    out = tmp_path_factory.mktemp("prepared-new") / "prepared"
    prepare_data(params, raw_dir, out)
    return out, params


def test_new_sources_pass_validation_with_their_profiles(prepared_new, tmp_path: Path) -> None:
    out, params = prepared_new
    summary = validate_prepared(params, out, tmp_path / "report")  # type: ignore[arg-type]
    assert summary.success
    checks = {t.table: t.evaluated for t in summary.tables}
    assert {f"pairs/{n}" for n in NEW_SOURCES if n != "cacm"} | {"pairs/cacm_titles", "ir/cacm/qrels"} <= set(
        checks
    )
    # the profile adds rows and positives per split and text lengths to the pair suites
    assert checks["pairs/msrp"] >= 30


def test_a_profile_catches_a_lost_split_and_a_flipped_label(prepared_new, tmp_path: Path) -> None:
    out, params = prepared_new
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    manifest["pairs"] = {name: manifest["pairs"][name] for name in ("rte", "msrp")}  # validate just these
    manifest["ir"] = []
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    rte = pd.read_parquet(copy / "pairs" / "rte.parquet")
    rte = rte[~((rte["split"] == "dev") & (rte.index % 2 == 0))]  # half of dev lost
    rte.to_parquet(copy / "pairs" / "rte.parquet", index=False)
    msrp = pd.read_parquet(copy / "pairs" / "msrp.parquet")
    msrp["is_positive"] = ~msrp["is_positive"]  # label mapping inverted
    msrp.to_parquet(copy / "pairs" / "msrp.parquet", index=False)
    with pytest.raises(DataValidationError) as err:
        validate_prepared(params, copy, tmp_path / "report")  # type: ignore[arg-type]
    msg = str(err.value)
    assert "pairs/rte: expect_table_row_count_to_be_between (rows where split == 'dev'; observed 138)" in msg
    assert (
        "pairs/msrp: expect_column_mean_to_be_between column 'is_positive' "
        "(rows where split == 'train'; observed 0.31" in msg
    )
