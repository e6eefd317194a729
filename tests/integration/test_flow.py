"""The Prefect training flow end to end on the tiny project, with real Prefect, MLflow and GX.

Runs in-process under ``prefect_test_harness`` (a temporary Prefect API and database) inside a
clone of the tiny project, so the flow's relative paths (data/, models/, mlflow/) land there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from d2llm.errors import DataValidationError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _work_in_clone(template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    clone = template.clone(tmp_path / "project")
    monkeypatch.chdir(clone.root)
    for key, value in clone.env.items():
        if key.startswith(("HF_", "TOKENIZERS", "GX_", "OMP_")):
            monkeypatch.setenv(key, value)
    return clone


@pytest.fixture
def project(tiny_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    return _work_in_clone(tiny_project, tmp_path, monkeypatch)


@pytest.fixture
def decoder_project(tiny_decoder_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    return _work_in_clone(tiny_decoder_project, tmp_path, monkeypatch)


def _registry(root: Path) -> tuple[list[str], dict[str, str]]:
    from mlflow import MlflowClient

    from d2llm.config import load_params
    from d2llm.tracking import configure

    params = load_params(root / "params.yaml")
    configure(params.tracking, root)
    client = MlflowClient()
    name = params.tracking.registered_model
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = client.get_registered_model(name).aliases if versions else {}
    return versions, {alias: str(version) for alias, version in aliases.items()}


def _mtimes(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*") if p.is_file()}


def test_flow_runs_end_to_end_then_reuses_its_cache(prefect_harness: None, project) -> None:
    from mlflow import MlflowClient

    from flows.pipeline import training_pipeline

    first = training_pipeline(params_file="params.yaml")

    root = project.root
    assert (root / "reports" / "validation").is_dir()
    assert (root / "models" / "student" / "student.json").is_file()
    assert (root / "reports" / "metrics.json").is_file()
    assert "mean_main" in first["metrics"]
    assert first["version"] == "1"
    assert first["promotion"]["verdict"] == "promoted"  # the first model ever becomes champion
    versions, aliases = _registry(root)
    assert versions == ["1"] and aliases["champion"] == "1"

    # One parent run with a nested run per stage.
    client = MlflowClient()
    parent = client.get_run(first["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{first['run_id']}'"
    )
    stages = {run.data.tags.get("d2llm.stage") for run in children}
    assert {"prepare", "validate", "mine", "teacher-finetune", "label", "train", "evaluate"} <= stages
    assert parent.data.tags.get("git.commit")
    # The evaluate run holds the report and the picture of the gains with their intervals.
    evaluate_run = next(run for run in children if run.data.tags.get("d2llm.stage") == "evaluate")
    logged = {a.path for a in client.list_artifacts(evaluate_run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/gains_vs_bi_encoder.png"} <= logged
    # The run committed what it wrote as the DVC stages' outputs: `dvc status` is clean, and
    # the run's dvc.* tags are this run's hashes (those dvc.lock now holds), not another run's.
    assert "Data and pipelines are up to date." in project.dvc("status").stdout
    from d2llm.lineage import dvc_hashes

    tags = parent.data.tags
    assert tags["dvc.lineage"] == "committed"
    committed = dvc_hashes(root / "dvc.lock")
    assert "train:outs:models/student" in committed and "fetch-data:outs:data/raw/fetched.json" in committed
    assert {k.removeprefix("dvc."): v for k, v in tags.items() if k.startswith("dvc.") and ":" in k} == {
        k.replace("@", "_"): v for k, v in committed.items()
    }

    # Nothing changed: every cached stage is reused, nothing is retrained.
    labels_before, student_before = _mtimes(root / "data" / "labels"), _mtimes(root / "models" / "student")
    second = training_pipeline(params_file="params.yaml")
    assert _mtimes(root / "data" / "labels") == labels_before
    assert _mtimes(root / "models" / "student") == student_before
    assert second["metrics"] == first["metrics"]
    # The very same student is not registered again; promotion is idempotent on it.
    assert second["version"] == "1"
    assert second["promotion"]["verdict"] == "promoted"
    versions, aliases = _registry(root)
    assert versions == ["1"] and aliases["champion"] == "1"


def test_the_llm_path_runs_end_to_end_causal_teacher_and_decoder_student(
    prefect_harness: None, decoder_project
) -> None:
    """The flow with a causal-LM teacher (LoRA fine-tuned) and a Llama student backbone."""
    import json

    import numpy as np

    from d2llm.labelling import load_labels
    from flows.pipeline import training_pipeline

    result = training_pipeline(params_file="params.yaml")
    root = decoder_project.root

    teacher = json.loads((root / "models" / "teacher" / "teacher.json").read_text(encoding="utf-8"))
    assert teacher["kind"] == "causal_lm" and teacher["weights"] == "lora"
    assert (root / "models" / "teacher" / "adapter" / "adapter_config.json").is_file()
    teacher_report = json.loads((root / "reports" / "teacher_metrics.json").read_text(encoding="utf-8"))
    assert teacher_report["steps"] == 2 and np.isfinite(teacher_report["loss_last"])

    # The causal teacher labelled every group: probabilities that differ from pair to pair.
    labels = load_labels(root / "data" / "labels")
    assert len(labels.groups) == 4
    hard = labels.hard.numpy()
    assert np.isfinite(hard).all() and hard.std() > 0

    student = json.loads((root / "models" / "student" / "student.json").read_text(encoding="utf-8"))
    assert student["backbone_model_type"] == "llama"
    assert (root / "models" / "student" / "adapter").is_dir()

    # Every system scored every test set, the decoder student included.
    metrics = json.loads((root / "reports" / "metrics.json").read_text(encoding="utf-8"))
    for name in ("sick", "sick_r"):
        by_system = metrics["datasets"][name]["metrics"]
        for system in ("bi-encoder", "teacher", "student"):
            main = by_system[system][metrics["datasets"][name]["main_metric"]]
            assert np.isfinite(main), (name, system, by_system)
    assert np.isfinite(result["metrics"]["mean_main"])
    assert result["version"] == "1" and result["promotion"]["verdict"] == "promoted"


def test_a_training_param_change_reruns_only_downstream_stages(prefect_harness: None, project) -> None:
    from flows.pipeline import training_pipeline

    training_pipeline(params_file="params.yaml", promote=False)
    root = project.root
    teacher, labels = _mtimes(root / "models" / "teacher"), _mtimes(root / "data" / "labels")
    student = _mtimes(root / "models" / "student")

    training_pipeline(params_file="params.yaml", overrides={"training.lr": 3e-3}, promote=False)
    assert _mtimes(root / "models" / "teacher") == teacher
    assert _mtimes(root / "data" / "labels") == labels
    assert _mtimes(root / "models" / "student") != student


def test_a_stage_whose_output_was_replaced_since_it_was_cached_is_recomputed(
    prefect_harness: None, project
) -> None:
    """Runs of two configs in one working copy share the artefact folders (`make run`, then
    `make run-llm`, then `make run`): the third run's cache is valid, its files are not."""
    import json

    from flows.pipeline import training_pipeline

    training_pipeline(params_file="params.yaml", promote=False)
    teacher_json = project.root / "models" / "teacher" / "teacher.json"
    ours = teacher_json.read_text(encoding="utf-8")
    labels = _mtimes(project.root / "data" / "labels")
    # Another config's teacher now sits in models/teacher.
    teacher_json.write_text(json.dumps({**json.loads(ours), "max_length": 99}), encoding="utf-8")

    training_pipeline(params_file="params.yaml", promote=False)
    assert teacher_json.read_text(encoding="utf-8") == ours  # fine-tuned again, deterministically
    # The same teacher again: the labelling made from it is still valid and is reused.
    assert _mtimes(project.root / "data" / "labels") == labels


