"""The DVC pipeline for real: dvc.yaml and .dvc/config of the repository on the tiny project.

One module-scoped workspace is reproduced once and the tests then run in file order against it:
a second repro does nothing, a param change reruns exactly the stages that read it, outputs
survive a push / wipe / pull round trip through the shipped default remote, and a user's own
dataset goes through `dvc add`, push and pull into a fresh clone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ALL_STAGES = ["fetch-data", "prepare", "validate", "mine", "teacher-finetune", "label", "train", "evaluate"]
CACHED_OUTS = ["data/prepared", "data/negatives", "models/teacher", "data/labels", "models/student"]


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in order, from its log."""
    return re.findall(r"Running stage '([a-z_-]+)'", output)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def reproduced(tiny_project, tmp_path_factory: pytest.TempPathFactory) -> dict:
    project = tiny_project.clone(tmp_path_factory.mktemp("dvc") / "project")
    done = project.dvc("repro", timeout=600)
    project.git("add", "-A")
    project.git("commit", "-q", "-m", "reproduce")
    return {"project": project, "output": done.stdout + done.stderr}


def test_repro_runs_the_whole_pipeline_in_dependency_order(reproduced: dict) -> None:
    project = reproduced["project"]
    ran = stages_run(reproduced["output"])
    assert sorted(ran) == sorted(ALL_STAGES)
    position = {stage: ran.index(stage) for stage in ran}
    for before, after in [
        ("fetch-data", "prepare"),
        ("prepare", "validate"),
        ("validate", "mine"),
        ("validate", "teacher-finetune"),
        ("mine", "label"),
        ("teacher-finetune", "label"),
        ("label", "train"),
        ("train", "evaluate"),
    ]:
        assert position[before] < position[after], f"{before} must run before {after}: {ran}"

    metrics = json.loads(project.dvc("metrics", "show", "--json").stdout)
    (workspace,) = metrics.values()  # one revision, the workspace
    files = workspace["data"]
    evaluation = files["reports/metrics.json"]["data"]
    assert set(evaluation["datasets"]) == {"sick", "sick_r"}
    assert evaluation["datasets"]["sick"]["n_pairs"] == 48
    assert "student" in evaluation["summary"]
    assert files["reports/train_metrics.json"]["data"]["steps"] == 4

    # Four steps, a dev evaluation every two: at steps 0, 2 and 4; one loss record per step.
    plots = json.loads(project.dvc("plots", "show", "--json").stdout)
    assert "errors" not in plots, plots.get("errors")
    dev = plots["data"]["reports/plots/dev_metric.json"][0]["content"]["data"]["values"]
    assert [point["step"] for point in dev] == [0, 2, 4]
    loss = plots["data"]["reports/plots/train_loss.json"][0]["content"]["data"]["values"]
    assert [point["step"] for point in loss] == [1, 2, 3, 4]


def test_second_repro_has_nothing_to_do(reproduced: dict) -> None:
    project = reproduced["project"]
    done = project.dvc("repro")
    assert stages_run(done.stdout) == []
    assert "Data and pipelines are up to date." in project.dvc("status").stdout


def test_changing_the_learning_rate_reruns_only_train_and_evaluate(reproduced: dict) -> None:
    project = reproduced["project"]
    project.set_param("training.lr", 0.003)
    changed = json.loads(project.dvc("status", "--json").stdout)
    assert list(changed) == ["train"]
    assert {"changed deps": {"params.yaml": {"training": "modified"}}} in changed["train"]

    done = project.dvc("repro")
    assert stages_run(done.stdout) == ["train", "evaluate"]
    # The persisted student folder held a finished checkpoint of the old run: it must have been
    # trained afresh with the new rate (no warm-up at 4 steps, so step 0 runs at the full rate).
    history = json.loads((project.root / "reports/plots/dev_metric.json").read_text(encoding="utf-8"))
    assert history[0]["lr"] == pytest.approx(0.003)
    assert "training afresh" in done.stderr
    assert "Data and pipelines are up to date." in project.dvc("status").stdout
    project.git("commit", "-q", "-am", "lr 0.003")


def test_a_validation_that_passes_again_reruns_nothing_after_it(reproduced: dict) -> None:
    # mine and teacher-finetune depend on the validation verdict: GX's run times and random ids
    # must not reach that file, or every revalidation would rerun the whole pipeline.
    project = reproduced["project"]
    project.set_param("validation.max_text_chars", 50000)
    done = project.dvc("repro")
    assert stages_run(done.stdout) == ["validate"]
    assert "Data and pipelines are up to date." in project.dvc("status").stdout
    project.git("commit", "-q", "-am", "max_text_chars 50000")


