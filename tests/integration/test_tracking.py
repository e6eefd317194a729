"""MLflow tracking, the pyfunc student, registration and promotion against a real sqlite store.

Every test gets its own store under tmp_path (``configure`` with a root), so nothing touches the
project's mlflow/ folder. The student is a tiny random BERT-backed ``D2LLMStudent`` saved with
its own ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from tiny_models import save_tiny_student

from d2llm.config import Params, PromotionConfig, TrackingConfig
from d2llm.errors import ArtifactError
from d2llm.lineage import dvc_hashes
from d2llm.tracking import (
    configure,
    log_metrics_dict,
    log_plots,
    log_table,
    log_training_curve,
    pipeline_run,
    plot_training_curve,
    resolve_tracking_uri,
    stage_run,
)
from d2llm.tracking.runs import PARENT_RUN_ENV, flatten, metric_key

# MLflow suggests type hints on predict; the model declares an explicit signature instead.
pytestmark = pytest.mark.filterwarnings("ignore:Add type hints to the `predict` method:UserWarning")


@pytest.fixture(scope="session")
def empty_store_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised, empty sqlite store: creating the schema takes seconds, copying it does not."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store_db: Path):
    """A fresh tracking store rooted in tmp_path; MLflow's global state is restored afterwards."""
    import shutil

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow").mkdir()
    shutil.copy(empty_store_db, tmp_path / "mlflow" / "mlflow.db")
    cfg = TrackingConfig(experiment="test-exp", registered_model="test-student")
    experiment_id = configure(cfg, root=tmp_path)
    yield cfg, experiment_id
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


# --------------------------------------------------------------------------- configuration


def test_resolve_tracking_uri(tmp_path: Path):
    assert (
        resolve_tracking_uri("sqlite:///mlflow/mlflow.db", tmp_path)
        == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    )
    assert (tmp_path / "mlflow").is_dir()  # sqlite cannot create the folder itself
    assert (
        resolve_tracking_uri(f"sqlite:///{tmp_path}/x.db", Path("/elsewhere")) == f"sqlite:///{tmp_path}/x.db"
    )
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("runs", tmp_path) == (tmp_path / "runs").as_uri()


def test_configure_creates_experiment_with_explicit_artifact_location(store, tmp_path: Path):
    cfg, experiment_id = store
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    experiment = mlflow.MlflowClient().get_experiment(experiment_id)
    assert experiment.name == "test-exp"
    assert experiment.artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()
    assert configure(cfg, root=tmp_path) == experiment_id  # idempotent
    with mlflow.start_run() as run:
        mlflow.log_dict({"a": 1}, "x.json")
    assert (tmp_path / "mlflow" / "artifacts" / run.info.run_id / "artifacts" / "x.json").exists()
    assert not (tmp_path / "mlruns").exists()


# --------------------------------------------------------------------------- provenance helpers


def test_flatten_and_metric_key():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}
    assert flatten({"a": {"b": 1}}, "p", sep="/") == {"p/a/b": 1}
    assert metric_key("cisi/student/ndcg@10") == "cisi/student/ndcg_10"
    assert metric_key("sick/ap: x-1.5") == "sick/ap: x-1.5"


def test_dvc_hashes_reads_deps_and_outs(tmp_path: Path):
    assert dvc_hashes(tmp_path / "dvc.lock") == {}
    (tmp_path / "dvc.lock").write_text(
        textwrap.dedent(
            """\
            schema: '2.0'
            stages:
              prepare:
                cmd: d2llm prepare
                deps:
                - path: data/raw
                  hash: md5
                  md5: aaa111.dir
                outs:
                - path: data/prepared
                  hash: md5
                  md5: bbb222.dir
              train:
                cmd: d2llm train
                params:
                  params.yaml:
                    seed: 42
                outs:
                - path: models/student
                  md5: ccc333.dir
            """
        )
    )
    assert dvc_hashes(tmp_path / "dvc.lock") == {
        "prepare:deps:data/raw": "aaa111.dir",
        "prepare:outs:data/prepared": "bbb222.dir",
        "train:outs:models/student": "ccc333.dir",
    }