def test_bad_data_stops_the_flow_before_training_and_leaves_the_registry_alone(
    prefect_harness: None, project
) -> None:
    from flows.pipeline import training_pipeline

    # A user's dataset with a score outside its declared 0-5 range: parses, fails validation.
    bad = project.root / "data" / "raw" / "custom" / "bad.csv"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("text_a,text_b,label\na man sings,a person sings,4.5\na dog runs,a cat naps,7.0\n")
    custom = [{"name": "bad", "task": "sym", "label_kind": "score", "label_range": [0, 5],
               "files": {"train": str(bad)}}]  # fmt: skip
    with pytest.raises(DataValidationError, match="pairs/bad") as failure:
        training_pipeline(params_file="params.yaml", overrides={"data.custom": custom})
    assert "label" in str(failure.value) and "7.0" in str(failure.value)
    assert not (project.root / "models").exists()
    assert not (project.root / "data" / "labels").exists()
    assert _registry(project.root)[0] == []


def test_a_tampered_raw_file_stops_the_flow_at_fetch_data(
    prefect_harness: None, project, monkeypatch: pytest.MonkeyPatch
) -> None:
    from d2llm.errors import DataError
    from flows.pipeline import training_pipeline

    monkeypatch.delenv("D2LLM_DATA_MIRROR", raising=False)  # a mirror in the environment would repair it

    train_file = project.root / "data" / "raw" / "sick" / "SICK_train.txt"
    os.chmod(train_file, 0o644)
    train_file.write_text(train_file.read_text(encoding="utf-8").replace("4.5", "7.0", 1), encoding="utf-8")
    # No mirror, and the catalogue's URLs lead nowhere (a closed local port, as offline): no
    # verified copy can replace the file, so nothing runs.
    catalog = project.root / "data" / "raw" / "catalog.yaml"
    catalog.write_text(
        catalog.read_text(encoding="utf-8").replace(
            "https://raw.githubusercontent.com", "http://127.0.0.1:9"
        ),
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=r"sick/SICK_train\.txt: no copy with the expected sha256"):
        training_pipeline(params_file="params.yaml")
    assert not (project.root / "data" / "prepared").exists()
    assert not (project.root / "models").exists()
    assert _registry(project.root)[0] == []


