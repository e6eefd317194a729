"""The table of what each stage depends on (d2llm.stages) against dvc.yaml and the cache keys.

dvc.yaml and params.yaml are read as they are, so a key added to either is checked too: a new
setting a stage reads must be declared in both the table and dvc.yaml, and every setting of
params.yaml is changed once to see which stage keys move.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from d2llm.config import Params, load_params, params_from_dict
from d2llm.errors import ConfigError
from d2llm.stages import STAGES, cache_key, param_value

ROOT = Path(__file__).resolve().parents[2]
CODE = "code-fingerprint"


def _dvc_stages() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _shipped_raw() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def _fingerprints(**changed: str) -> dict[str, str]:
    paths = {path for stage in STAGES.values() for path in stage.inputs}
    return {path: changed.get(path, f"fp-of-{path}") for path in paths}


def _keys(params: Params, fingerprints: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    fingerprints = fingerprints or _fingerprints()
    return {name: cache_key(name, params, fingerprints, CODE) for name in STAGES}


# --------------------------------------------------------------------------- dvc.yaml


def test_dvc_yaml_has_one_stage_per_table_row() -> None:
    assert set(_dvc_stages()) == {name for name, stage in STAGES.items() if stage.in_dvc}


@pytest.mark.parametrize("name", [name for name, stage in STAGES.items() if stage.in_dvc])
def test_dvc_stage_declares_exactly_the_params_and_deps_of_the_table(name: str) -> None:
    declared = _dvc_stages()[name]
    stage = STAGES[name]
    assert sorted(declared.get("params", [])) == sorted(stage.params)
    assert sorted(declared.get("deps", [])) == sorted(stage.dvc_deps)


def test_the_cli_and_the_flow_use_the_stage_names_of_the_table() -> None:
    from prefect import Task

    import flows.pipeline
    from d2llm.cli import build_parser

    for name in STAGES:  # each stage is a subcommand that runs with its defaults
        assert build_parser().parse_args([name]).command == name
    tasks = {value.name for value in vars(flows.pipeline).values() if isinstance(value, Task)}
    assert tasks == set(STAGES) | {"record-lineage"}  # lineage writes no artefact of its own


def test_every_key_and_path_of_the_table_exists() -> None:
    shipped = load_params(ROOT / "params.yaml")
    for stage in STAGES.values():
        for key in stage.params:
            param_value(shipped, key)  # AttributeError for a key the config does not have
        for path in stage.code:
            assert (ROOT / path).exists(), f"{stage.name}: code {path} does not exist"


# --------------------------------------------------------------------------- cache keys


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of every value of a config dump that is not a section (lists are values)."""
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out.extend(_leaves(value, dotted + ".") if isinstance(value, dict) else [dotted])
    return out


def _literal_choices(dotted: str) -> tuple[Any, ...]:
    """The allowed values of a Literal field (or of the items of a list of them)."""
    node: Any = Params
    annotation: Any = None
    for part in dotted.split("."):
        annotation = node.model_fields[part].annotation
        node = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    pending, choices = [annotation], []
    while pending:
        current = pending.pop()
        if get_origin(current) is Literal:
            choices.extend(get_args(current))
        else:
            pending.extend(get_args(current))
    return tuple(choices)


def _candidates(dotted: str, value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int | float):
        return [value + 1, value * 0.5, 0.5, value * 2, value - 1]  # - 1: a value at its upper bound
    if isinstance(value, list):
        return [value[:-1], [*value, *value[:1]], ["x"]]
    literals = [choice for choice in _literal_choices(dotted) if choice != value]
    if isinstance(value, str):
        return [*literals, value + "x"]
    return [*literals, 1, 16, 0.5, "x", ["x"]]  # None: the field's other type decides


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _with_changed(raw: dict[str, Any], dotted: str, before: Params) -> Params | None:
    """``raw`` with the value at ``dotted`` replaced by another valid one (None if none is found)."""
    for candidate in _candidates(dotted, param_value(before, dotted)):
        tree = copy.deepcopy(raw)
        _set(tree, dotted, candidate)
        try:
            after = params_from_dict(tree)
        except ConfigError:
            continue
        if param_value(after, dotted) != param_value(before, dotted):
            return after
    return None


