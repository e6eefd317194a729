"""What each pipeline stage depends on: one table, read by the Prefect flow, the checkpoint and tests.

A stage's result is a function of the config values it reads, the artefacts it reads and its
code. ``STAGES`` lists them once per stage:

- ``params``: dotted ``params.yaml`` keys, a whole section (``"training"``) or one key
  (``"student.backbone"``); changing anything at or under a listed key reruns the stage;
- ``inputs``: artefacts whose content the stage reads (paths as in ``dvc.yaml``);
- ``gates``: artefacts the stage must wait for but does not read (the validation verdict);
- ``code``: the library modules that do the stage's work (files or packages).

``dvc.yaml`` declares each stage's ``params`` and ``deps`` (= inputs + gates + code) by hand, and
tests/unit/test_stages.py checks that they are exactly these. The Prefect flow builds its cache
keys with ``cache_key`` (flows/pipeline.py), and the training checkpoint records
``param_values("train", ...)`` (d2llm/training.py), so neither can leave a setting out.

To add a config key a stage reads: add it to that stage's ``params`` here and in ``dvc.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_jsonable_python

from d2llm.config import Params

RAW = "data/raw"
CATALOG = "data/raw/catalog.yaml"
PREPARED = "data/prepared"
VALIDATED = "reports/validation/validation_results.json"
NEGATIVES = "data/negatives"
TEACHER = "models/teacher"
LABELS = "data/labels"
STUDENT = "models/student"
METRICS = "reports/metrics.json"

# What the backbone of the student reads when it is used as a plain bi-encoder (baseline rows).
_BACKBONE_AS_BIENCODER = (
    "student.backbone",
    "student.gguf_file",
    "student.max_length",
    "student.trust_remote_code",
)
# How a trained student runs at inference (the merged student of d2llm.student.model).
_STUDENT_INFERENCE = ("student.iem.inference_dtype", "student.inference_quantization")

# The labelling settings that decide the labels' content (the engine and its precision included).
_LABELS_CONTENT = (
    "labelling.group_size",
    "labelling.shard_groups",
    "labelling.max_groups_per_dataset",
    "labelling.datasets",
    "labelling.min_teacher_gain",
    "labelling.engine",
    "labelling.vllm",
    "labelling.quantization",
)


@dataclass(frozen=True)
class Stage:
    """One pipeline step: its name (the CLI subcommand, DVC stage and Prefect task) and what it reads."""

    name: str
    params: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    gates: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    in_dvc: bool = True  # register is a flow/CLI step only

    @property
    def dvc_deps(self) -> tuple[str, ...]:
        return (*self.inputs, *self.gates, *self.code)

    def reads(self, key: str) -> bool:
        """Whether changing ``key`` (dotted) can change this stage's result."""
        return any(_covers(listed, key) or _covers(key, listed) for listed in self.params)


