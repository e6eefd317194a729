"""Labelling on a real local Ray cluster (2 actors): same shard files as the local executor,
resumption shard by shard, and a worker killed mid-run."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from labelling_inputs import save_labelling_inputs

from d2llm.config import params_from_dict
from d2llm.labelling import (
    MANIFEST_FILE,
    SHARD_PATTERN,
    finalise_labelling,
    label_groups,
    load_labels,
    plan_labelling,
)
from d2llm.labelling.ray_executor import WORKER_NAME, LabellingWorker, score_on_ray

torch.set_num_threads(1)  # as each Ray actor (labelling.ray.torch_threads): same sums, same bits

N_SHARDS = 8


def _params(executor: str) -> dict:
    return {
        "seed": 42,
        "device": "cpu",
        "teacher": {"batch_size": 4},
        "labelling": {
            "group_size": 2,
            "shard_groups": 1,  # 8 groups -> 8 shards
            "executor": executor,
            "ray": {"num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1},
        },
    }


@pytest.fixture(scope="module")
def inputs(tiny_bert_dir, tmp_path_factory) -> tuple[Path, Path]:
    return save_labelling_inputs(tmp_path_factory.mktemp("ray_labelling"), tiny_bert_dir, n=2 * N_SHARDS)


@pytest.fixture(scope="module")
def local_labels(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "labels"
    summary = label_groups(params_from_dict(_params("local")), *inputs, out)
    assert summary["shards"] == N_SHARDS and summary["scored_shards"] == N_SHARDS
    return out


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("scores-*.safetensors"))}


def _assert_same_labels(folder: Path, reference: Path) -> None:
    got, want = _shard_bytes(folder), _shard_bytes(reference)
    assert list(got) == list(want) and len(got) == N_SHARDS
    for name in want:
        assert got[name] == want[name], f"{name} differs from the local executor's"
    assert (folder / "groups.parquet").read_bytes() == (reference / "groups.parquet").read_bytes()
    a, b = load_labels(folder), load_labels(reference)
    assert torch.equal(a.in_batch, b.in_batch) and torch.equal(a.feature_cos, b.feature_cos)


def test_ray_shards_are_bitwise_those_of_the_local_executor(ray_cluster, inputs, local_labels, tmp_path):
    out = tmp_path / "labels"
    summary = label_groups(params_from_dict(_params("ray")), *inputs, out)
    assert summary["executor"] == "ray" and summary["workers"] == 2
    assert summary["scored_shards"] == N_SHARDS and summary["lost_workers"] == 0
    _assert_same_labels(out, local_labels)
    import json

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["engine"] == "hf"
    assert manifest["scoring"]["engine"] == "hf" and manifest["scoring"]["dtype"] == "float32"
    assert "transformers" in manifest["scoring"]["version"]


def test_a_deleted_shard_is_the_only_one_rescored(ray_cluster, inputs, local_labels, tmp_path):
    import shutil

    out = tmp_path / "labels"
    params = params_from_dict(_params("ray"))
    shutil.copytree(local_labels, out)  # made by the local executor: the output does not depend on it
    victim = out / SHARD_PATTERN.format(5)
    victim.unlink()
    import json

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    (out / MANIFEST_FILE).write_text(json.dumps({**manifest, "complete": False}))  # as if interrupted
    others = {p.name: p.stat().st_mtime_ns for p in out.glob("scores-*.safetensors")}

    summary = label_groups(params, *inputs, out)
    assert summary["scored_shards"] == 1 and summary["skipped_shards"] == N_SHARDS - 1
    assert summary["workers"] == 1  # no more actors than shards to score
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("scores-*.safetensors") if p != victim} == others
    _assert_same_labels(out, local_labels)


class SlowWorker(LabellingWorker):
    """A worker that takes 0.4 s per shard, so that one can be killed while the run is under way."""

    def score(self, groups):
        time.sleep(0.4)
        return super().score(groups)


def test_a_worker_killed_mid_run_loses_no_shard(ray_cluster, inputs, local_labels, tmp_path):
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
    out = tmp_path / "labels"
    params = params_from_dict(_params("ray"))
    plan = plan_labelling(params, *inputs, out)
    killed: list[str] = []

    def kill_one_worker_after_the_first_shard() -> None:
        deadline = time.monotonic() + 60
        while not any(out.glob("scores-*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Names are WORKER_NAME-<pid>-<run>-<n>: the newest run is this one (earlier ones may linger).
        names = [n for n in ray.util.list_named_actors() if n.startswith(WORKER_NAME)]
        newest = max(names, key=lambda n: [int(part) for part in n.rsplit("-", 3)[1:]])
        ray.kill(ray.get_actor(newest), no_restart=True)
        killed.append(newest)

    killer = threading.Thread(target=kill_one_worker_after_the_first_shard)
    killer.start()
    run, scoring = score_on_ray(plan, params, inputs[1], worker_class=SlowWorker)
    killer.join()
    assert killed, "no worker was killed"
    assert run["lost_workers"] >= 1 and run["retried_shards"] >= 1, run
    summary = finalise_labelling(plan, scoring, run)
    assert summary["scored_shards"] == N_SHARDS
    _assert_same_labels(out, local_labels)
    assert not list(out.glob("*.tmp"))