def test_changing_each_setting_changes_exactly_the_keys_of_the_stages_that_read_it() -> None:
    raw = _shipped_raw()
    before = params_from_dict(raw)
    keys_before = _keys(before)
    changed_leaves, unchangeable = [], []
    for leaf in _leaves(before.model_dump(mode="json")):
        after = _with_changed(raw, leaf, before)
        if after is None:
            unchangeable.append(leaf)
            continue
        changed_leaves.append(leaf)
        moved = {name for name, key in _keys(after).items() if key != keys_before[name]}
        readers = {name for name, stage in STAGES.items() if stage.reads(leaf)}
        assert moved == readers, (
            f"changing {leaf}: keys of {sorted(moved)} changed, read by {sorted(readers)}"
        )

    # Only lists of structured entries (data.custom's dataset declarations) have no generic
    # "other value"; every other setting was changed.
    assert all(isinstance(param_value(before, leaf), list) for leaf in unchangeable), unchangeable
    # Every key the table lists was exercised by at least one change.
    for stage in STAGES.values():
        for key in stage.params:
            assert any(leaf == key or leaf.startswith(key + ".") for leaf in changed_leaves), key


@pytest.mark.parametrize(
    ("setting", "value", "stage"),
    [
        # Settings the hand-written keys left out before the table existed.
        ("student.backbone", "some/other-backbone", "mine"),
        ("seed", 7, "label"),
        ("teacher.temperature", 2.0, "train"),
        ("teacher.temperature", 2.0, "evaluate"),
        # int8 labels are other labels; the student's inference settings change its evaluation.
        ("labelling.quantization", "none", "label"),  # the preset labels with int8
        ("student.iem.inference_dtype", "bfloat16", "evaluate"),
        ("student.inference_quantization", "int8", "evaluate"),
    ],
)
def test_settings_once_missed_now_move_the_key(setting: str, value: Any, stage: str) -> None:
    raw = _shipped_raw()
    changed = copy.deepcopy(raw)
    _set(changed, setting, value)
    before, after = params_from_dict(raw), params_from_dict(changed)
    assert cache_key(stage, before, _fingerprints(), CODE) != cache_key(stage, after, _fingerprints(), CODE)


def test_an_unrelated_setting_moves_no_key() -> None:
    raw = _shipped_raw()
    changed = copy.deepcopy(raw)
    _set(changed, "promotion.tolerance", 3.0)
    assert _keys(params_from_dict(raw)) == _keys(params_from_dict(changed))


@pytest.mark.parametrize("path", sorted({path for stage in STAGES.values() for path in stage.inputs}))
def test_changing_an_input_changes_exactly_the_keys_of_the_stages_that_read_it(path: str) -> None:
    params = params_from_dict(_shipped_raw())
    before, after = _keys(params), _keys(params, _fingerprints(**{path: "new content"}))
    moved = {name for name in STAGES if before[name] != after[name]}
    assert moved == {name for name, stage in STAGES.items() if path in stage.inputs}


def test_a_key_needs_every_input_of_its_stage() -> None:
    params = params_from_dict(_shipped_raw())
    fingerprints = _fingerprints()
    del fingerprints["data/labels"]
    with pytest.raises(KeyError, match="data/labels"):
        cache_key("train", params, fingerprints, CODE)


def test_the_code_fingerprint_is_part_of_every_key() -> None:
    params = params_from_dict(_shipped_raw())
    for name in STAGES:
        assert cache_key(name, params, _fingerprints(), "a") != cache_key(name, params, _fingerprints(), "b")


# --------------------------------------------------------------------------- checkpoint


def test_the_training_checkpoint_fingerprint_covers_settings_labels_and_dev_data(tmp_path: Path) -> None:
    import numpy as np

    from d2llm.labelling import MANIFEST_FILE
    from d2llm.training import DevSet, training_inputs_fingerprint

    (tmp_path / MANIFEST_FILE).write_text('{"complete": true}', encoding="utf-8")
    params = params_from_dict(_shipped_raw())
    dev = [DevSet("toy", "sym", [("a", "b"), ("c", "d")], np.array([1.0, 0.0]), "ap", "nli")]
    base = training_inputs_fingerprint(params, tmp_path, dev)
    assert training_inputs_fingerprint(params, tmp_path, dev) == base

    other_dev = [DevSet("toy", "sym", [("a", "b"), ("c", "e")], dev[0].gold, "ap", "nli")]
    assert training_inputs_fingerprint(params, tmp_path, other_dev) != base
    one_more = [*dev, DevSet("toy2", "sym", [("e", "f"), ("g", "h")], dev[0].gold, "ap", "nli")]
    assert training_inputs_fingerprint(params, tmp_path, one_more) != base

    hotter = params.model_copy(update={"teacher": params.teacher.model_copy(update={"temperature": 2.0})})
    assert training_inputs_fingerprint(hotter, tmp_path, dev) != base

    # bf16 on one CPU, float32 on another: a checkpoint of one format is not resumed in the other
    assert training_inputs_fingerprint(params, tmp_path, dev, bf16=True) != base

    (tmp_path / MANIFEST_FILE).write_text('{"complete": false}', encoding="utf-8")
    assert training_inputs_fingerprint(params, tmp_path, dev) != base
