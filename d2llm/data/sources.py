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
TRECQA_LABELS: tuple[str, ...] = ("no", "yes")  # label = class id: 1 means "answers the question"


def ptb_untokenize(text: str) -> str:
    return _PTB_PATTERN.sub(lambda m: _PTB_TOKENS[m.group(0)], text)


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
            split = file_split
            if split == "train" and hash_fraction(normalize_text(question)) < cfg.trecqa_dev_fraction:
                split = "dev"
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


# --------------------------------------------------------------------------- IR sources


def _strip_title(title: str, body: str) -> str:
    """Cranfield bodies repeat the title; drop it so title->body pairs are not trivial."""
    if title and body.lower().startswith(title.lower()):
        return body[len(title) :].strip()
    return body


def _documents(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(corpus, titles) from a SMART document file; corpus text is title + body."""
    corpus, titles = [], []
    for rec in read_smart(path):
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
}

# Every dataset name a built-in source can produce (custom datasets may not reuse them).
BUILTIN_DATASETS: frozenset[str] = frozenset(
    {"stsb_en", "sick", "sick_r", "snli", "trecqa", "cranfield", "cisi", "cranfield_titles", "cisi_titles"}
    | {"stsb_zh", "ocnli", "atec"}
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
