"""Indexing a user's document file: passages for long documents, best-passage search, the CLI.

The student is a real ``D2LLMStudent`` on the tiny BERT of ``conftest.py`` with a cosine-residual
IEM (zero output layer), so before training its IEM logit is ``scale * cos(e_q, e_b)``: a query
equal to a passage's text ranks that passage first, and a random backbone is good enough to
check what the index contains.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from tiny_models import cosine_student, cosine_student_cfg

from d2llm.config import SearchConfig, params_from_dict
from d2llm.errors import ConfigError, DataError
from d2llm.passages import split_passages
from d2llm.search import build_index, load_index, read_corpus_file, search

torch.set_num_threads(1)

MAX_LENGTH = 16  # tokens per student input, [CLS] and [SEP] included
FILLER = "a man plays a guitar in the park and a woman sings on the street with the children"
TAIL_FACT = "the old horse sleeps in the kitchen"
LONG_DOC = " ".join([FILLER] * 4) + " . " + TAIL_FACT
SHORT_DOCS = {
    "dogs": "two dogs play with a ball on the grass",
    "cat": "a cat sits on the mat",
    "bike": "a child rides a red bike",
}


def _student_cfg(tiny_bert_dir) -> dict:
    return cosine_student_cfg(tiny_bert_dir, MAX_LENGTH)


@pytest.fixture(scope="module")
def student(tiny_bert_dir):
    return cosine_student(tiny_bert_dir, MAX_LENGTH)


def _mapped_from(tensor: torch.Tensor, path) -> bool:
    """Whether the tensor's memory lies in a mapping of ``path`` (Linux: /proc/self/maps)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(path.resolve()):
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= address < high:
                    return True
    return False


def _write_jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("kind", ["wordpiece", "byte_bpe"])
def test_split_passages_covers_every_word_within_the_window(student, tiny_qwen2_dir, kind):
    from transformers import AutoTokenizer

    tokenizer = student.tokenizer if kind == "wordpiece" else AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    texts = [LONG_DOC, SHORT_DOCS["cat"]]
    spans = split_passages(texts, tokenizer, window=10, stride=6)
    passages = [spans.text(texts, i) for i in range(len(spans))]
    # The short document is one passage: its whole text.
    assert spans.doc.tolist().count(1) == 1 and passages[-1] == SHORT_DOCS["cat"]
    long_passages = [p for p, d in zip(passages, spans.doc, strict=True) if d == 0]
    assert len(long_passages) > 1
    for p in long_passages:
        assert len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= 10, p
    # Every character of the document is in some passage; consecutive passages overlap.
    covered = np.zeros(len(LONG_DOC), dtype=bool)
    for i in np.flatnonzero(spans.doc == 0):
        covered[spans.start[i] : spans.end[i]] = True
    assert covered[[i for i, c in enumerate(LONG_DOC) if not c.isspace()]].all()
    starts, ends = spans.start[spans.doc == 0], spans.end[spans.doc == 0]
    assert (starts[1:] < ends[:-1]).all() and (np.diff(starts) > 0).all()
    assert long_passages[-1].endswith(TAIL_FACT)

    with pytest.raises(ConfigError, match="passage_stride"):
        split_passages(texts, tokenizer, window=10, stride=11)


def test_window_larger_than_the_student_input_is_refused(student, tmp_path):
    corpus = pd.DataFrame({"doc_id": ["x"], "text": [LONG_DOC]})
    with pytest.raises(ConfigError, match="passages would be truncated"):
        build_index(student, corpus, tmp_path / "i", "v", search_cfg=SearchConfig(passage_window=MAX_LENGTH))


