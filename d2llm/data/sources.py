"""Parsers of the shipped raw datasets (data/raw/<folder>/), one function per source.

Each parser reads the files as they were published (CRLF line endings, a BOM, gzip, JSON lines,
SMART ``.I/.T/.W`` records) and returns canonical tables (d2llm.data.schema). Anything that does
not look like the documented format raises DataError naming the file, the line and what was
expected: a silently mis-parsed file would otherwise surface weeks later as a bad metric.

Label conventions (see docs/data.md):
- STS scores stay on their source scale; a pair is positive when score >= 4 (of 5).
- SICK gives two datasets: ``sick`` (3-way NLI, label = class id) and ``sick_r`` (relatedness 1-5).
- NLI class ids follow schema.NLI_CLASSES; a pair is positive when it is an entailment.
- Cranfield qrels number queries by their position in cran.qry; code -1 means not relevant and
  codes 1..4 become relevance 5 - code (1, the strongest, is 4).
- Yes/no class datasets (answer selection: trecqa, trecqa_train_all, wikiqa, selqa; paraphrase:
  msrp, twitter_url) use the class ids of YES_NO (0 no, 1 yes); RTE uses RTE_LABELS (0
  entailment, 1 not_entailment). A pair is positive when it is a yes (an entailment for RTE).
- A few rows are dropped by the parser itself because they occur in a held-out test set of
  another source (TREC-QA TRAIN-ALL, MSRP) or have no text (SelQA): each parser says so in
  ``SourceData.notes``, which prepare writes into the manifest and the printed counts.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from d2llm.config import DataConfig
from d2llm.data.schema import NLI_CLASSES, SPLITS, DatasetSpec, conform_ir, conform_pairs, normalize_text
from d2llm.errors import DataError, clip

log = logging.getLogger(__name__)

STS_POSITIVE_MIN = 4.0  # of 5: the contract's "score >= 4" rule


@dataclass
class IRCollection:
    """An IR test collection plus the (title, body) of each document for title->body pairs."""

    corpus: pd.DataFrame
    queries: pd.DataFrame
    qrels: pd.DataFrame
    titles: pd.DataFrame  # doc_id, title, body


@dataclass
class SourceData:
    """What one source contributes: pair datasets (with their specs) and IR collections."""

    pairs: dict[str, tuple[DatasetSpec, pd.DataFrame]] = field(default_factory=dict)
    ir: dict[str, IRCollection] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    # table ("pairs/<dataset>", "ir/<name>/corpus") -> what the parser dropped or repaired, and why
    notes: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- low-level readers


def read_text(path: Path) -> str:
    """Read a UTF-8 text file (optionally .gz), dropping a BOM and turning CRLF into LF."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read file: {err}") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: not a complete gzip file (truncated or corrupt?): {err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        # err.start counts from after a BOM, which utf-8-sig strips before decoding.
        offset = err.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        line_start = data.rfind(b"\n", 0, offset) + 1
        line = data.count(b"\n", 0, offset) + 1
        where = "of the decompressed text" if path.suffix == ".gz" else "in the file"
        raise DataError(
            f"{path}: line {line}: not valid UTF-8: byte 0x{data[offset]:02x} at offset {offset} "
            f"{where} (byte {offset - line_start + 1} of the line; {err.reason}); "
            "expected a UTF-8 text file - re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for every non-blank line."""
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if line.strip():
            yield number, line


def read_tsv(path: Path, n_fields: int, header: tuple[str, ...] | None = None) -> list[tuple[int, list[str]]]:
    """Rows of a tab-separated file without quoting, each checked to have ``n_fields`` fields."""
    rows: list[tuple[int, list[str]]] = []
    lines = list(numbered_lines(path))
    if header is not None:
        if not lines:
            raise DataError(f"{path}: file is empty; expected a header {list(header)}")
        number, first = lines.pop(0)
        got = tuple(first.split("\t"))
        if got != header:
            raise DataError(
                f"{path}: line {number}: header is {clip(repr(list(got)))}; expected {list(header)}"
            )
    for number, line in lines:
        fields = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
        if len(fields) != n_fields:
            raise DataError(
                f"{path}: line {number}: {len(fields)} tab-separated fields; "
                f"expected {n_fields}: {line[:80]!r}"
            )
        rows.append((number, fields))
    return rows


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, Any]]]:
    """Objects of a JSON-lines file, each checked to hold the ``required`` keys."""
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in numbered_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: line {number}: not valid JSON ({err.msg}); expected one object per line"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in required if k not in obj]
        if missing:
            raise DataError(f"{path}: line {number}: missing key(s) {missing}; expected {list(required)}")
        records.append((number, obj))
    return records


_SPACE = re.compile(r"\s*")


def _skip_space(text: str, pos: int) -> int:
    match = _SPACE.match(text, pos)
    return match.end() if match else pos


def read_json_array(path: Path, required: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """Objects of a file holding one JSON array, each checked to hold the ``required`` keys.

    Returns (where, object) pairs; ``where`` is ``line N (item K, column C)``, the place the object
    starts, so that an error about its content names the line even in a one-line file.
    """
    text = read_text(path)
    decoder = json.JSONDecoder()

    def where(pos: int, item: int | None = None) -> str:
        column = pos - text.rfind("\n", 0, pos)
        inside = f"item {item}, " if item is not None else ""
        return f"line {text.count(chr(10), 0, pos) + 1} ({inside}column {column})"

    pos = _skip_space(text, 0)
    if text[pos : pos + 1] != "[":
        raise DataError(
            f"{path}: {where(pos)}: expected a JSON array of objects ('['), got {text[pos : pos + 20]!r}"
        )
    items: list[tuple[str, dict[str, Any]]] = []
    pos = _skip_space(text, pos + 1)
    if text[pos : pos + 1] == "]":
        pos = _skip_space(text, pos + 1)
    else:
        while True:
            at = where(pos, len(items) + 1)
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {err.lineno}: not valid JSON ({err.msg}, column {err.colno}); "
                    "expected a JSON array of objects"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: {at}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in required if k not in obj]
            if missing:
                raise DataError(f"{path}: {at}: missing key(s) {missing}; expected {list(required)}")
            items.append((at, obj))
            pos = _skip_space(text, end)
            separator = text[pos : pos + 1]
            if separator not in (",", "]"):
                raise DataError(f"{path}: {where(pos, len(items))}: expected ',' or ']' after the object")
            pos = _skip_space(text, pos + 1)
            if separator == "]":
                break
    if pos != len(text):
        raise DataError(f"{path}: {where(pos)}: text after the end of the JSON array")
    return items