def _covers(outer: str, inner: str) -> bool:
    """``outer`` is ``inner`` or one of its sections (``student`` covers ``student.lora.r``)."""
    return inner == outer or inner.startswith(outer + ".")


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        # Materialises data/raw/<folder>/ from the catalogue (it reads no other data setting).
        Stage(
            "fetch-data",
            params=("data.sources",),
            inputs=(CATALOG,),
            code=("d2llm/data/fetch.py", "d2llm/data/catalog.py"),
        ),
        Stage("prepare", params=("data",), inputs=(RAW,), code=("d2llm/data",)),
        Stage("validate", params=("validation",), inputs=(PREPARED,), code=("d2llm/data",)),
        Stage(
            "mine",
            # The bi-encoder miner encodes with the student's backbone.
            params=("mining", "labelling.datasets", "student.backbone", "student.gguf_file"),
            inputs=(PREPARED,),
            gates=(VALIDATED,),
            code=("d2llm/mining.py", "d2llm/biencoder.py", "d2llm/data/tables.py"),
        ),
        Stage(
            "teacher-finetune",
            # Its report compares the teacher with the student's backbone read as a bi-encoder.
            params=("teacher", "seed", "selection", *_BACKBONE_AS_BIENCODER),
            inputs=(PREPARED,),
            gates=(VALIDATED,),
            code=(
                "d2llm/teachers",
                "d2llm/biencoder.py",
                "d2llm/evaluation/dev.py",
                "d2llm/data/tables.py",
                "d2llm/optim.py",
                "d2llm/checkpoint.py",
            ),
        ),
        Stage(
            "label",
            # teacher.fusion mixes in the student's backbone read as a bi-encoder. Where the shards
            # are scored (labelling.executor, .ray, .job) does not change them, so it is not listed.
            params=(*_LABELS_CONTENT, "teacher", "seed", *_BACKBONE_AS_BIENCODER),
            inputs=(NEGATIVES, TEACHER),
            code=("d2llm/labelling", "d2llm/teachers", "d2llm/biencoder.py", "d2llm/quantization.py"),
        ),
        Stage(
            "train",
            params=("student", "loss", "training", "seed", "selection", "teacher.temperature"),
            inputs=(LABELS, PREPARED),  # prepared: the dev split for early stopping
            code=(
                "d2llm/training.py",
                "d2llm/checkpoint.py",
                "d2llm/losses.py",
                "d2llm/student",
                "d2llm/evaluation/dev.py",
                "d2llm/data/tables.py",  # the groups' families (student.iem.branches)
                "d2llm/optim.py",
                "d2llm/distributed.py",
            ),
        ),
        Stage(
            "evaluate",
            # The bi-encoder baseline row is the student's backbone, mean-pooled; the teacher row
            # turns logits into scores at teacher.temperature.
            params=(
                "evaluation",
                "seed",
                "selection",
                "search",  # IR rows run the shipped search: passages, aggregation, first stage, depth
                "teacher.temperature",
                "teacher.fusion",
                *_BACKBONE_AS_BIENCODER,
                *_STUDENT_INFERENCE,
            ),
            inputs=(PREPARED, TEACHER, STUDENT),
            code=(
                "d2llm/evaluation",
                "d2llm/data/tables.py",
                "d2llm/search.py",
                "d2llm/passages.py",
                "d2llm/ann.py",
                "d2llm/biencoder.py",  # pair_cosines: the bi-encoder and fusion scores
                "d2llm/teachers",  # the teacher rows: its kinds, its fusion weights (dev report)
                "d2llm/quantization.py",
            ),
        ),
        Stage(
            "register",
            params=("tracking", *_STUDENT_INFERENCE),  # logged with the model for serving
            inputs=(STUDENT, METRICS),
            code=("d2llm/tracking", "d2llm/serving.py"),
            in_dvc=False,
        ),
    )
}


def param_value(params: Params, key: str) -> Any:
    """The JSON form of one dotted config key (a section gives a dict)."""
    node: Any = params
    for part in key.split("."):
        node = getattr(node, part)
    return to_jsonable_python(node)


def param_values(stage: str, params: Params) -> dict[str, Any]:
    """Every config value ``stage`` reads, keyed by the dotted names of the table."""
    return {key: param_value(params, key) for key in STAGES[stage].params}


def cache_key(stage: str, params: Params, fingerprints: Mapping[str, str], code: str) -> dict[str, Any]:
    """The content a stage's cached result is keyed on: its config values, inputs and code.

    ``fingerprints`` maps artefact paths (as in the table) to content fingerprints; it must hold
    every input of the stage (other entries are ignored). ``code`` fingerprints the library.
    """
    spec = STAGES[stage]
    missing = [path for path in spec.inputs if path not in fingerprints]
    if missing:
        raise KeyError(f"stage {stage!r}: no fingerprint for input(s) {missing}")
    return {
        "stage": stage,
        "params": param_values(stage, params),
        "inputs": {path: fingerprints[path] for path in spec.inputs},
        "code": code,
    }
