"""The training pipeline as a Prefect flow: one task per stage of d2llm.stages, then promotion.

This module only composes d2llm library functions as tasks. What Prefect adds:
- caching keyed on content: each task's cache key is the content fingerprint of its input
  artefacts, the config keys it reads (both from the one table of d2llm.stages, which dvc.yaml
  is tested against) and the library's source, so an unchanged stage (the teacher labelling
  above all) is skipped on the next run; a cached stage whose output has gone missing, or has
  been replaced since (by a run of another config in the same working copy), is recomputed;
- retries on transient failures (never on errors in the data or the config, which a retry
  cannot fix);
- a "gpu" concurrency limit around the stages that use the accelerator
  (``prefect gcl create gpu --limit 1`` on a shared server; without it they run unthrottled);
- one MLflow parent run per pipeline run, a nested run per stage; at the end the DVC stages'
  outputs are committed as this run wrote them (d2llm.lineage) and their hashes tagged on
  the parent run.

Run it: ``python -m flows.pipeline`` (the README's ``make run``), or through the deployment in
``prefect.yaml`` / ``flows/deploy.py`` for scheduled retraining.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.concurrency.sync import concurrency

from d2llm import layout, stages
from d2llm.config import Params, load_params
from d2llm.errors import D2LLMError
from d2llm.fingerprint import code_fingerprint, path_fingerprint
from d2llm.jsonfile import write_json
from d2llm.layout import Layout
from d2llm.lock import pipeline_lock
from d2llm.stages import cache_key

# The cache key is built from everything a task reads except the full config object, whose
# unrelated sections must not invalidate the stage: the task's ``key`` argument carries the
# config values, input fingerprints and code the stage depends on (d2llm.stages.cache_key).
CACHED = (INPUTS - "params") + TASK_SOURCE


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only failures a retry can fix: not bad data, bad config or a missing artefact."""
    try:
        state.result()
    except D2LLMError:
        return False
    except Exception:
        return True
    return False


def _gpu_slot() -> Any:
    # strict=False: without a "gpu" limit on the server the stage simply runs.
    return concurrency("gpu", occupy=1, strict=False)


# --------------------------------------------------------------------------- tasks


@task(name="fetch-data", retries=0)
def fetch(params: Params) -> None:
    """Materialise and verify the raw sources of ``data.sources`` (nothing to do when in place)."""
    from d2llm.data.catalog import load_catalog
    from d2llm.data.fetch import fetch_data, mirror_places
    from d2llm.tracking import stage_run

    with stage_run("fetch-data"):
        report = fetch_data(
            load_catalog(layout.CATALOG), params.data.sources, params.data.raw_dir, mirror_places()
        )
    get_run_logger().info(report.describe())


@task(name="prepare", retries=0)
def prepare(params: Params) -> str:
    """Parse the raw sources and custom datasets into the canonical tables."""
    from d2llm.data.prepare import prepare_data, print_counts
    from d2llm.tracking import stage_run

    with stage_run("prepare"):
        print_counts(prepare_data(params, params.data.raw_dir, params.data.prepared_dir))
    return path_fingerprint(params.data.prepared_dir)


@task(name="validate", retries=0)
def validate(params: Params, prepared: str) -> None:
    """Validate the tables ``prepare`` made (fingerprint ``prepared``) with GX; failing fails the flow."""
    from d2llm.data.validation import validate_prepared
    from d2llm.tracking import stage_run

    logger = get_run_logger()
    with stage_run("validate") as run:
        try:
            summary = validate_prepared(params, params.data.prepared_dir, params.validation.report_dir)
        except D2LLMError as err:
            logger.error("data validation failed, nothing will be trained:\n%s", err)
            raise
        logger.info(summary.describe())
        _log_artifacts(run, params.validation.report_dir, "validation")


@task(
    name="mine",
    cache_policy=CACHED,
    persist_result=True,
    retries=2,
    retry_condition_fn=_retry_transient,
)
def mine(params: Params, key: dict[str, Any]) -> str:
    from d2llm.mining import mine_negatives
    from d2llm.tracking import stage_run

    out = Layout.of(params).negatives
    with stage_run("mine"):
        mine_negatives(params, params.data.prepared_dir, out)
    return path_fingerprint(out)


@task(
    name="teacher-finetune",
    cache_policy=CACHED,
    persist_result=True,
    retries=1,
    retry_condition_fn=_retry_transient,
    tags=["gpu"],
)
def teacher_finetune(params: Params, key: dict[str, Any]) -> str:
    from d2llm.teachers.finetune import finetune_teacher
    from d2llm.tracking import log_metrics_dict, stage_run

    paths = Layout.of(params)
    with stage_run("teacher-finetune"), _gpu_slot():
        report = finetune_teacher(params, params.data.prepared_dir, paths.teacher_dir)
        report.pop("history", None)
        log_metrics_dict(report, prefix="teacher")
    write_json(paths.teacher_metrics, report, indent=1, default=str)
    return path_fingerprint(paths.teacher_dir)