# jacana's pseudo-XML (TREC-QA TRAIN-ALL): "<Q 12 >" or "<A 12 >" opens block 12, "</Q>" or
# "</A>" closes it, one sentence per line in between.
_BLOCK_OPEN = re.compile(r"^<([QA]) (\d+) >$")
_BLOCK_CLOSE = re.compile(r"^</([QA])>$")
_BLOCK_TAG_LIKE = re.compile(r"^</?[QA][\s\d>]")  # a tag with a typo, not a sentence


def read_blocks(path: Path, tag: str) -> list[tuple[int, str, list[str]]]:
    """Blocks ``<tag n >`` ... ``</tag>`` of a jacana pseudo-XML file.

    Returns (line of the opening tag, n, the non-blank lines inside) per block, in file order;
    a tag of the other kind, a block opened inside another, a closing tag without a block, text
    outside any block, a repeated id or a block left open are errors naming the line.
    """
    blocks: list[tuple[int, str, list[str]]] = []
    seen: dict[str, int] = {}
    current: tuple[int, str, list[str]] | None = None
    for number, line in numbered_lines(path):
        text = line.strip()
        opened, closed = _BLOCK_OPEN.match(text), _BLOCK_CLOSE.match(text)
        if opened:
            kind, block_id = opened.groups()
            if kind != tag:
                raise DataError(
                    f"{path}: line {number}: tag {text!r}; expected '<{tag} n >' blocks in this file"
                )
            if current is not None:
                raise DataError(
                    f"{path}: line {number}: {text!r} opens a block inside block <{tag} {current[1]} > "
                    f"of line {current[0]}; expected '</{tag}>' first"
                )
            if block_id in seen:
                raise DataError(
                    f"{path}: line {number}: block id {block_id} again (first at line {seen[block_id]})"
                )
            seen[block_id] = number
            current = (number, block_id, [])
        elif closed:
            if closed.group(1) != tag or current is None:
                raise DataError(f"{path}: line {number}: {text!r} without an open '<{tag} n >' block")
            blocks.append(current)
            current = None
        elif _BLOCK_TAG_LIKE.match(text):
            raise DataError(
                f"{path}: line {number}: malformed tag {clip(repr(text))}; "
                f"expected '<{tag} n >' or '</{tag}>'"
            )
        elif current is None:
            raise DataError(
                f"{path}: line {number}: text outside a '<{tag} n >' ... '</{tag}>' block: {line[:60]!r}"
            )
        else:
            current[2].append(line)
    if current is not None:
        raise DataError(
            f"{path}: line {current[0]}: block <{tag} {current[1]} > is not closed; "
            f"expected '</{tag}>' before the end of the file"
        )
    return blocks


def read_parallel_lines(paths: list[Path]) -> list[tuple[int, list[str]]]:
    """(1-based line number, [the line of each file]) for files that hold one item per line.

    The files must have the same number of lines (a final line break is allowed) and no blank
    line: a blank line would shift every later line against the other files.
    """
    columns = []
    for path in paths:
        lines = read_text(path).split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final line break
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise DataError(f"{path}: line {number}: blank line; expected one non-empty item per line")
        columns.append(lines)
    first = columns[0]
    for path, lines in zip(paths[1:], columns[1:], strict=True):
        if len(lines) != len(first):
            short = path if len(lines) < len(first) else paths[0]
            raise DataError(
                f"{short}: line {min(len(lines), len(first)) + 1}: missing; expected parallel files with "
                f"one item per line ({paths[0].name}: {len(first)} lines, {path.name}: {len(lines)} lines)"
            )
    return [(number, list(items)) for number, items in enumerate(zip(*columns, strict=True), start=1)]


_SMART_FIELD = re.compile(r"^\.([A-Z])(?:\s+(.*))?$")


def read_smart(path: Path) -> list[dict[str, str]]:
    """Records of a SMART-format file: ``.I <id>`` starts a record, ``.X`` lines start field X.

    Returns one dict per record with key ``I`` (the id) and one key per field; a field that
    occurs twice in a record (a few Cranfield documents) is concatenated.
    """
    records: list[dict[str, str]] = []
    current: dict[str, list[str]] | None = None
    field_name = ""
    for number, line in numbered_lines(path):
        match = _SMART_FIELD.match(line.rstrip())
        if match:
            field_name, rest = match.group(1), (match.group(2) or "").strip()
            if field_name == "I":
                if not rest:
                    raise DataError(f"{path}: line {number}: '.I' without a record id")
                current = {"I": [rest]}
                records.append(current)  # type: ignore[arg-type]
                continue
            if current is None:
                raise DataError(f"{path}: line {number}: field .{field_name} before the first '.I' record")
            current.setdefault(field_name, [])
            if rest:
                current[field_name].append(rest)
            continue
        if current is None:
            raise DataError(f"{path}: line {number}: text before the first '.I <id>' record: {line[:60]!r}")
        current.setdefault(field_name, []).append(line)
    # Freeze the line lists into normalised strings (the dicts were appended by reference).
    return [{key: normalize_text(" ".join(parts)) for key, parts in rec.items()} for rec in records]  # type: ignore[union-attr]


def _float(path: Path, number: int, value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{path}: line {number}: {what} {clip(repr(value))} is not a number") from None


def _int(path: Path, number: int, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}: line {number}: {what} {clip(repr(value))} is not an integer") from None


# --------------------------------------------------------------------------- row builders


def _score_row(a: str, b: str, score: float, task: str, source: str, split: str, positive_min: float) -> dict:
    return {
        "text_a": normalize_text(a),
        "text_b": normalize_text(b),
        "label": float(score),
        "label_name": "",
        "task": task,
        "source": source,
        "split": split,
        "is_positive": score >= positive_min,
    }


def _nli_row(a: str, b: str, name: str, source: str, split: str) -> dict:
    return {
        "text_a": normalize_text(a),
        "text_b": normalize_text(b),
        "label": float(NLI_CLASSES.index(name)),
        "label_name": name,
        "task": "sym",
        "source": source,
        "split": split,
        "is_positive": name == "entailment",
    }


def _nli_label(path: Path, number: int, value: object) -> str:
    name = value.strip().lower() if isinstance(value, str) else None  # JSON may hold a number or null
    if name not in NLI_CLASSES:
        expected = [*NLI_CLASSES, "-"]
        raise DataError(f"{path}: line {number}: NLI label {clip(repr(value))}; expected one of {expected}")
    return name


YES_NO: tuple[str, ...] = ("no", "yes")  # label = class id: 1 means yes (answers it, a paraphrase)


def _class_row(
    a: str, b: str, label_set: tuple[str, ...], name: str, task: str, source: str, split: str, positive: str
) -> dict:
    return {
        "text_a": normalize_text(a),
        "text_b": normalize_text(b),
        "label": float(label_set.index(name)),
        "label_name": name,
        "task": task,
        "source": source,
        "split": split,
        "is_positive": name == positive,
    }


def _binary_label(path: Path, number: int, value: str, what: str = "label") -> str:
    """A 0/1 column of a file as its YES_NO class name."""
    label = _int(path, number, value, what)
    if label not in (0, 1):
        raise DataError(f"{path}: line {number}: {what} {label}; expected 0 or 1")
    return YES_NO[label]


def class_spec(
    name: str, task: str, label_set: tuple[str, ...], positive: str, meaning: str, splits: tuple[str, ...]
) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        task=task,  # type: ignore[arg-type]
        label_kind="class",
        source=name,
        label_set=label_set,
        positive_rule=f"label_name == {positive!r} ({meaning})",
        splits=splits,
    )


