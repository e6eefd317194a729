"""Labelling submitted as a Ray job (the way the vLLM engine runs) to a real local cluster.

The job runs the CPU entrypoint ``d2llm label`` through the dashboard's job API; inside the job
the labelling itself runs on the Ray executor, connecting to the cluster through the
``RAY_ADDRESS`` that Ray gives the job. Its shard files must be those of the local executor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from labelling_inputs import save_labelling_inputs

from d2llm.config import params_from_dict
from d2llm.errors import ArtifactError
from d2llm.labelling import MANIFEST_FILE, label_groups

torch.set_num_threads(1)


def _params(dashboard: str | None, executor: str = "ray") -> dict:
    return {
        "seed": 42,
        "device": "cpu",
        "teacher": {"batch_size": 4},
        "labelling": {
            "group_size": 2,
            "shard_groups": 1,
            "executor": executor,
            "ray": {"num_workers": 2, "cpus_per_worker": 0.5},
            "job": {
                "enabled": dashboard is not None,
                "address": dashboard,
                "python": sys.executable,  # the cluster's nodes run this environment's Python
                "env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                "timeout_s": 300,
            },
        },
    }


@pytest.fixture(scope="module")
def inputs(tiny_bert_dir, tmp_path_factory) -> tuple[Path, Path]:
    return save_labelling_inputs(tmp_path_factory.mktemp("job_labelling"), tiny_bert_dir, n=8)


def test_a_labelling_job_writes_the_labels_of_the_local_executor(ray_cluster, inputs, tmp_path):
    dashboard = f"http://{ray_cluster.dashboard_url}"
    summary = label_groups(params_from_dict(_params(dashboard)), *inputs, tmp_path / "job")
    assert summary["job_id"].startswith("d2llm-label-") and summary["complete"]
    assert summary["groups"] == 4 and summary["shards"] == 4
    assert summary["scoring"]["engine"] == "hf"

    label_groups(params_from_dict(_params(None, executor="local")), *inputs, tmp_path / "local")
    for shard in sorted((tmp_path / "local").glob("scores-*.safetensors")):
        assert (tmp_path / "job" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    job_manifest = json.loads((tmp_path / "job" / MANIFEST_FILE).read_text())
    local_manifest = json.loads((tmp_path / "local" / MANIFEST_FILE).read_text())
    assert job_manifest == local_manifest


def test_a_failed_job_is_an_error_that_quotes_its_log(ray_cluster, inputs, tmp_path):
    dashboard = f"http://{ray_cluster.dashboard_url}"
    params = params_from_dict(_params(dashboard))
    with pytest.raises(ArtifactError, match=r"(?s)ended FAILED.*mined negatives not found"):
        label_groups(params, tmp_path / "no-such.parquet", inputs[1], tmp_path / "labels")