def test_push_wipe_pull_restores_every_cached_output(reproduced: dict) -> None:
    project = reproduced["project"]
    root = project.root
    assert project.dvc("remote", "default").stdout.strip() == "localremote"
    before = {out: tree_digest(root / out) for out in CACHED_OUTS}
    assert all(before.values())

    project.dvc("push")
    assert (root / ".dvc-remote" / "files" / "md5").is_dir()  # the shipped remote, inside the project
    shutil.rmtree(root / ".dvc" / "cache")
    for out in CACHED_OUTS:
        shutil.rmtree(root / out)
    assert "deleted" in project.dvc("status").stdout

    project.dvc("pull")
    assert {out: tree_digest(root / out) for out in CACHED_OUTS} == before
    assert "Data and pipelines are up to date." in project.dvc("status").stdout


def test_user_dataset_add_push_and_pull_into_a_fresh_clone(reproduced: dict, tmp_path: Path) -> None:
    project = reproduced["project"]
    # Under data/raw/ (docs/data.md), so the file is a hashed dependency of the prepare stage.
    dataset = project.root / "data" / "raw" / "custom" / "my_pairs.csv"
    dataset.parent.mkdir(parents=True)
    relative = "data/raw/custom/my_pairs.csv"
    rows = ["a man is playing a guitar,a person plays an instrument,4.6"] * 3
    rows += ["a cat sleeps on the mat,a boy rides a bike,0.4"] * 3
    dataset.write_text("text_a,text_b,label\n" + "\n".join(rows) + "\n", encoding="utf-8")

    project.dvc("add", relative)
    assert "/my_pairs.csv" in (dataset.parent / ".gitignore").read_text(encoding="utf-8")
    project.git("add", f"{relative}.dvc", "data/raw/custom/.gitignore")
    project.git("commit", "-q", "-m", "add my_pairs")
    project.dvc("push", f"{relative}.dvc")
    assert "prepare" in json.loads(project.dvc("status", "--json").stdout)  # its data/raw dep changed

    # A teammate's fresh clone has the .dvc pointer but not the data; the shipped remote url is
    # relative to the checkout, so they point it at the shared folder in their .dvc/config.local.
    clone = dataclasses.replace(project, root=tmp_path / "clone")
    project.run("git", "clone", "-q", str(project.root), str(clone.root))
    assert not (clone.root / relative).exists()
    clone.dvc("remote", "modify", "--local", "localremote", "url", str(project.root / ".dvc-remote"))
    clone.dvc("pull", f"{relative}.dvc")
    assert (clone.root / relative).read_bytes() == dataset.read_bytes()

    # The built-in data is not in git: the clone fetches it, here with the first checkout's
    # data/raw as its mirror (laid out as <folder>/<file>), verified against the catalogue.
    fetched = clone.run(
        "d2llm", "fetch-data", "--mirror", str(project.root / "data" / "raw"), "--no-download"
    )
    assert "sick: 0 file(s) in place, 4 fetched" in fetched.stdout

    # The data.custom entry of docs/dvc.md prepares it.
    custom = (
        "data.custom=[{name: my_pairs, task: sym, label_kind: score, label_range: [0, 5],"
        f" files: {{train: {relative}}}}}]"
    )
    clone.run("d2llm", "-S", custom, "prepare", "--out-dir", "prepared_custom")
    manifest = json.loads((clone.root / "prepared_custom" / "manifest.json").read_text(encoding="utf-8"))
    assert "my_pairs" in json.dumps(manifest)
    assert (clone.root / "prepared_custom" / "pairs" / "my_pairs.parquet").is_file()


def test_failed_validation_stops_repro_before_mining(tiny_project, tmp_path: Path) -> None:
    project = tiny_project.clone(tmp_path / "project")
    project.set_param("validation.min_text_chars", 10_000)  # no SICK sentence is that long
    done = project.dvc("repro", check=False)
    assert done.returncode != 0
    assert stages_run(done.stdout) == ["fetch-data", "prepare", "validate"]
    assert "failed to reproduce 'validate'" in done.stderr
    assert not (project.root / "data" / "negatives").exists()
    assert not (project.root / "models").exists()