def sts_spec(name: str, source: str, lo: float, hi: float, splits: tuple[str, ...] = SPLITS) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        task="sym",
        label_kind="score",
        source=source,
        label_range=(lo, hi),
        positive_rule=f"score >= {STS_POSITIVE_MIN:g}",
        splits=splits,
    )


def nli_spec(name: str, source: str, splits: tuple[str, ...]) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        task="sym",
        label_kind="class",
        source=source,
        label_set=NLI_CLASSES,
        positive_rule="label_name == 'entailment'",
        splits=splits,
    )


def _frame(rows: list[dict], what: str) -> pd.DataFrame:
    return conform_pairs(pd.DataFrame(rows), what)


def hash_fraction(key: str) -> float:
    """A stable pseudo-random number in [0, 1) from a string: same key, same split, on any machine."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


# --------------------------------------------------------------------------- pair sources


def parse_stsb_en(folder: Path, cfg: DataConfig) -> SourceData:
    path = folder / "stsbenchmark.tsv.gz"
    header = ("split", "genre", "dataset", "year", "sid", "score", "sentence1", "sentence2")
    rows = []
    for number, f in read_tsv(path, 8, header):
        split = f[0]
        if split not in ("train", "dev", "test"):
            raise DataError(f"{path}: line {number}: split {clip(repr(split))}; expected train, dev or test")
        score = _float(path, number, f[5], "score")
        rows.append(_score_row(f[6], f[7], score, "sym", "stsb_en", split, STS_POSITIVE_MIN))
    pairs = {"stsb_en": (sts_spec("stsb_en", "stsb_en", 0, 5), _frame(rows, str(path)))}
    return SourceData(pairs=pairs, files=[path])


SICK_FILES = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}


def parse_sick(folder: Path, cfg: DataConfig) -> SourceData:
    """SICK yields ``sick`` (3-way NLI) and ``sick_r`` (relatedness 1-5) over the same pairs."""
    header = ("pair_ID", "sentence_A", "sentence_B", "relatedness_score", "entailment_judgment")
    nli, rel, files = [], [], []
    for split, name in SICK_FILES.items():
        path = folder / name
        files.append(path)
        for number, f in read_tsv(path, 5, header):
            nli.append(_nli_row(f[1], f[2], _nli_label(path, number, f[4]), "sick", split))
            score = _float(path, number, f[3], "relatedness_score")
            rel.append(_score_row(f[1], f[2], score, "sym", "sick", split, STS_POSITIVE_MIN))
    pairs = {
        "sick": (nli_spec("sick", "sick", ("train", "dev", "test")), _frame(nli, f"{folder} (sick)")),
        "sick_r": (sts_spec("sick_r", "sick", 1, 5), _frame(rel, f"{folder} (sick_r)")),
    }
    return SourceData(pairs=pairs, files=files)


def parse_snli(folder: Path, cfg: DataConfig) -> SourceData:
    """Only SNLI's dev file ships: split it by a hash of pairID into train and dev (stable)."""
    path = folder / "snli_1.0_dev.jsonl.gz"
    rows = []
    for number, obj in read_jsonl(path, ("gold_label", "sentence1", "sentence2", "pairID")):
        if obj["gold_label"] == "-":  # no annotator consensus
            continue
        split = "dev" if hash_fraction(str(obj["pairID"])) < cfg.snli_dev_fraction else "train"
        label = _nli_label(path, number, obj["gold_label"])
        rows.append(_nli_row(obj["sentence1"], obj["sentence2"], label, "snli", split))
    pairs = {"snli": (nli_spec("snli", "snli", ("train", "dev")), _frame(rows, str(path)))}
    return SourceData(pairs=pairs, files=[path])


def parse_stsb_zh(folder: Path, cfg: DataConfig) -> SourceData:
    rows, files = [], []
    names = {"train": "STS-B.train.data", "dev": "STS-B.valid.data", "test": "STS-B.test.data"}
    for split, name in names.items():
        path = folder / name
        files.append(path)
        for number, f in read_tsv(path, 3):
            score = _float(path, number, f[2], "score")
            rows.append(_score_row(f[0], f[1], score, "sym", "stsb_zh", split, STS_POSITIVE_MIN))
    pairs = {"stsb_zh": (sts_spec("stsb_zh", "stsb_zh", 0, 5), _frame(rows, str(folder)))}
    return SourceData(pairs=pairs, files=files)


def parse_ocnli(folder: Path, cfg: DataConfig) -> SourceData:
    """train.10k is the training split (train.3k is a subset of it); dev.json is dev."""
    rows, files = [], []
    for split, name in {"train": "train.10k.json", "dev": "dev.json"}.items():
        path = folder / name
        files.append(path)
        for number, obj in read_jsonl(path, ("sentence1", "sentence2", "label")):
            if obj["label"] == "-":
                continue
            label = _nli_label(path, number, obj["label"])
            rows.append(_nli_row(obj["sentence1"], obj["sentence2"], label, "ocnli", split))
    pairs = {"ocnli": (nli_spec("ocnli", "ocnli", ("train", "dev")), _frame(rows, str(folder)))}
    return SourceData(pairs=pairs, files=files)