def test_long_document_tail_is_found_through_the_cli(student, tiny_bert_dir, tmp_path, capsys):
    """``d2llm index --corpus file.jsonl`` then ``d2llm search`` finds a fact only in a long doc's tail."""
    from d2llm.cli import main

    tokenizer = student.tokenizer
    head = LONG_DOC[: LONG_DOC.index(TAIL_FACT)]
    # Indexed as one text, the student would see only its first MAX_LENGTH tokens: never the fact.
    assert len(tokenizer(head)["input_ids"]) > 3 * MAX_LENGTH

    rows = [{"key": "long", "body": LONG_DOC, "extra": 1}]
    rows += [{"key": k, "body": v, "extra": 0} for k, v in SHORT_DOCS.items()]
    corpus_file = tmp_path / "my_docs.jsonl"
    _write_jsonl(corpus_file, rows)
    params = params_from_dict(
        {"device": "cpu", "student": _student_cfg(tiny_bert_dir), "search": {"encode_chunk": 3}}
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    student.save_pretrained(tmp_path / "student")
    common = ["--params", str(params_file)]
    index_dir = tmp_path / "index"
    index_args = ["index", "--corpus", str(corpus_file), "--id-column", "key", "--text-column", "body"]
    index_args += ["--student-dir", str(tmp_path / "student"), "--out-dir", str(index_dir)]
    assert main(common + index_args) == 0
    out = capsys.readouterr().out
    index = load_index(index_dir, student)
    assert index.n_passages > len(rows)  # the long document became several passages
    assert f"indexed {len(rows)} documents of {corpus_file} as {index.n_passages} passages" in out
    assert index.manifest["passages"] == {"window": MAX_LENGTH - 2, "stride": (MAX_LENGTH - 2) * 3 // 4}

    for mode in ("full", "two_stage"):
        search_args = ["search", TAIL_FACT, "-k", "2", "--mode", mode, "--rerank-depth", "20"]
        search_args += ["--index-dir", str(index_dir), "--student-dir", str(tmp_path / "student")]
        assert main(common + search_args) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 2 and lines[0].split()[2] == "long", lines
        assert TAIL_FACT in lines[0]

    # The document's score is its best passage's: brute force over its passages agrees.
    hits = search(student, index, TAIL_FACT, k=len(rows), mode="full")
    assert hits[0].doc_id == "long" and len({h.doc_id for h in hits}) == len(rows)
    best = hits[0]
    passages = [index.passage_text(i) for i in np.flatnonzero(index.spans.doc == 0)]
    brute = student.score([(TAIL_FACT, p) for p in passages], "asym")
    assert best.score == pytest.approx(float(brute.max()), abs=1e-4)
    assert best.text == passages[int(brute.argmax())] and best.passage == int(brute.argmax())
    assert TAIL_FACT in best.text


@pytest.mark.parametrize("first_stage", ["bm25", "cosine"])
def test_two_stage_counts_documents_and_reads_each_kept_document_whole(student, tmp_path, first_stage):
    """``rerank_depth`` counts documents, not passages: with M = the number of documents two-stage
    search is full search, though the long document alone has more passages than M; and a kept
    document scores by the best of all its passages, not only those the first stage ranked high."""
    docs = {"long": LONG_DOC, **SHORT_DOCS}
    frame = pd.DataFrame({"doc_id": list(docs), "text": list(docs.values())})
    index = build_index(student, frame, tmp_path / "index", "v1", batch_size=4)
    n_long = int((index.spans.doc == 0).sum())
    assert n_long > len(docs)  # M passages could not even cover the long document
    for query in (TAIL_FACT, "a man plays a guitar", "a cat on the mat"):
        full = search(student, index, query, k=len(docs), mode="full")
        two = search(student, index, query, k=len(docs), mode="two_stage", first_stage=first_stage,
                     rerank_depth=len(docs))  # fmt: skip
        assert [(h.doc_id, h.passage) for h in two] == [(h.doc_id, h.passage) for h in full]
        np.testing.assert_allclose([h.score for h in two], [h.score for h in full], rtol=1e-5, atol=1e-6)
        one = search(student, index, query, k=1, mode="two_stage", first_stage=first_stage, rerank_depth=1)
        kept = next(h for h in full if h.doc_id == one[0].doc_id)  # its whole-document score
        assert len(one) == 1 and (one[0].passage, one[0].score) == (kept.passage, pytest.approx(kept.score))


def test_index_streams_to_memory_mapped_files(student, tmp_path):
    """Encoding in chunks gives the vectors of encoding all passages at once, memory-mapped on load."""
    texts = [LONG_DOC, *SHORT_DOCS.values()]
    corpus = pd.DataFrame({"doc_id": ["long", *SHORT_DOCS], "text": texts})
    built = build_index(
        student, corpus, tmp_path / "index", "v1", batch_size=2, search_cfg=SearchConfig(encode_chunk=2)
    )
    passages = [built.passage_text(i) for i in range(built.n_passages)]
    expected = student.encode(passages)
    torch.testing.assert_close(built.vectors, expected, rtol=1e-5, atol=1e-5)
    loaded = load_index(tmp_path / "index", student)
    assert _mapped_from(loaded.vectors, tmp_path / "index" / "vectors.npy")
    assert _mapped_from(loaded.passage_cache, tmp_path / "index" / "passage_cache.npy")
    assert not _mapped_from(expected, tmp_path / "index" / "vectors.npy")  # the check can fail
    torch.testing.assert_close(loaded.passage_cache, student.passage_cache(expected), rtol=1e-5, atol=1e-5)
    assert isinstance(loaded.bm25_index.retriever.scores["data"], np.memmap)  # BM25 mapped, not read
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "bm25",
        "build.json",
        "corpus.parquet",
        "manifest.json",
        "passage_cache.npy",
        "passages.parquet",
        "vectors.npy",
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "body": "x"}], r"missing column\(s\) \['text'\]"),
        (
            [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}],
            "data row 2: id 'a' .* repeats an earlier row",
        ),
        (
            [{"id": "a", "text": "x"}, {"id": "b", "text": "  "}],
            r"data row 2 \(id 'b'\): column 'text' has no text",
        ),
        ([{"id": "", "text": "x"}], "data row 1: column 'id' is empty"),
    ],
)
def test_bad_corpus_files_are_clear_errors(tmp_path, rows, message):
    path = tmp_path / "docs.jsonl"
    _write_jsonl(path, rows)
    with pytest.raises(DataError, match=message) as err:
        read_corpus_file(path, id_column="id")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl"])
def test_corpus_file_formats(tmp_path, suffix):
    frame = pd.DataFrame({"pid": ["1", "2"], "content": ["a cat", "a dog, running"]})
    path = tmp_path / f"docs{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".jsonl":
        _write_jsonl(path, frame.to_dict("records"))
    else:
        frame.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    table = read_corpus_file(path, "pid", "content")
    assert table.to_dict("list") == {"doc_id": ["1", "2"], "text": ["a cat", "a dog, running"]}
