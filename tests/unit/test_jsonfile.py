"""Reports and manifests are replaced whole or not at all."""

from __future__ import annotations

import json

import pytest

from d2llm.jsonfile import write_json


def test_write_json_creates_the_folder_and_ends_in_a_newline(tmp_path):
    path = write_json(tmp_path / "reports" / "metrics.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"a": [1, 2], "b": 1} and text.endswith("}\n")
    assert text.index('"a"') < text.index('"b"')
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path):
    path = write_json(tmp_path / "metrics.json", {"run": 1})
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(path, {"run": 2, "model": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == {"run": 1}
    assert list(tmp_path.iterdir()) == [path]
    assert json.loads(write_json(path, {"model": object()}, default=lambda _: "?").read_text()) == {
        "model": "?"
    }