def parse_atec(folder: Path, cfg: DataConfig) -> SourceData:
    """Binary paraphrase labels (1 = same meaning), evaluated like STS; no train file ships."""
    rows, files = [], []
    for split, name in {"dev": "ATEC.valid.data", "test": "ATEC.test.data"}.items():
        path = folder / name
        files.append(path)
        for number, f in read_tsv(path, 3):
            label = _int(path, number, f[2], "label")
            if label not in (0, 1):
                raise DataError(f"{path}: line {number}: label {label}; expected 0 or 1")
            rows.append(_score_row(f[0], f[1], label, "sym", "atec", split, 1.0))
    spec = DatasetSpec(
        name="atec", task="sym", label_kind="score", source="atec", label_range=(0, 1),
        positive_rule="label == 1", splits=("dev", "test"),
    )  # fmt: skip
    return SourceData(pairs={"atec": (spec, _frame(rows, str(folder)))}, files=files)


# TREC-QA texts are PTB-tokenised; the bracket and quote tokens become the characters a
# pretrained tokenizer knows. Spacing is left as published (the models read it fine).
_PTB_TOKENS = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}",
               "``": '"', "''": '"'}  # fmt: skip
_PTB_PATTERN = re.compile("|".join(re.escape(t) for t in _PTB_TOKENS))
TRECQA_LABELS: tuple[str, ...] = YES_NO  # label = class id: 1 means "answers the question"


def ptb_untokenize(text: str) -> str:
    return _PTB_PATTERN.sub(lambda m: _PTB_TOKENS[m.group(0)], text)


# TREC-QA's train.csv (brmson's copy of Wang et al.'s TRAIN) writes each number token of a text
# as "<num>"; TRAIN-ALL (jacana) keeps the digits: "... Nobel Peace Prize in 1989 ?" there is
# "... Nobel Peace Prize in <num> ?" here (12 of the 93 TRAIN questions). The split key masks
# number tokens the same way, so a question shared by the two sources lands in the same split.
# On train.csv the mask changes nothing (its numbers are masked already): its split is the
# one of the plain normalised question text (tests/data/test_new_sources.py checks both).
_NUMBER_TOKEN = re.compile(r"(?<!\S)\d+(?:,\d{3})*(?:\.\d+)?(?!\S)")


def trecqa_split_key(question: str) -> str:
    """The text a TREC-QA question's split is hashed from (normalised, number tokens masked)."""
    return _NUMBER_TOKEN.sub("<num>", normalize_text(question))


def trecqa_split(question: str, cfg: DataConfig) -> str:
    """``dev`` for the hash-chosen share ``cfg.trecqa_dev_fraction`` of the questions, else ``train``.

    One rule for ``trecqa`` (its train.csv) and ``trecqa_train_all``: a question in both is in the
    same split in both, so no TREC-QA dev question is ever trained on.
    """
    return "dev" if hash_fraction(trecqa_split_key(question)) < cfg.trecqa_dev_fraction else "train"


def parse_trecqa(folder: Path, cfg: DataConfig) -> SourceData:
    """TREC-QA answer selection (question -> candidate sentence, asym).

    The shipped ``train.csv`` is split by question (a hash of the question text, share
    ``cfg.trecqa_dev_fraction``) into train and dev: the candidates of one question stay
    together. The shipped ``dev.csv`` is this project's test split (the official test split is
    held out).
    """
    rows, files = [], []
    for file_split, name in (("train", "train.csv"), ("test", "dev.csv")):
        path = folder / name
        files.append(path)
        lines = read_text(path).split("\n")
        reader = csv.reader(lines)
        header = next(reader, None)
        if header != ["qtext", "label", "atext"]:
            raise DataError(f"{path}: line 1: header is {header}; expected ['qtext', 'label', 'atext']")
        for number, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != 3:
                raise DataError(
                    f"{path}: line {number}: {len(fields)} fields; expected 3 (qtext,label,atext)"
                )
            label = _int(path, number, fields[1], "label")
            if label not in (0, 1):
                raise DataError(f"{path}: line {number}: label {label}; expected 0 or 1")
            question, answer = ptb_untokenize(fields[0]), ptb_untokenize(fields[2])
            split = trecqa_split(question, cfg) if file_split == "train" else file_split
            rows.append(
                {
                    "text_a": normalize_text(question),
                    "text_b": normalize_text(answer),
                    "label": float(label),
                    "label_name": TRECQA_LABELS[label],
                    "task": "asym",
                    "source": "trecqa",
                    "split": split,
                    "is_positive": label == 1,
                }
            )
    spec = DatasetSpec(
        name="trecqa", task="asym", label_kind="class", source="trecqa", label_set=TRECQA_LABELS,
        positive_rule="label_name == 'yes' (the sentence answers the question)",
        splits=("train", "dev", "test"),
    )  # fmt: skip
    return SourceData(pairs={"trecqa": (spec, _frame(rows, str(folder)))}, files=files)


# (question id, sha256 of the normalised sentence) of the 14 TRAIN-ALL candidate pairs whose
# sentence is also a candidate sentence of TREC-QA's held-out test split (Wang et al. TEST; the
# same NYT shuttle articles). From the derived list OVERLAP_answer_sentences_in_wang_test.tsv
# of the data maintainers (not a catalogued file); the sentence is hashed after ptb_untokenize
# and normalize_text, i.e. as it is in the prepared table. All 14 are negatives.
TRECQA_TRAIN_ALL_HELD_OUT_OVERLAP: frozenset[tuple[str, str]] = frozenset(
    {
        ("1649", "9414db516c574010dcffcc280d09b93826e2aa76e536d0510ab82ef3c6e4872c"),
        ("1649", "1985717e30c8ce43c0815ef6da5902bc540625770ebf6f6966cd725558cbf3a9"),
        ("1649", "5706f73cb12e700bc0afee2cd9f546ebffadc25e5c7ba80f89b2918671bb9cbf"),
        ("1649", "49aa9b003537eb0692f532672cbe563cf5c0e7e6afaa94481b8294e230d28607"),
        ("1649", "0637efc50bedea3b13ead9dd2d02b4d820b3ea30cd0186d5f48bfcabc1f03e42"),
        ("1649", "64f153b1ce61d1cd79fc3ec715a7e9838bc5a03b44d08ba45ff268b69f0a5e8e"),
        ("1649", "36ddfc3acd094aae8a832fb8df1aefb0c5da2a696b7ab85b5e985c26795da0f3"),
        ("1649", "a7bfc930141dc34bae468bee016d8eec433607aa7372f7a12f4a71a6c9742e50"),
        ("1649", "3df04f0d7f49e768ca75a20103d9b6d29fa4ac53ce8914d97eaf3b761a6eb896"),
        ("1649", "ea73a1ff3bf0465cd6447514f3359f5964a71709055ecf40b0fcde7802dfa55b"),
        ("1649", "3c7d3ae1b909f7018a9014b8f878e9ae3aad9747d14b4720a1b1effdcfdef8bf"),
        ("1678", "fb4816ab4f3e37daf77f27efbf9263a4a875b3638aa7b7f90f7b39a3100e7e0c"),
        ("1853", "fe8e7aa69aa0444d342c20783c20e49927e76d2ae0f3c0f98996d8a29daef013"),
        ("2293", "fe8e7aa69aa0444d342c20783c20e49927e76d2ae0f3c0f98996d8a29daef013"),
    }
)
TRECQA_TRAIN_ALL_FILES = {
    "question": "Train1-2393.Question.POSInput.gz",
    "yes": "Train1-2393.Positive-M.POSInput.gz",
    "no": "Train1-2393.Negative-M.POSInput.gz",
}


