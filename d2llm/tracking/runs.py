"""MLflow experiment tracking: where runs go, the pipeline's parent run, nested stage runs.

Layout: one experiment (``tracking.experiment``) in a sqlite store (``mlflow/mlflow.db``) whose
artifacts live under ``tracking.artifact_dir``. A pipeline run is a parent run tagged with what
makes it reproducible (git commit, DVC data hashes, the flattened params); each stage is a nested
run under it. Stages run as separate processes (DVC) find their parent through an environment
variable that ``pipeline_run`` sets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm.config import Params, TrackingConfig
from d2llm.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    import mlflow
    import pandas as pd
    from matplotlib.figure import Figure

    from d2llm.lineage import Lineage

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "D2LLM_MLFLOW_PARENT_RUN_ID"
TAG_STAGE = "d2llm.stage"
TAG_PIPELINE = "d2llm.pipeline"
_SQLITE_PREFIX = "sqlite:///"
# MLflow accepts word characters and "/ . - : space" in metric and param names; "@" (ndcg@10) is not.
_INVALID_KEY_CHARS = re.compile(r"[^\w/.\- :]")


# --------------------------------------------------------------------------- configuration


def resolve_tracking_uri(uri: str, root: Path | None = None) -> str:
    """Make a relative sqlite or file URI absolute against ``root`` (default: cwd).

    ``sqlite:///mlflow/mlflow.db`` is relative (three slashes, then a relative path); left as is
    it would point at a different store from every directory a stage runs in.
    """
    root = (root or Path.cwd()).resolve()
    if uri.startswith(_SQLITE_PREFIX):
        path = Path(uri.removeprefix(_SQLITE_PREFIX))
        if not path.is_absolute():
            path = root / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"{_SQLITE_PREFIX}{path}"
    if "://" not in uri:  # a plain folder: a file store
        path = Path(uri) if Path(uri).is_absolute() else root / uri
        return path.resolve().as_uri()
    return uri


def configure(cfg: TrackingConfig, root: Path | None = None) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id.

    The experiment is created with an explicit artifact location: with a sqlite store and none,
    MLflow writes artifacts to ``./mlruns`` of whatever directory the process happens to run in.
    """
    import mlflow

    root = (root or Path.cwd()).resolve()
    uri = resolve_tracking_uri(cfg.tracking_uri, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    artifact_dir = cfg.artifact_dir if cfg.artifact_dir.is_absolute() else root / cfg.artifact_dir
    artifact_dir.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(cfg.experiment, artifact_location=artifact_dir.as_uri())
    else:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment {cfg.experiment!r} is deleted; restore it (mlflow experiments restore) "
                "or choose another tracking.experiment"
            )
        if experiment.artifact_location != artifact_dir.as_uri():
            log.warning(
                "experiment %r keeps its artifact location %s (tracking.artifact_dir is %s)",
                cfg.experiment,
                experiment.artifact_location,
                artifact_dir,
            )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# --------------------------------------------------------------------------- provenance


def git_commit(root: Path | None = None) -> tuple[str, bool] | None:
    """(commit sha, working tree dirty) or None outside a git repository."""
    cwd = str(root or Path.cwd())
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sha, bool(status.strip())


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings to one level of dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def metric_key(name: str) -> str:
    """A metric/param name MLflow accepts: other characters become ``_`` (``ndcg@10 -> ndcg_10``)."""
    return _INVALID_KEY_CHARS.sub("_", name)


# --------------------------------------------------------------------------- runs


