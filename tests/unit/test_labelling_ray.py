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
        # Only once a shard is written (the workers are up): on a loaded machine starting two
        # actors can take minutes, and killing one while it loads the teacher tests another path.
        deadline = time.monotonic() + 600
        while not any(out.glob("scores-*.safetensors")):
            if time.monotonic() > deadline:
                return  # nothing killed: the assertion below says so
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


class FailingReplacementsWorker(LabellingWorker):
    """Actor 0 dies scoring its shard, actor 1 (the first replacement) cannot load the teacher,
    actor 2 dies scoring too; any later actor would work. The index is the actor name's last part."""

    def __init__(self, *args):
        import ray

        self.index = int(ray.get_runtime_context().get_actor_name().rsplit("-", 1)[1])
        if self.index == 1:
            raise RuntimeError("this replacement cannot load the teacher")
        super().__init__(*args)

    def score(self, groups):
        if self.index in (0, 2):
            import os

            os._exit(1)  # the process dies: a lost worker, not a scoring error
        return super().score(groups)


def test_replacements_are_checked_before_use_and_at_most_num_workers(
    ray_cluster, inputs, local_labels, tmp_path, caplog
):
    """One shard to score with ``num_workers: 2`` (so one actor, and up to 2 replacements) and
    ``max_attempts: 3``. Actor 0 dies on the shard; replacement 1 fails its ready call, so it
    never gets the shard (the shard's attempts stay at 1) and counts as a replacement;
    replacement 2 dies on the shard (attempt 2). That is 2 replacements, the bound: the run
    stops with no worker left, although a 4th actor would have worked and the shard had an
    attempt left. (Unchecked replacements would have spent the shard's 3 attempts on actors 0-2;
    a bound of 2 x num_workers actors would have started actor 3 and finished.)"""
    import json
    import shutil

    from ray import cloudpickle

    from d2llm.errors import ArtifactError

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
    out = tmp_path / "labels"
    shutil.copytree(local_labels, out)
    (out / SHARD_PATTERN.format(5)).unlink()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    (out / MANIFEST_FILE).write_text(json.dumps({**manifest, "complete": False}))
    params = params_from_dict(_params("ray"))
    plan = plan_labelling(params, *inputs, out)
    assert plan.missing == [5] and params.labelling.ray.max_attempts == 3

    with pytest.raises(ArtifactError, match=r"no Ray labelling worker is left \(2 replacements started"):
        score_on_ray(plan, params, inputs[1], worker_class=FailingReplacementsWorker)
    assert "a replacement Ray labelling worker could not start" in caplog.text
    assert not (out / SHARD_PATTERN.format(5)).exists()