def sentence_digest(sentence: str) -> str:
    """sha256 of a sentence as prepared (PTB tokens undone, whitespace normalised)."""
    return hashlib.sha256(normalize_text(ptb_untokenize(sentence)).encode("utf-8")).hexdigest()


def parse_trecqa_train_all(folder: Path, cfg: DataConfig) -> SourceData:
    """TREC-QA TRAIN-ALL (questions 1-2393, automatic answer-pattern labels; asym).

    Three jacana pseudo-XML files joined on the block id: ``<Q n >`` holds the question, the
    ``<A n >`` block of Positive-M its candidates labelled yes, that of Negative-M those labelled
    no (a block may be empty). Split by question with trecqa's rule (:func:`trecqa_split`), so
    the 93 questions it shares with ``trecqa`` are in the same split in both. The candidate
    pairs of TRECQA_TRAIN_ALL_HELD_OUT_OVERLAP are dropped; all of them must be found, else the
    files are not the catalogued ones and the drop would silently miss a test sentence.
    """
    name = "trecqa_train_all"
    q_path = folder / TRECQA_TRAIN_ALL_FILES["question"]
    answer_paths = {label: folder / TRECQA_TRAIN_ALL_FILES[label] for label in ("yes", "no")}
    answers = {
        label: {block_id: (number, lines) for number, block_id, lines in read_blocks(path, "A")}
        for label, path in answer_paths.items()
    }
    rows, dropped = [], set()
    for number, qid, lines in read_blocks(q_path, "Q"):
        if len(lines) != 1:
            raise DataError(
                f"{q_path}: line {number}: block <Q {qid} > holds {len(lines)} lines; expected one question"
            )
        question = normalize_text(ptb_untokenize(lines[0]))
        split = trecqa_split(question, cfg)
        for label, path in answer_paths.items():
            block = answers[label].pop(qid, None)
            if block is None:
                raise DataError(
                    f"{path}: no block <A {qid} > for the question of {q_path.name} line {number}; "
                    "expected one '<A n >' block (empty if there is no candidate) per question"
                )
            for sentence in block[1]:
                key = (qid, sentence_digest(sentence))
                if key in TRECQA_TRAIN_ALL_HELD_OUT_OVERLAP:
                    dropped.add(key)
                    continue
                answer = ptb_untokenize(sentence)
                rows.append(_class_row(question, answer, YES_NO, label, "asym", name, split, "yes"))
    for label, path in answer_paths.items():
        for block_id, (number, _) in answers[label].items():
            raise DataError(
                f"{path}: line {number}: block <A {block_id} > has no question "
                f"<Q {block_id} > in {q_path.name}"
            )
    missing = sorted(TRECQA_TRAIN_ALL_HELD_OUT_OVERLAP - dropped)
    if missing:
        raise DataError(
            f"{answer_paths['no']}: {len(missing)} of the {len(TRECQA_TRAIN_ALL_HELD_OUT_OVERLAP)} "
            "candidate pairs known to overlap the held-out TREC-QA test were not found (question ids "
            f"{sorted({qid for qid, _ in missing})}); expected the catalogued files (data/raw/catalog.yaml)"
        )
    meaning = "the sentence matches the TREC answer pattern"
    spec = class_spec(name, "asym", YES_NO, "yes", meaning, ("train", "dev"))
    note = f"{len(dropped)} candidate pairs whose sentence is in the held-out TREC-QA test dropped"
    log.info("%s: %s", name, note)
    return SourceData(
        pairs={name: (spec, _frame(rows, str(folder)))},
        files=[q_path, *answer_paths.values()],
        notes={f"pairs/{name}": note},
    )


WIKIQA_FILES = {"train": "WikiQA-train.tsv.gz", "dev": "WikiQA-dev.tsv.gz"}
WIKIQA_HEADER = ("QuestionID", "Question", "DocumentID", "DocumentTitle", "SentenceID", "Sentence", "Label")


def parse_wikiqa(folder: Path, cfg: DataConfig) -> SourceData:
    """WikiQA answer selection (question -> sentence of its Wikipedia summary, asym).

    The shipped train and dev files are our train and dev splits (the test file is held out by
    the maintainers); every row is kept, also those of questions without a correct sentence.
    """
    rows, files = [], []
    for split, name in WIKIQA_FILES.items():
        path = folder / name
        files.append(path)
        for number, f in read_tsv(path, 7, WIKIQA_HEADER):
            label = _binary_label(path, number, f[6], "Label")
            rows.append(_class_row(f[1], f[5], YES_NO, label, "asym", "wikiqa", split, "yes"))
    spec = class_spec("wikiqa", "asym", YES_NO, "yes", "the sentence answers the question", ("train", "dev"))
    return SourceData(pairs={"wikiqa": (spec, _frame(rows, str(folder)))}, files=files)


