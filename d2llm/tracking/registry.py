"""Log the student as a pyfunc model and register it, all or nothing.

Order matters: the model is logged (artifacts uploaded, the model card ``README.md`` next to
the pyfunc files), loaded back from the store and run on its input example, and only then
registered, its tags and description (the card's summary) in the same store transaction. A
failure before registration leaves no version; a failure of the registration leaves none either.
So no half-registered version can ever be given an alias by ``promote``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm import layout
from d2llm.config import Params
from d2llm.errors import ArtifactError
from d2llm.tracking.promotion import TAG_EVAL_DATA, Decision, metrics_to_tags
from d2llm.tracking.runs import stage_run

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from d2llm.tracking.model_card import ModelCard

log = logging.getLogger(__name__)

MODEL_NAME_IN_RUN = "student"
TAG_WITH_INDEX = "d2llm.with_index"


def _check_folder(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ArtifactError(f"{what} folder not found: {path}")
    if not any(path.iterdir()):
        raise ArtifactError(f"{what} folder is empty: {path}")


def log_student(
    student_dir: str | Path,
    index_dir: str | Path | None = None,
    registered_model_name: str = "d2llm-student",
    *,
    metrics: Mapping[str, float] | None = None,
    eval_data_id: str | None = None,
    version_tags: Mapping[str, str] | None = None,
    search_settings: Mapping[str, Any] | None = None,
    bundle_backbone: bool | None = None,
    card: ModelCard | None = None,
) -> ModelVersion:
    """Log ``student_dir`` (and ``index_dir``) as a pyfunc model and register a new version.

    ``metrics`` (flat, in points) are stored as ``metric.*`` version tags so that promotion can
    compare later challengers with this version; ``search_settings`` (mode, first_stage,
    rerank_depth, default_k) configure search requests of a model logged with an index.
    ``bundle_backbone`` (default: when the student's backbone is a local folder) ships the
    backbone inside the model, so the registered model does not depend on that folder.
    ``card`` (d2llm.tracking.model_card) is written as ``README.md`` into the model and its
    summary becomes the version's description; without one, a card saying that the training
    data and licences were not recorded is written instead.
    Needs ``configure`` to have been called. Returns the registered version.
    """
    import mlflow

    from d2llm import serving
    from d2llm.tracking.model_card import unrecorded_card

    card = card or unrecorded_card(registered_model_name)

    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
    student_dir = Path(student_dir)
    _check_folder(student_dir, "student")
    artifacts = {serving.STUDENT_ARTIFACT: str(student_dir.resolve())}
    if index_dir is not None:
        _check_folder(Path(index_dir), "index")
        artifacts[serving.INDEX_ARTIFACT] = str(Path(index_dir).resolve())
    backbone = _local_backbone(student_dir)
    if bundle_backbone is None:
        bundle_backbone = backbone is not None
    if bundle_backbone:
        if backbone is None:
            raise ArtifactError(f"cannot bundle the backbone of {student_dir}: it is not a local folder")
        artifacts[serving.BACKBONE_ARTIFACT] = str(backbone)

    with stage_run("register") as run, tempfile.TemporaryDirectory() as code_dir:
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(serving.write_model_code(code_dir)),
            artifacts=artifacts,
            signature=serving.model_signature(with_index=index_dir is not None),
            input_example=serving.input_example(),
            pip_requirements=serving.pip_requirements(),
            model_config=dict(search_settings or {}),
        )
        _attach_card(info.model_id, card.text, Path(code_dir))
        _smoke_test(info.model_uri)
        if metrics:
            from d2llm.tracking.runs import log_metrics_dict

            log_metrics_dict(metrics, prefix="eval")
        # The tags and the description travel with the registration: the version, its metrics and
        # its card summary are created in one store transaction, so a run killed at any point
        # leaves either no version or a whole one.
        tags = _version_tags(run.info.run_id, index_dir, metrics, eval_data_id, version_tags)
        version = _register(info, registered_model_name, run.info.run_id, tags, card.summary)
    return mlflow.MlflowClient().get_model_version(registered_model_name, version.version)


def _attach_card(model_id: str, text: str, folder: Path) -> None:
    """Upload the model card as ``README.md`` at the root of the logged model (next to MLmodel)."""
    import mlflow

    from d2llm.tracking.model_card import CARD_FILE

    card_dir = folder / "model_card"
    card_dir.mkdir()
    (card_dir / CARD_FILE).write_text(text, encoding="utf-8")
    mlflow.MlflowClient().log_model_artifact(model_id, str(card_dir / CARD_FILE))


def _register(info: Any, name: str, run_id: str, tags: dict[str, str], description: str) -> ModelVersion:
    """``mlflow.register_model`` of a logged model, with the description in the same transaction."""
    import json

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(
        name, info.model_uri, run_id=run_id, tags=tags, description=description, model_id=info.model_id
    )
    # The logged model's link to its versions (the UI's "registered versions"), as register_model sets it.
    try:
        linked = json.loads(client.get_logged_model(info.model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        entry = {"name": name, "version": version.version}
        client.set_logged_model_tags(info.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})
    except MlflowException as err:
        log.warning("could not link logged model %s to %s v%s: %s", info.model_id, name, version.version, err)
    return version


def _local_backbone(student_dir: Path) -> Path | None:
    """The student's backbone folder when its reference is a local folder (not package:/hub id)."""
    import json

    from d2llm import serving

    config_file = student_dir / serving.STUDENT_CONFIG_FILE
    if not config_file.is_file():
        raise ArtifactError(f"{student_dir} is not a student folder: {config_file.name} is missing")
    try:
        ref = json.loads(config_file.read_text(encoding="utf-8"))["student"]["backbone"]
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{config_file}: unreadable student config ({err})") from None
    if ref.startswith("package:"):
        return None
    path = Path(ref).expanduser()
    return path.resolve() if path.is_dir() else None


def _smoke_test(model_uri: str) -> None:
    """Load the model back from the store and score the input example: proves the upload is whole."""
    import mlflow

    from d2llm import serving

    try:
        scores = mlflow.pyfunc.load_model(model_uri).predict(serving.input_example())
    except Exception as err:
        raise ArtifactError(f"the logged model {model_uri} does not load or predict: {err}") from err
    if list(scores.columns) != ["score"] or len(scores) != len(serving.input_example()):
        raise ArtifactError(f"the logged model {model_uri} returned an unexpected frame: {scores!r}")


TAG_STUDENT_FINGERPRINT = "d2llm.student_fingerprint"  # content hash of the registered student folder


def newest_version(
    model_name: str, tag: str | None = None, value: str | None = None, client: MlflowClient | None = None
) -> str | None:
    """The newest version of ``model_name`` (with ``tag`` equal to ``value`` when given); None if none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    query = f"name = '{model_name}'" + (f" and tags.`{tag}` = '{value}'" if tag is not None else "")
    try:
        versions = (client or mlflow.MlflowClient()).search_model_versions(query)
    except MlflowException:
        return None  # no such registered model yet
    return str(max(int(v.version) for v in versions)) if versions else None


def _version_tags(
    run_id: str,
    index_dir: str | Path | None,
    metrics: Mapping[str, float] | None,
    eval_data_id: str | None,
    version_tags: Mapping[str, str] | None,
) -> dict[str, str]:
    tags = {TAG_WITH_INDEX: str(index_dir is not None).lower(), "d2llm.run_id": run_id}
    tags.update(metrics_to_tags(metrics or {}))
    if eval_data_id:
        tags[TAG_EVAL_DATA] = eval_data_id
    tags.update(version_tags or {})
    return {key: str(value) for key, value in tags.items()}


# --------------------------------------------------------------------------- CLI entry points


def read_flat_metrics(metrics_file: str | Path) -> tuple[dict[str, float], str | None]:
    """The ``flat`` student metrics (points) of an evaluation results JSON, and the id of the
    validation data they were measured on (``validation_data.id``; None in older reports)."""
    import json

    path = Path(metrics_file)
    if not path.is_file():
        raise ArtifactError(f"evaluation results not found: {path} (run `d2llm evaluate` first)")
    results = json.loads(path.read_text(encoding="utf-8"))
    flat = results.get("flat") if isinstance(results, dict) else None
    if not isinstance(flat, dict) or not flat:
        raise ArtifactError(f"{path} has no 'flat' student metrics to register")
    data_id = (results.get("validation_data") or {}).get("id")
    return {str(k): float(v) for k, v in flat.items() if v is not None}, data_id


def register_student(
    params: Params,
    student_dir: str | Path,
    index_dir: str | Path | None = None,
    metrics_file: str | Path | None = None,
    catalog: str | Path = layout.CATALOG,
    labels_dir: str | Path | None = None,
) -> ModelVersion:
    """``configure`` + ``log_student`` with the evaluation metrics (the student's validation
    metrics, ``flat``), the id of the exact validation pairs they were measured on and the model
    card (built from params, the results, the prepared manifest, the catalogue and the labels
    when ``labels_dir`` exists; a card that cannot be built registers nothing)."""
    from d2llm.tracking.model_card import model_card_from_files
    from d2llm.tracking.runs import configure

    configure(params.tracking)
    metrics, data_id = read_flat_metrics(metrics_file) if metrics_file is not None else (None, None)
    card = model_card_from_files(
        params,
        model_name=params.tracking.registered_model,
        results_file=metrics_file,
        catalog_path=catalog,
        labels_dir=labels_dir or layout.Layout.of(params).labels_dir,
    )
    search = params.search
    return log_student(
        student_dir,
        index_dir,
        params.tracking.registered_model,
        card=card,
        metrics=metrics,
        eval_data_id=data_id if metrics else None,
        search_settings={
            "mode": search.mode,
            "first_stage": search.first_stage,
            "rerank_depth": search.rerank_depth,
            "chunk_size": search.chunk_size,
            "aggregation": search.aggregation,
            "first_weight": search.first_weight,
            "lexical_weight": search.lexical_weight,
            "hnsw_ef_search": search.hnsw_ef_search,
            "ivf_nprobe": search.ivf_nprobe,
            "iem_dtype": params.student.iem.inference_dtype,
            "quantization": params.student.inference_quantization,
        },
    )


def promote_version(params: Params, version: str | int | None = None) -> tuple[str, Decision]:
    """Promote ``version`` (default: the newest) on the metrics stored on it; the champion is
    re-evaluated on the current validation data when its stored metrics come from other pairs."""
    import mlflow

    from d2llm.tracking.promotion import promote, stored_metrics
    from d2llm.tracking.runs import configure

    configure(params.tracking)
    client = mlflow.MlflowClient()
    name = params.tracking.registered_model
    if version is None:
        version = newest_version(name, client=client)
        if version is None:
            raise ArtifactError(f"no registered versions of {name!r}: run `d2llm register` first")
    version = str(version)
    metrics = stored_metrics(client, name, version)
    if not metrics:
        raise ArtifactError(f"{name} v{version} has no stored metrics: register it with --metrics")
    eval_data_id = client.get_model_version(name, version).tags.get(TAG_EVAL_DATA)
    decision = promote(
        client,
        name,
        version,
        metrics,
        params.promotion,
        eval_data_id=eval_data_id,
        reevaluate=lambda uri: validation_of_version(params, uri),
    )
    return version, decision


def validation_of_version(params: Params, model_uri: str) -> tuple[dict[str, float], str]:
    """A registered student's validation metrics on the current validation data, and that
    data's id: how a champion is compared with a challenger evaluated on other pairs."""
    import mlflow

    from d2llm.evaluation.evaluate import student_validation_metrics

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
        student_dir = next(p.parent for p in local.rglob("student.json"))
        return student_validation_metrics(params, params.data.prepared_dir, student_dir)
