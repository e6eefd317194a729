"""A stopped ``d2llm index`` goes on where it stopped, and only for the inputs it was encoding.

The student is a real ``D2LLMStudent`` on the tiny BERT of ``conftest.py`` (as in
test_index_files.py); ``encode`` is wrapped to record the passages it reads and to stop the
build part-way, as a crash or Ctrl-C would.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from tiny_models import cosine_student, cosine_student_cfg

from d2llm.config import SearchConfig, params_from_dict
from d2llm.errors import ArtifactError
from d2llm.search import BUILD_FILE, build_index, load_index, search

torch.set_num_threads(1)

MAX_LENGTH = 16
FILLER = "a man plays a guitar in the park and a woman sings on the street with the children"
DOCS = {
    "long": " ".join([FILLER] * 3) + " . the old horse sleeps in the kitchen",
    "dogs": "two dogs play with a ball on the grass",
    "cat": "a cat sits on the mat",
    "bike": "a child rides a red bike",
}
CHUNK = 2  # passages per encoding step: the build records its progress after each


def _student_cfg(tiny_bert_dir) -> dict:
    return cosine_student_cfg(tiny_bert_dir, MAX_LENGTH)


@pytest.fixture(scope="module")
def student(tiny_bert_dir):
    return cosine_student(tiny_bert_dir, MAX_LENGTH)


class Stopped(Exception):
    """Raised by the wrapped ``encode`` in place of a crash."""


def _watch_encode(monkeypatch, target, stop_after: int | None = None) -> list[str]:
    """Wrap ``target.encode`` (an instance or the class): returns the list of passages it
    encodes; the call after ``stop_after`` calls raises ``Stopped``."""
    seen: list[str] = []
    calls = [0]
    real = target.encode

    def encode(*args, **kwargs):
        texts = args[-1] if isinstance(args[-1], list) else kwargs["texts"]
        if stop_after is not None and calls[0] == stop_after:
            raise Stopped
        calls[0] += 1
        seen.extend(texts)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, "encode", encode)
    return seen


def _corpus(docs: dict[str, str] = DOCS) -> pd.DataFrame:
    return pd.DataFrame({"doc_id": list(docs), "text": list(docs.values())})


def _build(student, out_dir, corpus=None, **kwargs):
    cfg = kwargs.pop("search_cfg", SearchConfig(encode_chunk=CHUNK))
    corpus = _corpus() if corpus is None else corpus
    return build_index(student, corpus, out_dir, "v1", batch_size=2, search_cfg=cfg, **kwargs)


def _stop_after_two_chunks(monkeypatch, student, out_dir) -> None:
    with monkeypatch.context() as patch:
        _watch_encode(patch, student, stop_after=2)
        with pytest.raises(Stopped):
            _build(student, out_dir)
    assert json.loads((out_dir / BUILD_FILE).read_text())["encoded"] == 2 * CHUNK


def test_a_stopped_build_goes_on_from_its_last_chunk(student, tmp_path, monkeypatch, caplog):
    clean = _build(student, tmp_path / "clean")
    passages = [clean.passage_text(i) for i in range(clean.n_passages)]
    assert len(passages) > 3 * CHUNK  # the stop below leaves work to do

    out = tmp_path / "index"
    _stop_after_two_chunks(monkeypatch, student, out)
    with pytest.raises(ArtifactError, match="incomplete"):
        load_index(out, student)  # a stopped build is no index

    seen = _watch_encode(monkeypatch, student)
    with caplog.at_level(logging.INFO, logger="d2llm.search"):
        resumed = _build(student, out)
    assert seen == passages[2 * CHUNK :]  # the first two chunks were not encoded again
    assert f"resuming, {2 * CHUNK} of {len(passages)} passages already encoded" in caplog.text
    # Same chunks, same inputs: the resumed index is the uninterrupted one, bit for bit.
    np.testing.assert_array_equal(resumed.vectors.numpy(), clean.vectors.numpy())
    np.testing.assert_array_equal(resumed.passage_cache.numpy(), clean.passage_cache.numpy())
    loaded = load_index(out, student)
    for query in ("the old horse sleeps", "a cat on the mat"):
        assert search(student, loaded, query, k=4) == search(student, clean, query, k=4)

    seen.clear()
    again = _build(student, out)  # a finished build of the same inputs encodes nothing
    assert seen == [] and again.n_passages == len(passages)
    np.testing.assert_array_equal(again.vectors.numpy(), clean.vectors.numpy())


@pytest.mark.parametrize(
    "change",
    ["corpus", "passage scheme", "student", "no resume", "vectors file lost"],
)
def test_a_build_of_other_inputs_encodes_everything(student, tmp_path, monkeypatch, change):
    """The record resumes only the build it describes: any other input starts at passage 0."""
    out = tmp_path / "index"
    _stop_after_two_chunks(monkeypatch, student, out)
    corpus, kwargs, who = _corpus(), {}, student
    if change == "corpus":
        corpus = _corpus({**DOCS, "cat": "a cat sits on the warm mat"})
    elif change == "passage scheme":
        kwargs["search_cfg"] = SearchConfig(encode_chunk=CHUNK, passage_stride=5)
    elif change == "student":
        who = _other_student(student)
    elif change == "no resume":
        kwargs["resume"] = False
    else:
        (out / "vectors.npy").unlink()
    seen = _watch_encode(monkeypatch, who)
    index = _build(who, out, corpus, **kwargs)
    assert len(seen) == index.n_passages
    expected = _build(who, tmp_path / "clean", corpus, **kwargs)
    np.testing.assert_array_equal(index.vectors.numpy(), expected.vectors.numpy())


def _other_student(student):
    """The same student with one IEM weight changed: another fingerprint, same encoder."""
    import copy

    other = copy.deepcopy(student)
    with torch.no_grad():
        next(other.iem.parameters()).add_(0.5)
    return other


def test_cli_index_resumes_unless_told_not_to(student, tiny_bert_dir, tmp_path, monkeypatch, capsys):
    """`d2llm index` run again on the same inputs encodes nothing; `--no-resume` encodes all."""
    from d2llm.cli import main
    from d2llm.student.model import D2LLMStudent

    corpus_file = tmp_path / "docs.jsonl"
    corpus_file.write_text("".join(json.dumps({"doc_id": k, "text": v}) + "\n" for k, v in DOCS.items()))
    params = params_from_dict(
        {"device": "cpu", "student": _student_cfg(tiny_bert_dir), "search": {"encode_chunk": CHUNK}}
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    student.save_pretrained(tmp_path / "student")
    args = ["--params", str(params_file), "index", "--corpus", str(corpus_file)]
    args += ["--student-dir", str(tmp_path / "student"), "--out-dir", str(tmp_path / "index")]

    seen = _watch_encode(monkeypatch, D2LLMStudent)
    assert main(args) == 0
    n = load_index(tmp_path / "index", student).n_passages
    assert len(seen) == n
    seen.clear()
    assert main(args) == 0
    assert seen == []
    assert main([*args, "--no-resume"]) == 0
    assert len(seen) == n
    assert f"as {n} passages" in capsys.readouterr().out


# A second process that locks the folder argv[1] as a build does, says so, and holds it.
HOLDER = """
import sys, time
from d2llm.lock import folder_lock
with folder_lock(sys.argv[1], "busy"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_build_into_the_same_folder_refuses_and_touches_nothing(student, tmp_path, monkeypatch):
    """Two builds into one folder would write the same vector files (and, since builds resume,
    each would take the other's chunks for its own): the second refuses while the first runs."""
    import subprocess
    import sys
    from pathlib import Path

    from d2llm.errors import PipelineLockedError

    out = tmp_path / "index"
    _stop_after_two_chunks(monkeypatch, student, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    root = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, cwd=root
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        seen = _watch_encode(monkeypatch, student)
        with pytest.raises(PipelineLockedError, match="another process is building an index in"):
            _build(student, out)
        assert seen == [] and {p.name: p.read_bytes() for p in out.iterdir()} == before
    finally:
        holder.kill()
        holder.wait(timeout=30)
    _build(student, out)  # the holder gone, the build goes on
    assert len(seen) == load_index(out, student).n_passages - 2 * CHUNK