@contextmanager
def pipeline_run(
    params: Params, run_name: str, root: Path | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """The parent run of one pipeline execution, tagged with git commit and params.

    DVC hashes are tagged at the end, by ``tag_lineage``, once the run has written (and
    committed) its own artefacts: the ``dvc.lock`` of the checkout describes another run's.

    Stage processes started inside it (e.g. by ``dvc repro``) nest under it through the
    ``D2LLM_MLFLOW_PARENT_RUN_ID`` environment variable.
    """
    import mlflow

    root = (root or Path.cwd()).resolve()
    configure(params.tracking, root)
    run_tags: dict[str, str] = {TAG_PIPELINE: "true", **(tags or {})}
    commit = git_commit(root)
    if commit:
        run_tags["mlflow.source.git.commit"] = commit[0]
        run_tags["git.commit"] = commit[0]
        run_tags["git.dirty"] = str(commit[1]).lower()

    previous = os.environ.get(PARENT_RUN_ENV)
    with mlflow.start_run(run_name=run_name, tags=run_tags) as run:
        flat = flatten(params.model_dump(mode="json"))
        mlflow.log_params({metric_key(k): _param_value(v) for k, v in flat.items()})
        mlflow.log_dict(params.model_dump(mode="json"), "params.json")
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        try:
            yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous


def tag_lineage(run_id: str, lineage: Lineage) -> None:
    """Tag a pipeline run with the DVC hashes of what it wrote (``dvc.<stage>:<deps|outs>:<path>``),
    or with why there are none (``dvc.lineage``)."""
    import mlflow

    client = mlflow.MlflowClient()
    if lineage.skipped is not None:
        client.set_tag(run_id, "dvc.lineage", f"not recorded: {lineage.skipped}")
        return
    client.set_tag(run_id, "dvc.lineage", "committed")
    for key, digest in lineage.hashes.items():
        client.set_tag(run_id, f"dvc.{metric_key(key)}", digest)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's param value limit


@contextmanager
def stage_run(name: str, tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run for one pipeline stage, nested under the active run or the parent named in the env.

    Without either it is a top-level run (a stage run by hand still gets tracked).
    """
    import mlflow

    run_tags = {TAG_STAGE: name, **(tags or {})}
    if mlflow.active_run() is not None:
        context = mlflow.start_run(run_name=name, nested=True, tags=run_tags)
    elif os.environ.get(PARENT_RUN_ENV):
        context = mlflow.start_run(run_name=name, parent_run_id=os.environ[PARENT_RUN_ENV], tags=run_tags)
    else:
        context = mlflow.start_run(run_name=name, tags=run_tags)
    with context as run:
        yield run


# --------------------------------------------------------------------------- logging helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def log_metrics_dict(
    metrics: Mapping[str, Any], prefix: str = "", step: int | None = None
) -> dict[str, float]:
    """Log a (nested) metrics mapping as ``a/b/c`` metrics; returns what was logged.

    Non-numeric leaves (names, notes) and non-finite values are skipped: MLflow would reject
    them, and a NaN in a report should not abort the run that produced it.
    """
    import mlflow

    flat = flatten(metrics, prefix, sep="/")
    logged = {metric_key(k): float(v) for k, v in flat.items() if _is_number(v)}
    if logged:
        mlflow.log_metrics(logged, step=step)
    return logged


def _history_records(history: Sequence[Mapping[str, Any]] | pd.DataFrame) -> list[Mapping[str, Any]]:
    if hasattr(history, "to_dict"):
        return history.to_dict(orient="records")  # type: ignore[union-attr]
    return list(history)


def log_training_curve(
    history: Sequence[Mapping[str, Any]] | pd.DataFrame, prefix: str = "train", batch_size: int = 1000
) -> int:
    """Log per-step metrics (``step=``) from records like ``{"step": 10, "loss": 0.4, "ci": ...}``.

    Returns the number of metric points logged. Written with ``log_batch`` in chunks: one call
    per point would take minutes for a long run on a sqlite store.
    """
    import mlflow
    from mlflow.entities import Metric

    run = mlflow.active_run()
    if run is None:
        raise ConfigError("log_training_curve needs an active MLflow run (use stage_run)")
    points: list[Metric] = []
    now = int(time.time() * 1000)
    for i, record in enumerate(_history_records(history)):
        if "step" not in record:
            raise ArtifactError(f"training history record {i} has no 'step': {dict(record)}")
        step = int(record["step"])
        for name, value in record.items():
            if name != "step" and _is_number(value):
                points.append(
                    Metric(metric_key(f"{prefix}/{name}" if prefix else name), float(value), now, step)
                )
    client = mlflow.MlflowClient()
    for start in range(0, len(points), batch_size):
        client.log_batch(run.info.run_id, metrics=points[start : start + batch_size])
    return len(points)


def log_table(data: pd.DataFrame | Mapping[str, Sequence[Any]], artifact_file: str) -> None:
    """A table artifact (``.json``) the MLflow UI shows and ``mlflow.load_table`` reads back."""
    import mlflow

    if not artifact_file.endswith(".json"):
        raise ConfigError(f"table artifact {artifact_file!r} must end in .json")
    mlflow.log_table(data=data, artifact_file=artifact_file)


def log_figure(figure: Figure, artifact_file: str) -> None:
    import mlflow

    mlflow.log_figure(figure, artifact_file)


def plot_training_curve(
    history: Sequence[Mapping[str, Any]] | pd.DataFrame, metrics: Sequence[str]
) -> Figure:
    """One line per named metric against step (a headless matplotlib figure)."""
    from matplotlib.figure import Figure

    records = _history_records(history)
    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    for name in metrics:
        points = [(r["step"], r[name]) for r in records if _is_number(r.get(name))]
        if points:
            axes.plot(*zip(*points, strict=True), label=name)
    axes.set_xlabel("step")
    axes.legend()
    figure.tight_layout()
    return figure


def log_plots(paths: Sequence[str | Path], artifact_path: str = "plots") -> list[str]:
    """Log existing plot files (PNG/SVG/JSON from DVC plots or reports) under ``plots/``."""
    import mlflow

    logged = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ArtifactError(f"plot file not found: {path}")
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
        logged.append(f"{artifact_path}/{path.name}")
    return logged