@task(
    name="label",
    cache_policy=CACHED,
    persist_result=True,
    retries=2,
    retry_condition_fn=_retry_transient,
    tags=["gpu"],
)
def label(params: Params, key: dict[str, Any]) -> str:
    """One task for the whole labelling, whatever scores the shards (never one task per shard:
    each would load the teacher again).

    ``labelling.executor: ray`` scores the shards on Ray actors that load the teacher once each;
    ``labelling.job.enabled`` submits the labelling as a Ray job in its own environment (the
    vLLM engine) and waits for it. Labelling is resumable: a retry continues from the shards
    already written, on any executor.
    """
    from d2llm.labelling import label_groups
    from d2llm.tracking import log_metrics_dict, stage_run

    cfg = params.labelling
    where = "a Ray job" if cfg.job.enabled else f"the {cfg.executor} executor"
    get_run_logger().info("labelling with the %s engine on %s", cfg.engine, where)
    paths = Layout.of(params)
    with stage_run("label"), _gpu_slot():
        # overwrite, as the DVC stage does: this task only runs when its inputs changed, so labels
        # in the folder that were made from other inputs are stale (finished shards of these same
        # inputs are still reused: resumption).
        report = label_groups(params, paths.negatives, paths.teacher_dir, paths.labels_dir, overwrite=True)
        log_metrics_dict(report, prefix="labelling")
    return path_fingerprint(paths.labels_dir)


@task(
    name="train",
    cache_policy=CACHED,
    persist_result=True,
    retries=1,
    retry_condition_fn=_retry_transient,
    tags=["gpu"],
)
def train(params: Params, key: dict[str, Any]) -> dict[str, Any]:
    # A retry resumes from the last checkpoint in models/student/checkpoint.
    from d2llm.tracking import log_metrics_dict, log_training_curve, stage_run
    from d2llm.training import run_training, write_curves

    paths = Layout.of(params)
    with stage_run("train"), _gpu_slot():
        result = run_training(params, paths.labels_dir, params.data.prepared_dir, paths.student_dir)
        log_training_curve(result.history)
        log_metrics_dict(result.to_dict(), prefix="train")
    summary = result.to_dict()
    write_json(paths.train_metrics, summary, indent=1, default=str)
    write_curves(result.history, paths.plots_dir)
    return {"fingerprint": path_fingerprint(paths.student_dir), **summary}


@task(
    name="evaluate", cache_policy=CACHED, persist_result=True, retries=1, retry_condition_fn=_retry_transient
)
def evaluate(params: Params, key: dict[str, Any]) -> dict[str, Any]:
    from d2llm.evaluation.evaluate import evaluate_systems, format_table
    from d2llm.evaluation.plots import gain_figure
    from d2llm.tracking import log_figure, log_metrics_dict, stage_run

    paths = Layout.of(params)
    with stage_run("evaluate") as run:
        results = evaluate_systems(
            params, params.data.prepared_dir, paths.teacher_dir, paths.student_dir, params.evaluation.output
        )
        log_metrics_dict(results["flat"], prefix="val")
        log_metrics_dict(results["test_flat"], prefix="test")
        _log_artifacts(run, params.evaluation.output, "evaluation")
        figure = gain_figure(results)
        if figure is not None:
            log_figure(figure, "evaluation/gains_vs_bi_encoder.png")
    fingerprint = path_fingerprint(params.evaluation.output)
    return {
        "fingerprint": fingerprint,
        "table": format_table(results),
        "flat": results["flat"],
        "validation_data_id": results["validation_data"]["id"],
    }


@task(name="record-lineage", retries=0)
def record_lineage(params: Params) -> Any:
    """``dvc commit`` what this run wrote for the stages of dvc.yaml (d2llm.lineage), so that
    ``dvc status`` is clean and ``dvc push`` shares this run's artefacts; skipped, with the
    reason, when the run is not the one dvc.yaml describes (other params)."""
    from d2llm.lineage import commit_run

    dvc_stages = [name for name, stage in stages.STAGES.items() if stage.in_dvc]
    lineage = commit_run(params, Path.cwd(), dvc_stages)
    if lineage.skipped:
        get_run_logger().info("DVC lineage not recorded: %s", lineage.skipped)
    return lineage


@task(name="register", retries=0)
def register(params: Params, metrics: dict[str, float], eval_data_id: str, student_fingerprint: str) -> str:
    """Register the student, unless this very student (same files) is registered already.

    A rerun with nothing changed then points at the existing version instead of adding an
    identical one on every scheduled run. The version carries its model card (README.md and a
    summary in its description), built from params, the evaluation results, the prepared
    manifest, the data catalogue and the labels; a card that cannot be built registers nothing.
    """
    from d2llm.tracking import log_student
    from d2llm.tracking.model_card import model_card_from_files
    from d2llm.tracking.registry import TAG_STUDENT_FINGERPRINT, newest_version

    paths = Layout.of(params)
    name = params.tracking.registered_model
    existing = newest_version(name, TAG_STUDENT_FINGERPRINT, student_fingerprint)
    if existing is not None:
        get_run_logger().info("this student is already %s v%s: not registered again", name, existing)
        return existing
    card = model_card_from_files(
        params,
        model_name=name,
        results_file=params.evaluation.output,
        catalog_path=layout.CATALOG,
        labels_dir=paths.labels_dir,
    )
    version = log_student(
        paths.student_dir,
        registered_model_name=name,
        metrics=metrics,
        eval_data_id=eval_data_id,
        version_tags={TAG_STUDENT_FINGERPRINT: student_fingerprint},
        card=card,
    )
    return str(version.version)