# --------------------------------------------------------------------------- runs


def _git_repo(root: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
    }
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "f.txt").write_text("x")
    subprocess.run(["git", "-C", str(root), "add", "f.txt"], check=True)
    subprocess.run(["git", "-C", str(root), "commit", "-q", "-m", "init"], check=True, env=env)
    return subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_pipeline_run_nests_stage_runs_and_records_provenance(store, tmp_path: Path):
    sha = _git_repo(tmp_path)
    lock = "stages:\n  prepare:\n    cmd: x\n    outs:\n    - path: data/prepared\n      md5: abc.dir\n"
    (tmp_path / "dvc.lock").write_text(lock)
    params = Params(tracking=TrackingConfig(experiment="test-exp"))
    with pipeline_run(params, run_name="pipe", root=tmp_path) as parent:
        assert os.environ[PARENT_RUN_ENV] == parent.info.run_id
        with stage_run("prepare") as first:
            log_metrics_dict({"rows": 10})
        with stage_run("train") as second:
            pass
    assert PARENT_RUN_ENV not in os.environ  # restored on exit

    client = mlflow.MlflowClient()
    parent_run = client.get_run(parent.info.run_id)
    assert parent_run.data.tags["git.commit"] == sha
    assert parent_run.data.tags["mlflow.source.git.commit"] == sha
    assert parent_run.data.tags["git.dirty"] == "false"
    # The checkout's dvc.lock describes another run's files: nothing of it is tagged at the start
    # (the flow tags what it committed itself at the end: d2llm.lineage, tests/integration/test_flow.py).
    assert not any(tag.startswith("dvc.") for tag in parent_run.data.tags)
    assert parent_run.data.params["student.lora.r"] == "8"
    assert parent_run.data.params["promotion.tolerance"] == "0.5"
    assert parent_run.data.params["labelling.datasets"] == '["sick", "snli"]'
    for child, name in ((first, "prepare"), (second, "train")):
        run = client.get_run(child.info.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["d2llm.stage"] == name
        assert run.info.run_name == name
    assert client.get_run(first.info.run_id).data.metrics == {"rows": 10.0}
    params_json = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/params.json")
    assert params_json["student"]["lora"]["r"] == 8


def test_stage_in_a_separate_process_nests_under_the_pipeline_run(store, tmp_path: Path):
    """A DVC stage runs as its own process: it finds its parent through the environment."""
    params = Params(tracking=TrackingConfig(experiment="test-exp"))
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from d2llm.config import TrackingConfig
        from d2llm.tracking import configure, log_metrics_dict, stage_run
        configure(TrackingConfig(experiment="test-exp"), root=Path({str(tmp_path)!r}))
        with stage_run("child-process") as run:
            log_metrics_dict({{"x": 1.5}})
            print(run.info.run_id)
        """
    )
    with pipeline_run(params, run_name="pipe", root=tmp_path) as parent:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    child = mlflow.MlflowClient().get_run(out.stdout.strip().splitlines()[-1])
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.metrics == {"x": 1.5}


def test_stage_run_without_parent_is_top_level(store):
    with stage_run("alone") as run:
        pass
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert "mlflow.parentRunId" not in tags and tags["d2llm.stage"] == "alone"


# --------------------------------------------------------------------------- logging helpers


def test_log_metrics_dict_flattens_sanitises_and_skips_non_numbers(store):
    metrics = {
        "cisi": {"student": {"ndcg@10": 41.5, "note": "x"}},
        "mean_main": 60,
        "bad": float("nan"),
        "flag": True,
    }
    with stage_run("evaluate") as run:
        logged = log_metrics_dict(metrics, prefix="eval")
    assert logged == {"eval/cisi/student/ndcg_10": 41.5, "eval/mean_main": 60.0}
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.metrics == logged


def test_log_training_curve_logs_every_step(store):
    history = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "phase": "train"} for s in (10, 20, 30)]
    history.append({"step": 30, "dev_ap": 55.0})
    with stage_run("train") as run:
        assert log_training_curve(history, batch_size=2) == 7
    client = mlflow.MlflowClient()
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == [
        (10, 0.1),
        (20, 0.05),
        (30, 1 / 30),
    ]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/dev_ap")] == [30]


def test_log_training_curve_errors(store):
    with pytest.raises(Exception, match="active MLflow run"):
        log_training_curve([{"step": 1, "loss": 1.0}])
    with stage_run("train"), pytest.raises(ArtifactError, match="record 1 has no 'step'"):
        log_training_curve([{"step": 1, "loss": 1.0}, {"loss": 2.0}])


def test_tables_figures_and_plots(store, tmp_path: Path):
    history = [{"step": s, "loss": 2.0 - s / 10} for s in range(1, 6)]
    plot_file = tmp_path / "curve.png"
    figure = plot_training_curve(history, ["loss", "missing"])
    figure.savefig(plot_file)
    with stage_run("report") as run:
        log_table({"system": ["student", "teacher"], "ap": [70.0, 75.5]}, "tables/results.json")
        from d2llm.tracking import log_figure

        log_figure(figure, "figures/curve.png")
        assert log_plots([plot_file]) == ["plots/curve.png"]
        with pytest.raises(ArtifactError, match="plot file not found"):
            log_plots([tmp_path / "nope.png"])
        with pytest.raises(Exception, match=r"must end in \.json"):
            log_table({"a": [1]}, "tables/results.csv")
    table = mlflow.load_table("tables/results.json", run_ids=[run.info.run_id])
    assert table["system"].tolist() == ["student", "teacher"] and table["ap"].tolist() == [70.0, 75.5]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {"figures/curve.png"}
    assert json.loads(json.dumps(figure.axes[0].get_legend_handles_labels()[1])) == ["loss"]


def test_promotion_config_default_is_points():
    # Guard the unit convention the rule relies on: tolerance in points, main metric mean_main.
    assert PromotionConfig().tolerance == 0.5 and PromotionConfig().main_metric == "mean_main"


# --------------------------------------------------------------------------- the pyfunc student

WORDS = [
    "a",
    "the",
    "man",
    "woman",
    "person",
    "plays",
    "music",
    "guitar",
    "dog",
    "runs",
    "park",
    "what",
    "is",
    "water",
    "boils",
    "at",
    "sea",
    "level",
]
PAIRS = [
    ("a man plays a guitar", "a person plays music", "sym"),
    ("a dog runs in the park", "a woman plays music", "sym"),
    ("what is water", "water boils at sea level", "asym"),
]


def build_tiny_student(folder: Path) -> Path:
    """A random 2-layer, 32-d BERT backbone and a D2LLM student on it, saved with save_pretrained."""
    return save_tiny_student(folder, WORDS, perturb_lora=True)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.set_num_threads(1)
    return build_tiny_student(tmp_path_factory.mktemp("tiny_student"))


def _pairs_frame(rows=PAIRS):
    import pandas as pd

    return pd.DataFrame(rows, columns=["text_a", "text_b", "task"])


def _expected_scores(student_dir: Path, rows=PAIRS) -> list[float]:
    from d2llm.student.model import D2LLMStudent

    student = D2LLMStudent.from_pretrained(student_dir)
    return [float(student.score([(a, b)], task)[0]) for a, b, task in rows]


def test_pyfunc_round_trip_scores_like_the_student(store, student_dir: Path):
    from d2llm.tracking import log_student, promote

    cfg, _ = store
    version = log_student(
        student_dir,
        registered_model_name=cfg.registered_model,
        metrics={"mean_main": 50.0, "cisi/ndcg@10": 30.0},
        eval_data_id="data-1",
    )
    assert str(version.version) == "1"
    assert version.tags["metric.mean_main"] == "50.0" and version.tags["metric.cisi/ndcg_10"] == "30.0"
    assert version.tags["d2llm.with_index"] == "false" and version.tags["d2llm.eval_data"] == "data-1"
    run = mlflow.MlflowClient().get_run(version.run_id)
    assert run.data.tags["d2llm.stage"] == "register" and run.data.metrics["eval/mean_main"] == 50.0

    client = mlflow.MlflowClient()
    decision = promote(
        client,
        cfg.registered_model,
        version.version,
        {"mean_main": 50.0, "cisi/ndcg@10": 30.0},
        PromotionConfig(),
    )
    assert decision.promote
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registered_model}@challenger")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["text_a", "text_b", "task"]
    out = model.predict(_pairs_frame())
    assert list(out.columns) == ["score"]
    assert out["score"].tolist() == pytest.approx(_expected_scores(student_dir), abs=1e-5)
    # The backbone was a local folder: it ships inside the model.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{cfg.registered_model}@champion"))
    assert (local / "artifacts" / "backbone" / "config.json").exists()
    # Models from code: the logged model holds no pickle at all, only code, JSON and safetensors.
    assert not [p for p in local.rglob("*") if p.suffix in {".pkl", ".pickle", ".pt", ".bin"}]


MALFORMED = [
    ([("a", "b")], ["text_a", "text_b"], "missing inputs"),
    ([("a man", "a dog", "both")], ["text_a", "text_b", "task"], "'both' is not one of"),
    ([("a man", "  ", "sym")], ["text_a", "text_b", "task"], "text is empty"),
    ([(3, "a dog", "sym")], ["text_a", "text_b", "task"], "text_a"),
    ([("what is water",)], ["query"], "missing inputs"),  # a pair-only model has no search
    ([], ["text_a", "text_b", "task"], "no rows"),
]


def test_pyfunc_rejects_malformed_input_with_invalid_parameter_value(store, student_dir):
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    from d2llm.tracking import log_student

    cfg, _ = store
    version = log_student(student_dir, registered_model_name=cfg.registered_model)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registered_model}/{version.version}")
    for rows, columns, message in MALFORMED:
        frame = pd.DataFrame(rows, columns=columns).astype({c: "object" for c in columns})
        with pytest.raises(MlflowException, match=message) as info:
            model.predict(frame)
        assert info.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE), (rows, info.value.message)


def test_pyfunc_with_index_searches_like_d2llm_search(store, student_dir: Path, tmp_path: Path):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from d2llm.search import build_index, load_index, search
    from d2llm.student.model import D2LLMStudent
    from d2llm.tracking import log_student

    cfg, _ = store
    student = D2LLMStudent.from_pretrained(student_dir)
    corpus = pd.DataFrame(
        {
            "doc_id": ["d1", "d2", "d3", "d4"],
            "text": [
                "water boils at sea level",
                "a dog runs in the park",
                "a man plays a guitar",
                "the woman plays music",
            ],
        }
    )
    build_index(student, corpus, tmp_path / "index", model_version="test")
    version = log_student(
        student_dir,
        tmp_path / "index",
        cfg.registered_model,
        search_settings={"default_k": 3, "lexical_weight": 1.0},
    )
    assert version.tags["d2llm.with_index"] == "true"
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registered_model}/{version.version}")

    out = model.predict(pd.DataFrame({"query": ["what is water", "a dog"], "k": [2, 4]}))
    assert list(out.columns) == ["query", "rank", "doc_id", "score"]
    assert out["query"].tolist() == ["what is water"] * 2 + ["a dog"] * 4
    assert out["rank"].tolist() == [1, 2, 1, 2, 3, 4]
    index = load_index(tmp_path / "index", student)
    for query, k in (("what is water", 2), ("a dog", 4)):
        hits = search(student, index, query, k=k, lexical_weight=1.0)  # hybrid, as logged
        got = out[out["query"] == query]
        assert got["doc_id"].tolist() == [h.doc_id for h in hits]
        assert got["score"].tolist() == pytest.approx([h.score for h in hits], abs=1e-5)
    assert len(model.predict(pd.DataFrame({"query": ["a man"]}))) == 3  # default_k
    # The same model still scores pairs.
    assert model.predict(_pairs_frame())["score"].tolist() == pytest.approx(
        _expected_scores(student_dir), abs=1e-5
    )
    for frame, message in (
        (pd.DataFrame({"query": ["a man"], "k": [0]}), r"'k' row 0: expected an integer in \[1, 1000\]"),
        (pd.DataFrame({"query": [""]}), "text is empty"),
        (pd.DataFrame({"query": ["a"], "text_a": ["a"], "text_b": ["b"], "task": ["sym"]}), "not both"),
        (pd.DataFrame({"text_a": ["a"], "task": ["sym"]}), r"missing column\(s\) \['text_b'\]"),
    ):
        with pytest.raises(MlflowException, match=message):
            model.predict(frame)


# --------------------------------------------------------------------------- registration


def _versions(name: str) -> list:
    return mlflow.MlflowClient().search_model_versions(f"name='{name}'")


def test_registration_is_all_or_nothing(store, student_dir: Path, tmp_path: Path):
    import shutil

    from mlflow.exceptions import MlflowException

    from d2llm.tracking import log_student

    cfg, _ = store
    with pytest.raises(ArtifactError, match="student folder not found"):
        log_student(tmp_path / "missing", registered_model_name=cfg.registered_model)
    (tmp_path / "not_a_student").mkdir()
    (tmp_path / "not_a_student" / "x.txt").write_text("x")
    with pytest.raises(ArtifactError, match=r"student.json is missing"):
        log_student(tmp_path / "not_a_student", registered_model_name=cfg.registered_model)

    # Logged, but broken weights: the load-back check fails before anything is registered.
    broken = Path(shutil.copytree(student_dir, tmp_path / "broken"))
    (broken / "heads.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="does not load or predict"):
        log_student(broken, registered_model_name=cfg.registered_model)
    assert _versions(cfg.registered_model) == []

    # An invalid tag key fails the registration itself: the version and its tags are one transaction.
    with pytest.raises(MlflowException, match="Invalid value"):
        log_student(student_dir, registered_model_name=cfg.registered_model, version_tags={"bad@key": "x"})
    assert _versions(cfg.registered_model) == []

    good = log_student(student_dir, registered_model_name=cfg.registered_model)
    assert [str(v.version) for v in _versions(cfg.registered_model)] == [str(good.version)]


# --------------------------------------------------------------------------- model card

REPO = Path(__file__).resolve().parents[2]
CARD_MANIFEST = {"pairs": {"sick": {"source": "sick"}, "sick_r": {"source": "sick"}}, "ir": []}
CARD_RESULTS = {
    "datasets": {
        "sick": {
            "main_metric": "ap",
            "metrics": {"bi-encoder": {"ap": 70.0}, "teacher": {"ap": 80.0}, "student": {"ap": 74.5}},
            "vs_bi_encoder": {"student": {"delta": 4.5, "ci95": [3.1, 5.9]}},
        }
    },
    "summary": {"bi-encoder": {"mean_main": 70.0}, "student": {"mean_main": 74.5}},
    "flat": {"mean_main": 55.0, "sick/ap": 80.0},
}


def _card_inputs(root: Path) -> None:
    """A prepared manifest (SICK) under ``root/data/prepared`` and the catalogue under ``root/data/raw``."""
    import shutil

    (root / "data" / "prepared").mkdir(parents=True, exist_ok=True)
    (root / "data" / "prepared" / "manifest.json").write_text(json.dumps(CARD_MANIFEST))
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "data" / "raw" / "catalog.yaml", root / "data" / "raw" / "catalog.yaml")


def _model_files(name: str, version: str | int, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dst)))


def test_a_registered_version_carries_its_model_card(store, student_dir: Path, tmp_path: Path):
    from d2llm.data.catalog import load_catalog
    from d2llm.tracking import log_student, promote
    from d2llm.tracking.model_card import build_model_card

    cfg, _ = store
    name, client = cfg.registered_model, mlflow.MlflowClient()
    params = Params.model_validate(
        {"labelling": {"datasets": ["sick"]}, "evaluation": {"pair_datasets": ["sick"], "ir_datasets": []}}
    )
    catalog = load_catalog(REPO / "data" / "raw" / "catalog.yaml")
    card = build_model_card(params, CARD_RESULTS, CARD_MANIFEST, catalog, model_name=name)
    version = log_student(student_dir, registered_model_name=name, metrics={"mean_main": 55.0}, card=card)

    # README.md sits next to the pyfunc files of the registered model, and holds the card.
    files = _model_files(name, version.version, tmp_path / "v1")
    assert {"MLmodel", "README.md", "artifacts"} <= {p.name for p in files.iterdir()}
    readme = (files / "README.md").read_text(encoding="utf-8")
    assert readme == card.text
    assert "**Use: non-commercial, share-alike" in readme
    assert "| sick | ap | 70.00 | 80.00 | 74.50 | +4.50 [+3.10, +5.90] * |" in readme
    assert version.description == card.summary

    # Promotion adds its decision after the summary; a later decision replaces it, the summary stays.
    assert promote(client, name, version.version, {"mean_main": 55.0}, PromotionConfig()).promote
    described = client.get_model_version(name, version.version).description
    assert described.startswith(card.summary + "\n\nPromotion: v1 PROMOTED to champion")
    second = log_student(student_dir, registered_model_name=name, metrics={"mean_main": 50.0}, card=card)
    for _ in range(2):
        assert not promote(client, name, second.version, {"mean_main": 50.0}, PromotionConfig()).promote
        described = client.get_model_version(name, second.version).description
        assert described.startswith(card.summary + "\n\nPromotion: v2 NOT promoted against champion v1")
        assert described.count("Promotion: ") == 1

    # Registered without a card (a bare library call), a version still says what is not known.
    bare = log_student(student_dir, registered_model_name=name)
    readme = (_model_files(name, bare.version, tmp_path / "v3") / "README.md").read_text(encoding="utf-8")
    assert readme.startswith(f"# {name}\n\n**Use: unknown") and bare.description.startswith("Use: unknown")


def test_a_model_card_that_cannot_be_built_registers_nothing(store, student_dir: Path, tmp_path: Path):
    from d2llm.tracking.registry import register_student

    cfg, _ = store
    params = Params(tracking=cfg)
    (tmp_path / "metrics.json").write_text(json.dumps(CARD_RESULTS))
    with pytest.raises(ArtifactError, match=r"manifest\.json not found"):  # nothing prepared
        register_student(params, student_dir, metrics_file=tmp_path / "metrics.json")
    assert _versions(cfg.registered_model) == []

    _card_inputs(tmp_path)
    version = register_student(params, student_dir, metrics_file=tmp_path / "metrics.json")
    assert "Use: non-commercial, share-alike" in version.description
    assert "student 74.50 vs bi-encoder 70.00" in version.description


# --------------------------------------------------------------------------- promotion


@pytest.fixture
def registered(store, student_dir: Path):
    """One logged model registered as versions 1..4 (promotion does not look at the weights)."""
    from d2llm.tracking import log_student

    cfg, _ = store
    first = log_student(student_dir, registered_model_name=cfg.registered_model)
    source = f"models:/{cfg.registered_model}/{first.version}"
    for _ in range(3):
        mlflow.register_model(source, cfg.registered_model)
    return cfg.registered_model


def _state(client, name: str) -> dict:
    model = client.get_registered_model(name)
    versions = {
        str(v.version): (dict(v.tags), v.description) for v in client.search_model_versions(f"name='{name}'")
    }
    return {"aliases": dict(model.aliases), "versions": versions}


BASE = {"mean_main": 60.0, "sick/ap": 70.0, "cisi/ndcg@10": 30.0}


def test_promotion_first_better_worse_and_idempotent(registered: str):
    from d2llm.tracking import promote

    client, name, cfg = mlflow.MlflowClient(), registered, PromotionConfig(tolerance=0.5)

    first = promote(client, name, 1, BASE, cfg)
    assert first.promote and "first model" in first.reason
    assert client.get_model_version_by_alias(name, "champion").version in (1, "1")

    better = {"mean_main": 61.0, "sick/ap": 69.6, "cisi/ndcg@10": 33.0}
    decision = promote(client, name, "2", better, cfg)
    assert decision.promote and decision.main_delta == pytest.approx(1.0)
    aliases = client.get_registered_model(name).aliases
    assert aliases == {"champion": "2", "challenger": "2", "previous-champion": "1"} or aliases == {
        "champion": 2,
        "challenger": 2,
        "previous-champion": 1,
    }
    v2 = client.get_model_version(name, "2")
    assert v2.tags["d2llm.promotion.decision"] == "promoted"
    assert v2.tags["d2llm.promotion.against_version"] == "1"
    assert v2.tags["metric.cisi/ndcg_10"] == "33.0"
    numbers = json.loads(v2.tags["d2llm.promotion.numbers"])
    assert numbers["champion"]["mean_main"] == 60.0 and numbers["challenger"]["mean_main"] == 61.0
    assert numbers["deltas"]["sick/ap"] == pytest.approx(-0.4)
    assert "PROMOTED" in v2.description and "v1" in v2.description

    # Idempotent: the same call again changes nothing and does not promote twice.
    before = _state(client, name)
    again = promote(client, name, "2", better, cfg)
    assert again.promote and again.reason == decision.reason
    assert _state(client, name) == before

    # Worse main metric: refused, champion kept, challenger moves; twice gives the same state.
    worse = {"mean_main": 60.5, "sick/ap": 75.0, "cisi/ndcg@10": 40.0}
    refused = promote(client, name, "3", worse, cfg)
    assert not refused.promote and "did not improve" in refused.reason
    state = _state(client, name)
    assert {k: str(v) for k, v in state["aliases"].items()} == {
        "champion": "2",
        "challenger": "3",
        "previous-champion": "1",
    }
    assert state["versions"]["3"][0]["d2llm.promotion.decision"] == "refused"
    assert "NOT promoted" in state["versions"]["3"][1]
    promote(client, name, "3", worse, cfg)
    assert _state(client, name) == state

    # Better main metric but one task regresses beyond tolerance: refused.
    regress = {"mean_main": 70.0, "sick/ap": 68.0, "cisi/ndcg@10": 40.0}
    refused = promote(client, name, "4", regress, cfg)
    assert not refused.promote and refused.regressions == pytest.approx({"sick/ap": -1.6})
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"


def test_promotion_with_an_evaluation_function_evaluates_both_versions(registered: str):
    from d2llm.tracking import promote

    client, name, cfg = mlflow.MlflowClient(), registered, PromotionConfig()
    by_version = {
        "1": {"mean_main": 50.0, "sts/spearman": 80.0},
        "2": {"mean_main": 52.0, "sts/spearman": 79.8},
    }
    calls: list[str] = []

    def evaluate(uri: str) -> dict[str, float]:
        calls.append(uri)
        return by_version[uri.rsplit("/", 1)[1]]

    assert promote(client, name, "1", evaluate, cfg).promote
    assert calls == [f"models:/{name}/1"]
    assert promote(client, name, "2", evaluate, cfg).promote
    assert calls[1:] == [f"models:/{name}/2", f"models:/{name}/1"]  # champion re-evaluated
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"


def test_promotion_refuses_metrics_from_different_evaluation_data(registered: str):
    from d2llm.tracking import promote

    client, name = mlflow.MlflowClient(), registered
    promote(client, name, "1", BASE, PromotionConfig(), eval_data_id="data-A")
    with pytest.raises(ArtifactError, match="evaluated on 'data-A'"):
        promote(client, name, "2", {**BASE, "mean_main": 99.0}, PromotionConfig(), eval_data_id="data-B")
    # metrics with no data id are not taken as measured on the champion's data either
    with pytest.raises(ArtifactError, match="evaluated on 'data-A', the challenger on None"):
        promote(client, name, "2", {**BASE, "mean_main": 99.0}, PromotionConfig())
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def test_cli_register_and_promote(store, student_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    from d2llm.cli import main

    (tmp_path / "params.yaml").write_text(
        "tracking:\n  experiment: test-exp\n  registered_model: cli-student\npromotion:\n  tolerance: 1.0\n"
    )
    _card_inputs(tmp_path)  # what the model card is built from
    results = tmp_path / "metrics.json"
    validation = {"id": "validation-pairs-1"}  # what `d2llm evaluate` writes: the validation pairs' id
    results.write_text(
        json.dumps({"flat": {"mean_main": 55.0, "cisi/ndcg@10": 31.0}, "validation_data": validation})
    )
    assert (
        main(
            [
                "--params",
                "params.yaml",
                "register",
                "--student-dir",
                str(student_dir),
                "--metrics",
                str(results),
            ]
        )
        == 0
    )
    assert main(["--params", "params.yaml", "promote"]) == 0
    out = capsys.readouterr().out
    assert "registered cli-student version 1" in out and "cli-student v1 promoted to champion" in out
    version = mlflow.MlflowClient().get_model_version_by_alias("cli-student", "champion")
    assert version.tags["metric.cisi/ndcg_10"] == "31.0"
    assert version.tags["d2llm.eval_data"] == "validation-pairs-1"
    assert version.description.startswith("Use: ")  # the model card's summary

    results.write_text(
        json.dumps({"flat": {"mean_main": 56.0, "cisi/ndcg@10": 29.5}, "validation_data": validation})
    )  # cisi -1.5 > tolerance, on the same validation pairs
    assert (
        main(
            [
                "--params",
                "params.yaml",
                "register",
                "--student-dir",
                str(student_dir),
                "--metrics",
                str(results),
            ]
        )
        == 0
    )
    assert main(["--params", "params.yaml", "promote", "--version", "2"]) == 0
    assert "cli-student v2 not promoted" in capsys.readouterr().out
    assert str(mlflow.MlflowClient().get_model_version_by_alias("cli-student", "champion").version) == "1"
    assert main(["--params", "params.yaml", "register", "--metrics", str(tmp_path / "none.json")]) == 1
    assert "evaluation results not found" in capsys.readouterr().err


@pytest.mark.slow
def test_a_registration_killed_at_any_moment_leaves_no_partial_version(
    store, student_dir: Path, tmp_path: Path
):
    """SIGKILL `d2llm register` at several moments: every version that exists is whole."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg, _ = store
    (tmp_path / "params.yaml").write_text(
        f"tracking:\n  experiment: {cfg.experiment}\n  registered_model: {cfg.registered_model}\n"
    )
    _card_inputs(tmp_path)
    results = tmp_path / "metrics.json"
    results.write_text(json.dumps({"flat": {"mean_main": 55.0, "sick/ap": 80.0}}))
    command = [sys.executable, "-m", "d2llm.cli", "register", "--student-dir", str(student_dir),
               "--metrics", str(results)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true"}

    started = time.monotonic()
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    full = time.monotonic() - started
    for fraction in (0.5, 0.7, 0.8, 0.9, 0.95):
        process = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(full * fraction)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{cfg.registered_model}'")
    assert versions, "the uninterrupted registration must have left one version"
    for version in versions:
        tags = client.get_model_version(cfg.registered_model, version.version).tags
        assert tags.get("metric.mean_main") == "55.0", f"v{version.version} is missing its metrics: {tags}"
        assert "d2llm.run_id" in tags
        assert version.description.startswith("Use: "), f"v{version.version} has no model card summary"
