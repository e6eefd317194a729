"""Labelling as a Ray job: ``d2llm label`` run on a cluster, in an environment of its own.

vLLM cannot share d2llm's environment (its fastapi pins conflict with Prefect's, and it pins its
own torch), so the vLLM engine runs where it is installed: a Ray job whose ``runtime_env`` adds
the job's packages (``labelling.job.pip``, e.g. vLLM) on top of the cluster's Python. The
Prefect label task (and ``d2llm label`` with ``labelling.job.enabled: true``) submits the job
through the dashboard's job API (``JobSubmissionClient``) and waits for it.

What the job gets: a working folder holding this very d2llm source (so the cluster runs the
submitter's code, installed there or not) and the resolved config with ``job.enabled`` off; its
entrypoint is ``<labelling.job.python> -m d2llm.cli --params params.yaml label --negatives ...
--teacher-dir ... --out-dir ...`` with absolute paths, which the cluster must see as the
submitter does (one machine, or a shared file system). The job writes the same shard files and
manifest as any executor, so a failed or stopped job is resumed by submitting it again.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from d2llm.errors import ArtifactError
from d2llm.labelling.ray_executor import require_ray
from d2llm.labelling.shards import MANIFEST_FILE
from d2llm.lock import LOCK_HELD_ENV

if TYPE_CHECKING:
    from d2llm.config import Params

log = logging.getLogger(__name__)

_POLL_SECONDS = 1.0
_LOG_TAIL = 4000  # characters of the job's log quoted in an error


def job_entrypoint(
    params: Params, negatives_path: str | Path, teacher_dir: str | Path, out_dir: str | Path, overwrite: bool
) -> str:
    """The shell command of the job.

    It starts in the job's working folder (the uploaded d2llm source and params.yaml), puts that
    folder on PYTHONPATH, and runs ``d2llm label`` from the submitter's working directory, so that
    relative references in the config and in the saved teacher (a model folder) mean what they
    mean here. The submitter holds the working copy's pipeline lock while it waits for the job
    (d2llm.lock), so the job is told not to take it again.
    """
    label = [
        params.labelling.job.python,
        "-m",
        "d2llm.cli",
        "--params",
        "PARAMS",
        "label",
        "--negatives",
        str(Path(negatives_path).resolve()),
        "--teacher-dir",
        str(Path(teacher_dir).resolve()),
        "--out-dir",
        str(Path(out_dir).resolve()),
    ]
    if overwrite:
        label.append("--overwrite")
    command = shlex.join(label).replace("PARAMS", '"$JOB_DIR/params.yaml"', 1)
    return (
        f'JOB_DIR="$PWD" && cd {shlex.quote(str(Path.cwd().resolve()))} && '
        f'PYTHONPATH="$JOB_DIR${{PYTHONPATH:+:$PYTHONPATH}}" {LOCK_HELD_ENV}=1 exec {command}'
    )


def prepare_job_folder(params: Params, folder: Path) -> Path:
    """Write the job's working folder: the d2llm source and the config, with the job switched off."""
    import d2llm

    shutil.copytree(
        Path(d2llm.__file__).parent, folder / "d2llm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    raw = params.model_dump(mode="json")
    raw["labelling"]["job"]["enabled"] = False  # the job labels; it must not submit itself again
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), "utf-8")
    return folder


def job_runtime_env(params: Params, folder: Path) -> dict[str, Any]:
    cfg = params.labelling.job
    env: dict[str, Any] = {
        "working_dir": str(folder),
        "env_vars": {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", **cfg.env_vars},
    }
    if cfg.pip:
        env["pip"] = list(cfg.pip)
    return env


def run_labelling_job(
    params: Params,
    negatives_path: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Submit the labelling as a Ray job, wait for it, and summarise its labels (labels.json)."""
    require_ray("labelling.job.enabled")
    from ray.job_submission import JobSubmissionClient

    cfg = params.labelling.job
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="d2llm-label-job-") as work:
        folder = prepare_job_folder(params, Path(work))
        job_id = client.submit_job(
            entrypoint=job_entrypoint(params, negatives_path, teacher_dir, out_dir, overwrite),
            runtime_env=job_runtime_env(params, folder),
            submission_id=f"d2llm-label-{uuid.uuid4().hex[:12]}",
            entrypoint_num_gpus=cfg.entrypoint_num_gpus or None,
        )
        log.info("submitted labelling job %s to %s", job_id, address or "the default Ray cluster")
        status = wait_for_job(client, job_id, cfg.timeout_s)
    logs = client.get_job_logs(job_id)
    if status != "SUCCEEDED":
        raise ArtifactError(
            f"labelling job {job_id} ended {status}; its shards so far are kept, submit it again to "
            f"resume. Last lines of its log:\n{logs[-_LOG_TAIL:]}"
        )
    return _summary(job_id, Path(out_dir))


def wait_for_job(client: Any, job_id: str, timeout_s: float) -> str:
    """Poll the job until it ends; stop it past ``timeout_s``. Returns the final status name."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return JobStatus(status).value
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            log.warning("labelling job %s ran past %.0f s and was stopped", job_id, timeout_s)
            return "TIMED_OUT"
        time.sleep(_POLL_SECONDS)


def _summary(job_id: str, out_dir: Path) -> dict[str, Any]:
    import json

    manifest_file = out_dir / MANIFEST_FILE
    if not manifest_file.is_file():
        raise ArtifactError(
            f"labelling job {job_id} succeeded but {manifest_file} is missing: does the cluster write to "
            "the same file system as this machine?"
        )
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    return {
        "job_id": job_id,
        "out_dir": str(out_dir),
        "groups": manifest["num_groups"],
        "shards": manifest.get("num_shards"),
        "complete": manifest["complete"],
        "scoring": manifest.get("scoring"),
    }