def parse_selqa(folder: Path, cfg: DataConfig) -> SourceData:
    """SelQA answer-sentence selection (asym); only its dev file ships.

    Each question comes with the sentences of one Wikipedia section as candidates and the indices
    of those that answer it. The file is split into train and dev by a hash of that section
    (``cfg.selqa_dev_fraction`` of the sections go to dev): the questions asked about one section
    (204 of the 785 share theirs with another, mostly paraphrases of one another) share its
    candidates, so they stay in one split along with them. Empty candidate strings (42, none an
    answer) are dropped.
    """
    path = folder / "selqa-ass-dev.json"
    rows, empty = [], 0
    for where, obj in read_json_array(path, ("question", "article", "section", "candidates", "answers")):
        question, candidates, answers = obj["question"], obj["candidates"], obj["answers"]
        if not isinstance(question, str) or not normalize_text(question):
            raise DataError(f"{path}: {where}: question {clip(repr(question))}; expected a non-empty string")
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise DataError(
                f"{path}: {where}: candidates {clip(repr(candidates))}; expected a list of strings"
            )
        valid = range(len(candidates))
        if not isinstance(answers, list) or not all(isinstance(i, int) and i in valid for i in answers):
            raise DataError(
                f"{path}: {where}: answers {clip(repr(answers))}; expected a list of candidate indices "
                f"(0..{len(candidates) - 1})"
            )
        group = f"{normalize_text(obj['article'])} / {normalize_text(obj['section'])}"
        split = "dev" if hash_fraction(group) < cfg.selqa_dev_fraction else "train"
        for index, candidate in enumerate(candidates):
            label = "yes" if index in answers else "no"
            if not normalize_text(candidate):
                if label == "yes":
                    raise DataError(
                        f"{path}: {where}: answer {index} is an empty candidate; expected a sentence"
                    )
                empty += 1
                continue
            rows.append(_class_row(question, candidate, YES_NO, label, "asym", "selqa", split, "yes"))
    spec = class_spec("selqa", "asym", YES_NO, "yes", "the sentence answers the question", ("train", "dev"))
    notes = {"pairs/selqa": f"{empty} empty candidate sentences dropped"} if empty else {}
    return SourceData(pairs={"selqa": (spec, _frame(rows, str(path)))}, files=[path], notes=notes)


RTE_LABELS: tuple[str, ...] = ("entailment", "not_entailment")  # label = class id


def parse_rte(folder: Path, cfg: DataConfig) -> SourceData:
    """GLUE RTE (binary textual entailment, sym like the other NLI sets): train = train, dev = dev."""
    rows, files = [], []
    for split, name in {"train": "train.tsv", "dev": "dev.tsv"}.items():
        path = folder / name
        files.append(path)
        for number, f in read_tsv(path, 4, ("index", "sentence1", "sentence2", "label")):
            if f[3] not in RTE_LABELS:
                raise DataError(
                    f"{path}: line {number}: label {clip(repr(f[3]))}; expected one of {list(RTE_LABELS)}"
                )
            rows.append(_class_row(f[1], f[2], RTE_LABELS, f[3], "sym", "rte", split, "entailment"))
    spec = class_spec(
        "rte", "sym", RTE_LABELS, "entailment", "the first text entails the second", ("train", "dev")
    )
    return SourceData(pairs={"rte": (spec, _frame(rows, str(folder)))}, files=files)


# (file split, #1 ID, #2 ID) of the MSRP train/val rows with a sentence in the STS-B test split
# (STS-B's MSRpar pairs were drawn from MSRP): 109 + 19 identical pairs and 39 + 5 rows sharing
# one sentence. From the derived list OVERLAP_with_STSB_test.tsv of the data maintainers (not a
# catalogued file); tests/data/test_new_sources.py checks this copy against it.
_MSRP_OVERLAP_IDS = {
    "train": """
        2108705-2108831 1563874-1563853 1989515-1989458 1692902-1692851 2198036-2198094 2630545-2630577
        1097577-1097664 3334905-3334946 1268733-1268445 969512-969295 472952-472535 2845442-2845257
        130656-130644 375678-375561 1719820-1719843 2359454-2359412 365851-365967 1112726-1112799
        2307064-2307235 1908277-1908617 1984039-1983986 2895263-2895171 1332049-1331979 2590100-2589773
        1272006-1271919 2561428-2561327 1660835-1660765 3140260-3140288 779810-779840 2081069-2081132
        703785-703995 2886542-2886524 139339-139370 532804-532661 2426433-2426378 1657933-1657875
        3374201-3374248 811407-811378 1518091-1518014 1151081-1151065 1690902-1690918 1390306-1390412
        1268732-1268445 2613347-2613435 392738-392798 1300475-1300604 2854798-2854832 3020795-3020597
        3270373-3270399 1690639-1690835 2931868-2932271 1051289-1050975 1167835-1167651 146126-146291
        196230-195968 368067-368018 747968-748092 1851859-1851814 3010408-3010442 2035179-2035364
        570666-570348 1921868-1921881 2819406-2819535 1140085-1139891 969584-969187 3225863-3225896
        1297360-1297335 440568-440402 1015204-1015140 453448-453574 1088211-1088238 749739-749633
        2600535-2600404 481931-481974 226237-225636 1094963-1094672 334677-334628 1730685-1730772
        259989-260054 3218713-3218830 2630577-2630578 1802897-1802788 1748966-1748905 3020597-3020740
        2668628-2668543 2908282-2908123 440225-440402 345700-345683 111977-111896 1982137-1982082
        2630546-2630578 2146802-2146689 627204-627159 1730708-1730772 1265264-1265297 2424444-2424265
        2769819-2769671 2628364-2628772 205145-204942 2183965-2183946 1343292-1343185 1564515-1564467
        1438074-1437632 2307246-2307235 501978-501929 1279425-1279614 173863-173814 700603-700553
        2330519-2330395 1787955-1787922 1438101-1437632 1802596-1802526 2854524-2854472 129778-130265
        1802788-1803098 3187846-3187778 2226181-2226166 667291-667038 1638113-1638056 869697-869241
        2205356-2205241 520053-520147 2111776-2111618 558330-558449 205100-205145 2082955-2082880
        2969732-2969833 572517-572552 2515275-2515371 543300-543242 2371383-2371261 2009633-2008963
        1705277-1704990 146291-146112 745879-746177 3372296-3372332 2277401-2277378 749633-749912
        2784891-2784624 969381-969512 581577-581596 2727213-2727379 139442-139370 1015170-1015204
        1279593-1279614 1788039-1787922 3372289-3372332 392798-392735
    """,
    "val": """
        841596-841803 2279872-2279663 1015249-1015204 1279586-1279614 1305396-1305775 1455619-1455672
        3010424-3010442 1811787-1811952 2854479-2854521 781894-781633 2009317-2009591 2776997-2776959
        1819331-1819007 1715931-1715779 2190772-2190744 1233840-1234052 2359498-2359373 3313770-3313492
        146112-146127 872784-872834 863474-863505 2436811-2436865 1848001-1848224 453575-453448
    """,
}
MSRP_STSB_TEST_OVERLAP: frozenset[tuple[str, str, str]] = frozenset(
    (split, id1, id2)
    for split, ids in _MSRP_OVERLAP_IDS.items()
    for id1, _, id2 in (pair.partition("-") for pair in ids.split())
)
MSRP_FILES = {"train": ("train", "msr-para-train.tsv"), "dev": ("val", "msr-para-val.tsv")}
MSRP_HEADER = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")