def test_a_second_run_in_the_same_working_copy_refuses_before_touching_anything(
    prefect_harness: None, project
) -> None:
    import subprocess
    import sys

    from d2llm.errors import PipelineLockedError
    from flows.pipeline import training_pipeline

    holder = subprocess.Popen(  # the first run, as far as the lock is concerned
        [sys.executable, "-c", "from d2llm.lock import pipeline_lock\nwith pipeline_lock():\n"
         "    print('held', flush=True)\n    input()"],
        cwd=project.root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineLockedError, match=f"pid {holder.pid} "):
            training_pipeline(params_file="params.yaml")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert not (project.root / "data" / "prepared").exists()
    assert not (project.root / "models").exists()
    assert _registry(project.root)[0] == []


def test_the_flow_labels_on_a_ray_cluster(prefect_harness: None, project, ray_cluster) -> None:
    """labelling.executor: ray: the flow's label task scores the shards on the session's local Ray
    cluster (2 actors); the labels are those the local executor (`d2llm label`) writes."""
    import json

    from mlflow import MlflowClient

    from flows.pipeline import training_pipeline

    result = training_pipeline(
        params_file="params.yaml", overrides={"labelling.executor": "ray"}, promote=False
    )
    root = project.root
    manifest = json.loads((root / "data" / "labels" / "labels.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == 2 and manifest["scoring"]["engine"] == "hf"
    _registry(root)  # points MLflow at this project's store, whatever an earlier test left set
    client = MlflowClient()
    parent = client.get_run(result["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result['run_id']}'"
    )
    [label_run] = [run for run in children if run.data.tags.get("d2llm.stage") == "label"]
    workers = {k: v for k, v in label_run.data.metrics.items() if k.endswith("workers")}
    # 2 actors, none lost, none replaced
    assert workers == {
        "labelling/workers": 2,
        "labelling/lost_workers": 0,
        "labelling/replacement_workers": 0,
    }

    project.run("d2llm", "label", "--executor", "local", "--out-dir", "data/labels-local")
    for shard in sorted((root / "data" / "labels-local").glob("scores-*.safetensors")):
        assert (root / "data" / "labels" / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_promotion_compares_a_champion_measured_on_other_pairs_on_the_challengers_pairs(
    prefect_harness: None, project
) -> None:
    """Two versions trained with different seeds are validated on different seeded samples of
    the validate parts: the champion is re-evaluated on the challenger's pairs before deciding."""
    import json

    from mlflow import MlflowClient

    from d2llm.config import load_params
    from d2llm.tracking.promotion import normalize_metrics
    from d2llm.tracking.registry import validation_of_version
    from flows.pipeline import training_pipeline

    first = training_pipeline(params_file="params.yaml")
    second = training_pipeline(params_file="params.yaml", overrides={"seed": 7})
    assert (first["version"], second["version"]) == ("1", "2")
    client = MlflowClient()
    name = load_params("params.yaml").tracking.registered_model
    v1, v2 = client.get_model_version(name, "1"), client.get_model_version(name, "2")
    assert v1.tags["d2llm.eval_data"] != v2.tags["d2llm.eval_data"]  # other validation pairs
    numbers = json.loads(v2.tags["d2llm.promotion.numbers"])
    assert numbers["champion_reevaluated"] is True
    assert "v1 was re-evaluated on this version's validation data" in v2.description
    # The champion's figures in the decision are v1's student measured on v2's pairs.
    seven = load_params("params.yaml", {"seed": 7})
    again, data_id = validation_of_version(seven, f"models:/{name}/1")
    assert data_id == v2.tags["d2llm.eval_data"]
    assert numbers["champion"] == pytest.approx(normalize_metrics(again))
    # Lineage: a run with overrides is not the run dvc.yaml describes, and says so.
    assert client.get_run(second["run_id"]).data.tags["dvc.lineage"].startswith("not recorded")


def test_two_presets_keep_their_own_artefacts_and_reuse_their_own_cache_in_either_order(
    prefect_harness: None, decoder_project
) -> None:
    """`make run`, `make run-llm`, `make run` again: each preset has its own artefact root, so
    neither replaces the other's teacher, labels or student, and each rerun reuses its own."""
    import yaml

    from flows.pipeline import training_pipeline

    root = decoder_project.root
    llm = decoder_project.read_params()  # the LLM path (causal teacher, decoder student)
    default = yaml.safe_load(yaml.safe_dump(llm))
    default["teacher"].update(kind="cross_encoder", model="backbones/tiny-bert", max_length=48)
    default["teacher"]["finetune"]["lora"]["enabled"] = False
    default["student"]["backbone"] = "backbones/tiny-bert"
    llm["artifacts_dir"] = "outputs/llm"
    llm["data"]["prepared_dir"] = "outputs/llm/data/prepared"
    llm["validation"]["report_dir"] = "outputs/llm/reports/validation"
    llm["evaluation"]["output"] = "outputs/llm/reports/metrics.json"
    llm["tracking"].update(experiment="llm", registered_model="llm-student")
    (root / "params.yaml").write_text(yaml.safe_dump(default, sort_keys=False), encoding="utf-8")
    (root / "llm.yaml").write_text(yaml.safe_dump(llm, sort_keys=False), encoding="utf-8")

    def artefacts(base: Path) -> dict[str, dict[str, float]]:
        return {name: _mtimes(base / name) for name in ("models/teacher", "data/labels", "models/student")}

    for first_file, second_file in (("params.yaml", "llm.yaml"), ("llm.yaml", "params.yaml")):
        training_pipeline(params_file=first_file)
        training_pipeline(params_file=second_file)
    default_made, llm_made = artefacts(root), artefacts(root / "outputs" / "llm")
    assert all(default_made.values()) and all(llm_made.values())
    assert (root / "outputs" / "llm" / "reports" / "metrics.json").is_file()
    # A third run of each reuses every cached stage: nothing is fine-tuned, labelled or trained again.
    again_default = training_pipeline(params_file="params.yaml")
    again_llm = training_pipeline(params_file="llm.yaml")
    assert artefacts(root) == default_made and artefacts(root / "outputs" / "llm") == llm_made
    assert again_default["version"] == "1" and again_llm["version"] == "1"  # not registered again