# --------------------------------------------------------------------------- flow


def _log_artifacts(run: Any, path: str | Path, artifact_path: str) -> None:
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    elif path.is_file():
        mlflow.log_artifact(str(path), artifact_path)


def _run_cached(step: Any, output: Path, params: Params, done: dict[str, str], code: str) -> Any:
    """Run a cached task keyed on its row of d2llm.stages (its name); recompute it if its output is
    gone, or is no longer the one the cached result describes.

    ``done`` holds the fingerprints of the artefacts made so far (keyed as in d2llm.stages),
    ``code`` the library's. The second case happens when runs of two configurations share the
    working copy's artefact folders (``make run``, then ``make run-llm``, then ``make run``):
    the third run's cache entries are valid, but the files on disk are the second run's.
    """
    key = cache_key(step.name, params, done, code)
    result = step.with_options(refresh_cache=not Path(output).exists())(params, key)
    if _fingerprint_of(result) != path_fingerprint(output):
        get_run_logger().info("%s: %s was replaced since it was cached: recomputing", step.name, output)
        result = step.with_options(refresh_cache=True)(params, key)
    return result


def _fingerprint_of(result: Any) -> str:
    return result if isinstance(result, str) else result["fingerprint"]


@flow(name="d2llm-training", log_prints=True)
def training_pipeline(
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    promote: bool = True,
    params: Params | None = None,
    lock_wait: float = 0.0,
) -> dict[str, Any]:
    """Validate, mine, fine-tune the teacher, label, distil, evaluate, register (and promote).

    The configuration is ``params`` (the typed config itself) when given, else ``params_file``
    with ``overrides`` (dotted keys), validated the same way. The run holds the working copy's
    lock (d2llm.lock): while another run holds it, this one waits up to ``lock_wait`` seconds,
    then fails with PipelineLockedError before touching anything.
    """
    params = params or load_params(params_file, overrides)
    with pipeline_lock(wait=lock_wait):
        return _run_pipeline(params, promote)


def _run_pipeline(params: Params, promote: bool) -> dict[str, Any]:
    from d2llm.tracking import pipeline_run
    from d2llm.tracking.runs import tag_lineage

    logger = get_run_logger()
    paths = Layout.of(params)
    code = code_fingerprint()
    with pipeline_run(params, run_name="d2llm-training") as run:
        # Fingerprints of the artefacts made so far, keyed as in d2llm.stages; each task is
        # named after its stage there (and its CLI subcommand and DVC stage).
        fetch(params)
        done: dict[str, str] = {stages.PREPARED: prepare(params)}
        validate(params, done[stages.PREPARED])
        done[stages.NEGATIVES] = _run_cached(mine, paths.negatives, params, done, code)
        done[stages.TEACHER] = _run_cached(teacher_finetune, paths.teacher_dir, params, done, code)
        done[stages.LABELS] = _run_cached(label, paths.labels_dir, params, done, code)
        trained = _run_cached(train, paths.student_dir, params, done, code)
        done[stages.STUDENT] = trained["fingerprint"]
        evaluation = _run_cached(evaluate, params.evaluation.output, params, done, code)
        tag_lineage(run.info.run_id, record_lineage(params))
        # Promotion compares versions on the exact validation pairs these metrics come from.
        data_id = evaluation["validation_data_id"]
        version = register(params, evaluation["flat"], data_id, done[stages.STUDENT])
        logger.info(
            "registered %s version %s (MLflow run %s)",
            params.tracking.registered_model,
            version,
            run.info.run_id,
        )

    decision = None
    if promote:
        from flows.promotion import promotion_flow

        decision = promotion_flow(version=version, params=params)
    from d2llm.teachers.dev_report import format_dev_table, read_dev_report

    teacher_report = read_dev_report(Layout.of(params).teacher_dir)
    if teacher_report:
        print("Teacher vs bi-encoder on the dev splits (points; select chose, validate did not):")
        print(format_dev_table(teacher_report))
    print("Test sets (IR through the shipped search):")
    print(evaluation["table"])
    print(f"MLflow run: {run.info.run_id}  registered model: {params.tracking.registered_model} v{version}")
    if decision is not None:
        print(f"promotion: {decision['verdict']} -> aliases {decision['aliases']}")
    return {
        "run_id": run.info.run_id,
        "version": version,
        "metrics": evaluation["flat"],
        "promotion": decision,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=training_pipeline.__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-promote", action="store_true")
    parser.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait for another run holding the lock"
    )
    args = parser.parse_args()
    training_pipeline(params_file=args.params, promote=not args.no_promote, lock_wait=args.wait)