def parse_msrp(folder: Path, cfg: DataConfig) -> SourceData:
    """Microsoft Research Paraphrase Corpus (sym, yes/no; brmson's split): train = train, val = dev.

    The rows of MSRP_STSB_TEST_OVERLAP are dropped (STS-B test holds them); all of them must be
    found, else the files are not the catalogued ones and the drop would silently miss some.
    """
    rows, files, dropped = [], [], set()
    for split, (file_split, name) in MSRP_FILES.items():
        path = folder / name
        files.append(path)
        for number, f in read_tsv(path, 5, MSRP_HEADER):
            label = _binary_label(path, number, f[0], "Quality")
            if (file_split, f[1], f[2]) in MSRP_STSB_TEST_OVERLAP:
                dropped.add((file_split, f[1], f[2]))
                continue
            rows.append(_class_row(f[3], f[4], YES_NO, label, "sym", "msrp", split, "yes"))
    missing = sorted(MSRP_STSB_TEST_OVERLAP - dropped)
    if missing:
        raise DataError(
            f"{folder}: {len(missing)} of the {len(MSRP_STSB_TEST_OVERLAP)} rows known to overlap STS-B test "
            f"were not found (e.g. {missing[:3]}); expected the catalogued files (data/raw/catalog.yaml)"
        )
    spec = class_spec("msrp", "sym", YES_NO, "yes", "the two sentences are paraphrases", ("train", "dev"))
    per_split = {s: sum(1 for k in dropped if k[0] == s) for s in ("train", "val")}
    note = (
        f"{len(dropped)} rows with a sentence in STS-B test dropped "
        f"({per_split['train']} train, {per_split['val']} val)"
    )
    log.info("msrp: %s", note)
    return SourceData(
        pairs={"msrp": (spec, _frame(rows, str(folder)))}, files=files, notes={"pairs/msrp": note}
    )


def parse_twitter_url(folder: Path, cfg: DataConfig) -> SourceData:
    """Twitter URL paraphrase corpus (sym, yes/no; lower-cased, tokenised); only train ships.

    Three parallel line files (a.toks, b.toks, sim.txt). Split into train and dev by a hash of
    the first sentence (``cfg.twitter_url_dev_fraction`` goes to dev): the pairs of one first
    sentence (the tweet every candidate was collected for) stay in one split.
    """
    paths = [folder / "train" / name for name in ("a.toks", "b.toks", "sim.txt")]
    rows = []
    for number, (a, b, sim) in read_parallel_lines(paths):
        label = _binary_label(paths[2], number, sim.strip())
        split = "dev" if hash_fraction(normalize_text(a)) < cfg.twitter_url_dev_fraction else "train"
        rows.append(_class_row(a, b, YES_NO, label, "sym", "twitter_url", split, "yes"))
    spec = class_spec("twitter_url", "sym", YES_NO, "yes", "the two tweets are paraphrases", ("train", "dev"))
    return SourceData(pairs={"twitter_url": (spec, _frame(rows, str(folder)))}, files=paths)


# --------------------------------------------------------------------------- IR sources


def _strip_title(title: str, body: str) -> str:
    """Cranfield bodies repeat the title; drop it so title->body pairs are not trivial."""
    if title and body.lower().startswith(title.lower()):
        return body[len(title) :].strip()
    return body


def _documents(path: Path, records: list[dict[str, str]] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(corpus, titles) from a SMART document file (or its ``records``); corpus text is title + body."""
    corpus, titles = [], []
    for rec in read_smart(path) if records is None else records:
        title = rec.get("T", "")
        body = _strip_title(title, rec.get("W", ""))
        joiner = " " if title[-1:] in ".?!" else ". "
        text = f"{title}{joiner}{body}" if title and body else title or body
        corpus.append({"doc_id": rec["I"], "text": text})
        titles.append({"doc_id": rec["I"], "title": title, "body": body})
    titles_df = pd.DataFrame(titles, columns=["doc_id", "title", "body"])
    return conform_ir(pd.DataFrame(corpus), "corpus", str(path)), titles_df


def parse_cranfield(folder: Path, cfg: DataConfig) -> SourceData:
    docs_path, qry_path, rel_path = folder / "cran.all.1400", folder / "cran.qry", folder / "cranqrel"
    corpus, titles = _documents(docs_path)
    # Quirk: the qrels number queries 1..225 by position in cran.qry, not by the .I field.
    records = read_smart(qry_path)
    queries = [{"query_id": str(pos), "text": rec.get("W", "")} for pos, rec in enumerate(records, start=1)]
    qrels = []
    for number, line in numbered_lines(rel_path):
        f = line.split()
        if len(f) != 3:
            raise DataError(f"{rel_path}: line {number}: {len(f)} fields; expected 'query_id doc_id code'")
        code = _int(rel_path, number, f[2], "relevance code")
        if code not in (-1, 1, 2, 3, 4, 5):
            raise DataError(f"{rel_path}: line {number}: relevance code {code}; expected -1 or 1..5")
        relevance = 0 if code == -1 else 5 - code  # 1 = complete answer = strongest = 4
        qrels.append({"query_id": f[0], "doc_id": f[1], "relevance": relevance})
    collection = IRCollection(
        corpus=corpus,
        queries=conform_ir(pd.DataFrame(queries), "queries", str(qry_path)),
        qrels=conform_ir(pd.DataFrame(qrels), "qrels", str(rel_path)),
        titles=titles,
    )
    return SourceData(ir={"cranfield": collection}, files=[docs_path, qry_path, rel_path])


def parse_cisi(folder: Path, cfg: DataConfig) -> SourceData:
    docs_path, qry_path, rel_path = folder / "CISI.ALL", folder / "CISI.QRY", folder / "CISI.REL"
    corpus, titles = _documents(docs_path)
    # Some queries also carry .T/.A/.B (the paper they came from); the question itself is .W.
    records = read_smart(qry_path)
    queries = [{"query_id": rec["I"], "text": rec.get("W") or rec.get("T", "")} for rec in records]
    qrels = []
    for number, line in numbered_lines(rel_path):
        f = line.split()
        if len(f) < 2:
            raise DataError(f"{rel_path}: line {number}: expected 'query_id doc_id ...', got {line[:60]!r}")
        qrels.append({"query_id": f[0], "doc_id": f[1], "relevance": 1})  # binary judgements
    collection = IRCollection(
        corpus=corpus,
        queries=conform_ir(pd.DataFrame(queries), "queries", str(qry_path)),
        qrels=conform_ir(pd.DataFrame(qrels), "qrels", str(rel_path)),
        titles=titles,
    )
    return SourceData(ir={"cisi": collection}, files=[docs_path, qry_path, rel_path])


# CACM's cacm.all (this copy) breaks the id of document 2856 over two lines, ".I 28" and "56"
# (line 92798), so the record reads as id "28 56" (a second 28, were the continuation ignored)
# and 2856 is missing. Only that record, between 2855 and 2857, is repaired: any other id that
# is not an integer, or a repeated id, is an error, since the qrels would then silently point
# at the wrong document.
CACM_SPLIT_ID = ("28 56", "2856")


def _smart_id_lines(path: Path) -> list[int]:
    """The line number of each record's ``.I`` line (read_smart's records, in order)."""
    return [
        number
        for number, line in numbered_lines(path)
        if (match := _SMART_FIELD.match(line.rstrip())) and match.group(1) == "I"
    ]


def _cacm_doc_ids(path: Path, records: list[dict[str, str]]) -> list[str]:
    """The document ids of cacm.all, the known split id repaired (see CACM_SPLIT_ID)."""
    ids, first_line = [], {}
    for position, (rec, number) in enumerate(zip(records, _smart_id_lines(path), strict=True)):
        doc_id = rec["I"]
        if doc_id == CACM_SPLIT_ID[0]:
            before = records[position - 1]["I"] if position else None
            after = records[position + 1]["I"] if position + 1 < len(records) else None
            if (before, after) != ("2855", "2857"):
                raise DataError(
                    f"{path}: line {number}: split record id {doc_id!r} between records {before} and "
                    f"{after}; expected it only between 2855 and 2857 (document 2856)"
                )
            doc_id = CACM_SPLIT_ID[1]
        if not doc_id.isdigit():
            raise DataError(f"{path}: line {number}: record id {clip(repr(doc_id))}; expected an integer")
        if doc_id in first_line:
            raise DataError(
                f"{path}: line {number}: document id {doc_id} again (first at line {first_line[doc_id]})"
            )
        first_line[doc_id] = number
        ids.append(doc_id)
    return ids


def parse_cacm(folder: Path, cfg: DataConfig) -> SourceData:
    """CACM (SMART): 3 204 titles/abstracts, 64 queries, binary qrels ``qid docid 0 0`` for 52.

    A document is its title (.T) and abstract (.W; 1 587 have one); queries are their .W text.
    Qrels number queries with a leading zero ("01"): ids are read as integers, so "01" is query 1.
    """
    docs_path, qry_path, rel_path = folder / "cacm.all", folder / "query.text", folder / "qrels.text"
    records = read_smart(docs_path)
    repaired = []
    for rec, doc_id in zip(records, _cacm_doc_ids(docs_path, records), strict=True):
        if rec["I"] != doc_id:
            repaired.append(f"record {rec['I']!r} read as document {doc_id}")
        rec["I"] = doc_id
    corpus, titles = _documents(docs_path, records)
    queries = []
    for rec, number in zip(read_smart(qry_path), _smart_id_lines(qry_path), strict=True):
        query_id = _int(qry_path, number, rec["I"], "query id")
        queries.append({"query_id": str(query_id), "text": rec.get("W", "")})
    qrels = []
    for number, line in numbered_lines(rel_path):
        f = line.split()
        if len(f) != 4:
            raise DataError(f"{rel_path}: line {number}: {len(f)} fields; expected 'query_id doc_id 0 0'")
        query_id = _int(rel_path, number, f[0], "query id")
        doc_id = _int(rel_path, number, f[1], "doc id")
        qrels.append({"query_id": str(query_id), "doc_id": str(doc_id), "relevance": 1})  # binary
    collection = IRCollection(
        corpus=corpus,
        queries=conform_ir(pd.DataFrame(queries), "queries", str(qry_path)),
        qrels=conform_ir(pd.DataFrame(qrels), "qrels", str(rel_path)),
        titles=titles,
    )
    notes = {"ir/cacm/corpus": "; ".join(repaired) + " (split id in the file)"} if repaired else {}
    return SourceData(ir={"cacm": collection}, files=[docs_path, qry_path, rel_path], notes=notes)


# --------------------------------------------------------------------------- registry

Parser = Callable[[Path, DataConfig], SourceData]

# canonical source name -> (folder under data/raw, parser)
SOURCES: dict[str, tuple[str, Parser]] = {
    "stsb_en": ("stsb-en", parse_stsb_en),
    "sick": ("sick", parse_sick),
    "snli": ("snli", parse_snli),
    "cranfield": ("cranfield", parse_cranfield),
    "cisi": ("cisi", parse_cisi),
    "stsb_zh": ("stsb-zh", parse_stsb_zh),
    "ocnli": ("ocnli", parse_ocnli),
    "atec": ("atec", parse_atec),
    "trecqa": ("trecqa", parse_trecqa),
    "trecqa_train_all": ("trecqa-train-all", parse_trecqa_train_all),
    "wikiqa": ("wikiqa", parse_wikiqa),
    "selqa": ("selqa", parse_selqa),
    "rte": ("rte", parse_rte),
    "msrp": ("msrp", parse_msrp),
    "twitter_url": ("twitter-url", parse_twitter_url),
    "cacm": ("cacm", parse_cacm),
}

# Every dataset name a built-in source can produce (custom datasets may not reuse them).
BUILTIN_DATASETS: frozenset[str] = frozenset(
    {"stsb_en", "sick", "sick_r", "snli", "trecqa", "cranfield", "cisi", "cranfield_titles", "cisi_titles"}
    | {"stsb_zh", "ocnli", "atec"}
    | {"trecqa_train_all", "wikiqa", "selqa", "rte", "msrp", "twitter_url", "cacm", "cacm_titles"}
)


def parse_source(name: str, raw_dir: Path, cfg: DataConfig) -> SourceData:
    """Parse one built-in source from ``raw_dir/<folder>``."""
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; known: {sorted(SOURCES)}")
    folder_name, parser = SOURCES[name]
    folder = Path(raw_dir) / folder_name
    if not folder.is_dir():
        raise DataError(f"source {name!r}: folder {folder} not found (expected the raw {name} files there)")
    log.info("parsing %s from %s", name, folder)
    return parser(folder, cfg)
