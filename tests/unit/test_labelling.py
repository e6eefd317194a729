"""Training groups and resumable teacher labelling, including a real kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from d2llm.config import TeacherConfig, params_from_dict
from d2llm.errors import ArtifactError, DataError
from d2llm.labelling import MANIFEST_FILE, build_groups, label_groups, load_labels
from d2llm.teachers.factory import load_teacher
from d2llm.teachers.per_task import PerTaskTeacher

torch.set_num_threads(1)

WORDS = ["man", "woman", "child", "dog", "cat", "bird", "horse", "car", "guitar", "ball", "book", "food"]


def _negatives(n=10, k=2, dataset="toy", task="sym") -> pd.DataFrame:
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        negs = [f"a {WORDS[(i + j + 1) % len(WORDS)]} sits on the mat" for j in range(k)]
        rows.append((dataset, task, f"a {w} plays in the park {i}", f"the {w} is playing {i}", negs, "both"))
    return pd.DataFrame(rows, columns=["dataset", "task", "anchor", "positive", "negatives", "method"])


@pytest.fixture(scope="module")
def teacher_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    cfg = TeacherConfig(kind="cross_encoder", model=str(tiny_bert_dir), max_length=32, batch_size=4)
    out = tmp_path_factory.mktemp("teacher")
    load_teacher(cfg, None, "cpu").save_pretrained(out)
    return out


def _params(group_size=2, shard_groups=1, seed=42) -> dict:
    return {
        "seed": seed,
        "device": "cpu",
        "teacher": {"batch_size": 4},
        "labelling": {"group_size": group_size, "shard_groups": shard_groups},
    }


# --------------------------------------------------------------------------- groups


def test_groups_have_distinct_anchors_and_positives_one_dataset_each():
    neg = pd.concat([_negatives(7, dataset="a"), _negatives(5, dataset="b", task="asym")], ignore_index=True)
    dup = neg.iloc[[0]].assign(positive="another positive")  # same anchor twice: never in one group
    neg = pd.concat([neg, dup], ignore_index=True)
    groups = build_groups(neg, group_size=3, seed=1)
    assert groups["group_id"].tolist() == list(range(len(groups)))
    assert len(groups) == 2 + 1  # a: 8 rows -> 2 groups, b: 5 rows -> 1 group
    assert groups.attrs["dropped_rows"] == 13 - 9
    for g in groups.itertuples():
        assert len(set(g.anchors)) == 3 and len(set(g.positives)) == 3
        assert g.task == ("sym" if g.dataset == "a" else "asym")
        expected = neg[neg["dataset"] == g.dataset].set_index(["anchor", "positive"])["negatives"]
        for a, p, n in zip(g.anchors, g.positives, g.negatives, strict=True):
            assert list(expected[(a, p)]) == n
    again = build_groups(neg, group_size=3, seed=1)
    assert again.equals(groups)
    assert not build_groups(neg, group_size=3, seed=2)["anchors"].equals(groups["anchors"])
    assert len(build_groups(neg, 3, seed=1, max_groups_per_dataset=1)) == 2


def test_negative_lists_of_different_lengths_are_a_data_error():
    neg = _negatives(4)
    neg.at[0, "negatives"] = ["only one"]
    with pytest.raises(DataError, match="different lengths"):
        build_groups(neg, 2, seed=0)


# --------------------------------------------------------------------------- labelling


def test_label_shapes_and_values_match_direct_teacher_scores(teacher_dir, tmp_path):
    _negatives(5).to_parquet(tmp_path / "neg.parquet")
    params = params_from_dict(_params(group_size=2, shard_groups=1))
    summary = label_groups(params, tmp_path / "neg.parquet", teacher_dir, tmp_path / "labels")
    assert summary["groups"] == 2 and summary["dropped_rows"] == 1 and summary["scored_shards"] == 2
    labels = load_labels(tmp_path / "labels")
    assert labels.in_batch.shape == (2, 2, 2, 2)
    assert labels.hard.shape == (2, 2, 3, 2)
    assert labels.feature_cos.shape == (2, 2, 3, 3)
    assert labels.group_id.tolist() == [0, 1]
    teacher = load_teacher(params.teacher, teacher_dir, "cpu")
    for g in labels.groups.itertuples():
        for i, a in enumerate(g.anchors):
            cands = [g.positives[i], *g.negatives[i]]
            out = teacher.score([(a, c) for c in cands], "sym", with_features=True)
            torch.testing.assert_close(labels.hard[g.group_id, i], out.logits, atol=1e-5, rtol=1e-4)
            feats = torch.nn.functional.normalize(out.features, dim=-1)
            torch.testing.assert_close(
                labels.feature_cos[g.group_id, i], feats @ feats.T, atol=1e-5, rtol=1e-4
            )
            cross = teacher.score([(a, p) for p in g.positives], "sym").logits
            torch.testing.assert_close(labels.in_batch[g.group_id, i], cross, atol=1e-5, rtol=1e-4)
            assert torch.equal(
                labels.in_batch[g.group_id, i, i], labels.hard[g.group_id, i, 0]
            )  # scored once


def test_rerun_of_complete_labels_scores_nothing_and_stale_dir_is_refused(teacher_dir, tmp_path):
    _negatives(6).to_parquet(tmp_path / "neg.parquet")
    out = tmp_path / "labels"
    label_groups(params_from_dict(_params()), tmp_path / "neg.parquet", teacher_dir, out)
    again = label_groups(params_from_dict(_params()), tmp_path / "neg.parquet", teacher_dir, out)
    assert again["scored_shards"] == 0 and again["skipped_shards"] == 3
    other_seed = params_from_dict(_params(seed=7))
    with pytest.raises(ArtifactError, match="holds other labels"):
        label_groups(other_seed, tmp_path / "neg.parquet", teacher_dir, out)
    redone = label_groups(other_seed, tmp_path / "neg.parquet", teacher_dir, out, overwrite=True)
    assert redone["scored_shards"] == 3


def test_damaged_shard_is_rescored_and_incomplete_labels_cannot_be_loaded(teacher_dir, tmp_path):
    _negatives(6).to_parquet(tmp_path / "neg.parquet")
    out = tmp_path / "labels"
    params = params_from_dict(_params())
    label_groups(params, tmp_path / "neg.parquet", teacher_dir, out)
    reference = load_labels(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    (out / MANIFEST_FILE).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ArtifactError, match="incomplete"):
        load_labels(out)
    (out / "scores-00001.safetensors").write_bytes(b"not a safetensors file")
    summary = label_groups(params, tmp_path / "neg.parquet", teacher_dir, out)
    assert summary["scored_shards"] == 1 and summary["skipped_shards"] == 2
    assert torch.equal(load_labels(out).in_batch, reference.in_batch)


def test_a_truncated_shard_of_complete_labels_is_found_named_and_rescored(teacher_dir, tmp_path):
    """A finished labels folder whose shard was cut short (disk full, a bad copy): `label` must
    not call it current, and `load_labels` must name the shard and the command that repairs it."""
    _negatives(6).to_parquet(tmp_path / "neg.parquet")
    out = tmp_path / "labels"
    params = params_from_dict(_params())
    label_groups(params, tmp_path / "neg.parquet", teacher_dir, out)
    reference = load_labels(out)
    assert len(json.loads((out / MANIFEST_FILE).read_text())["shard_sha256"]) == 3
    shard = out / "scores-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=r"scores-00002\.safetensors .* corrupt.*run `d2llm label`"):
        load_labels(out)
    summary = label_groups(params, tmp_path / "neg.parquet", teacher_dir, out)
    assert summary["scored_shards"] == 1 and summary["skipped_shards"] == 2
    assert torch.equal(load_labels(out).hard, reference.hard)


def test_shards_scored_in_another_number_format_are_not_mixed(teacher_dir, tmp_path, monkeypatch):
    """Labelling begun with bf16 (a CPU with it, or $D2LLM_CPU_BF16=on) and resumed where it runs
    in float32 would mix two number formats: refused, nothing changed; --overwrite scores all."""
    _negatives(6).to_parquet(tmp_path / "neg.parquet")
    out = tmp_path / "labels"
    raw = {**_params(), "labelling": {**_params()["labelling"], "quantization": "bf16"}}
    monkeypatch.setenv("D2LLM_CPU_BF16", "on")
    label_groups(params_from_dict(raw), tmp_path / "neg.parquet", teacher_dir, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["scoring"]["dtype"] == "bfloat16 (autocast)"
    (out / MANIFEST_FILE).write_text(json.dumps({**manifest, "complete": False}))  # as if killed
    (out / "scores-00002.safetensors").unlink()
    kept = {p.name: p.read_bytes() for p in out.glob("scores-*.safetensors")}

    monkeypatch.setenv("D2LLM_CPU_BF16", "off")  # the machine it resumes on has no bf16
    for _ in range(2):  # the record of the first format survives a refused attempt
        with pytest.raises(ArtifactError, match=r"must not mix number formats.*--overwrite"):
            label_groups(params_from_dict(raw), tmp_path / "neg.parquet", teacher_dir, out)
    assert {p.name: p.read_bytes() for p in out.glob("scores-*.safetensors")} == kept

    redone = label_groups(params_from_dict(raw), tmp_path / "neg.parquet", teacher_dir, out, overwrite=True)
    assert redone["scored_shards"] == 3
    assert json.loads((out / MANIFEST_FILE).read_text())["scoring"]["dtype"] == "float32"
    monkeypatch.setenv("D2LLM_CPU_BF16", "on")  # complete labels are reused wherever they were made
    assert (
        label_groups(params_from_dict(raw), tmp_path / "neg.parquet", teacher_dir, out)["scored_shards"] == 0
    )


def test_labels_fused_with_another_bi_encoder_are_not_current(teacher_dir, tiny_bert_dir, tmp_path):
    """With teacher.fusion the labels mix in the student's backbone read as a bi-encoder: labels
    made at another student.max_length are other labels, refused unless overwritten."""
    import shutil

    from d2llm.teachers.dev_report import write_dev_report
    from d2llm.teachers.fusion import FusedScorer, FusionWeights

    fused_dir = tmp_path / "teacher"
    shutil.copytree(teacher_dir, fused_dir)
    weights = FusionWeights(weight=0.5, teacher_mean=0.0, teacher_std=1.0, cosine_mean=0.5, cosine_std=0.1)
    write_dev_report(fused_dir, {"fusion": FusedScorer({"toy": weights}, {"toy": "sym"}).to_json()})
    _negatives(4).to_parquet(tmp_path / "neg.parquet")
    raw = _params(group_size=2, shard_groups=2)
    raw["teacher"].update(fusion="biencoder")
    raw["student"] = {"backbone": str(tiny_bert_dir), "max_length": 32}
    out = tmp_path / "labels"
    label_groups(params_from_dict(raw), tmp_path / "neg.parquet", fused_dir, out)
    assert json.loads((out / MANIFEST_FILE).read_text())["fusion_encoder"]["max_length"] == 32
    raw["student"]["max_length"] = 16
    shorter = params_from_dict(raw)
    with pytest.raises(ArtifactError, match="holds other labels"):
        label_groups(shorter, tmp_path / "neg.parquet", fused_dir, out)
    assert (
        label_groups(shorter, tmp_path / "neg.parquet", fused_dir, out, overwrite=True)["scored_shards"] == 1
    )


def test_foreign_directory_is_refused(teacher_dir, tmp_path):
    _negatives(4).to_parquet(tmp_path / "neg.parquet")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"has no labels\.json"):
        label_groups(params_from_dict(_params()), tmp_path / "neg.parquet", teacher_dir, tmp_path / "labels")


SCRIPT = """
import json, sys, time
import torch
torch.set_num_threads(1)
from d2llm.config import params_from_dict
from d2llm.labelling import label_groups
from d2llm.teachers.factory import load_teacher

params = params_from_dict(json.loads(sys.argv[1]))
teacher = load_teacher(params.teacher, sys.argv[3], "cpu")
score = teacher.score

def slow_score(*args, **kwargs):  # slows the run down enough to kill it between shards
    time.sleep(0.5)
    return score(*args, **kwargs)

teacher.score = slow_score
label_groups(params, sys.argv[2], sys.argv[3], sys.argv[4], teacher=teacher)
"""


def test_killed_labelling_resumes_to_the_same_tensors(teacher_dir, tmp_path):
    _negatives(10).to_parquet(tmp_path / "neg.parquet")
    raw = _params(group_size=2, shard_groups=1)  # 5 groups -> 5 shards
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SCRIPT,
            json.dumps(raw),
            str(tmp_path / "neg.parquet"),
            str(teacher_dir),
            str(killed),
        ],
        env={**os.environ, "TQDM_DISABLE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = killed / "scores-00000.safetensors"
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert first.exists(), err.decode()[-2000:]
    assert not json.loads((killed / MANIFEST_FILE).read_text())["complete"]
    assert not (killed / "scores-00004.safetensors").exists()
    first_mtime = first.stat().st_mtime_ns

    params = params_from_dict(raw)
    resumed = label_groups(params, tmp_path / "neg.parquet", teacher_dir, killed)
    assert resumed["skipped_shards"] >= 1 and resumed["scored_shards"] >= 1
    assert first.stat().st_mtime_ns == first_mtime  # the finished shard was reused, not rewritten
    assert not list(killed.glob("*.tmp"))

    label_groups(params, tmp_path / "neg.parquet", teacher_dir, tmp_path / "straight")
    a, b = load_labels(killed), load_labels(tmp_path / "straight")
    assert a.groups.equals(b.groups)
    for name in ("group_id", "in_batch", "hard", "feature_cos"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_fused_labels_mix_the_dev_chosen_weight_of_bi_encoder_cosine(teacher_dir, tiny_bert_dir, tmp_path):
    """teacher.fusion: labels are (1 - w) teacher log-odds + w cosine moved onto the teacher's scale."""
    import shutil

    import numpy as np

    from d2llm.biencoder import MeanPoolEncoder
    from d2llm.teachers.dev_report import write_dev_report
    from d2llm.teachers.fusion import FusedScorer, FusionWeights

    fused_dir = tmp_path / "teacher"
    shutil.copytree(teacher_dir, fused_dir)
    weights = FusionWeights(weight=0.3, teacher_mean=0.5, teacher_std=2.0, cosine_mean=0.4, cosine_std=0.1)
    fusion = FusedScorer({"toy": weights}, {"toy": "sym"})
    write_dev_report(fused_dir, {"dev_after": {"toy/ap": 90.0}, "dev_baseline": {"toy/ap": 80.0},
                                 "fusion": fusion.to_json()})  # fmt: skip
    _negatives(4).to_parquet(tmp_path / "neg.parquet")
    raw = _params(group_size=2, shard_groups=2)
    raw["teacher"].update(fusion="biencoder")
    raw["student"] = {"backbone": str(tiny_bert_dir), "max_length": 32}
    params = params_from_dict(raw)
    summary = label_groups(params, tmp_path / "neg.parquet", fused_dir, tmp_path / "labels")
    assert summary["distilled"] == {"toy": "distilled: gating off (labelling.min_teacher_gain: null)"}
    labels = load_labels(tmp_path / "labels")

    teacher = load_teacher(params.teacher, fused_dir, "cpu")
    encoder = MeanPoolEncoder.from_ref(str(tiny_bert_dir), max_length=32)
    for g in labels.groups.itertuples():
        for i, a in enumerate(g.anchors):
            cands = [g.positives[i], *g.negatives[i]]
            logits = teacher.score([(a, c) for c in cands], "sym").logits
            d = (logits[:, 0] - logits[:, 1]).numpy()
            vec_a, vec_c = encoder.encode([a]), encoder.encode(cands)
            cosine = (vec_a * vec_c).sum(-1).numpy()
            expected = 0.7 * d + 0.3 * (0.5 + 2.0 * (cosine - 0.4) / 0.1)  # by hand
            got = labels.hard[g.group_id, i]
            np.testing.assert_allclose((got[:, 0] - got[:, 1]).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_gating_labels_only_datasets_the_teacher_wins_on_dev(teacher_dir, tmp_path):
    import shutil

    from d2llm.teachers.dev_report import write_dev_report

    gated_dir = tmp_path / "teacher"
    shutil.copytree(teacher_dir, gated_dir)
    report = {
        "dev_after": {"win/ap": 85.0, "lose/ap": 70.0},
        "dev_baseline": {"win/ap": 80.0, "lose/ap": 75.0},
    }
    write_dev_report(gated_dir, report)
    neg = pd.concat(
        [_negatives(4, dataset="win"), _negatives(4, dataset="lose"), _negatives(4, dataset="unmeasured")]
    )
    neg.to_parquet(tmp_path / "neg.parquet")
    raw = _params(group_size=2, shard_groups=4)
    raw["labelling"]["min_teacher_gain"] = 1.0
    summary = label_groups(params_from_dict(raw), tmp_path / "neg.parquet", gated_dir, tmp_path / "labels")
    assert summary["distilled"]["win"].startswith("distilled: teacher 85.00 vs bi-encoder 80.00")
    assert summary["distilled"]["lose"].startswith("skipped: teacher 70.00 vs bi-encoder 75.00")
    assert summary["distilled"]["unmeasured"].startswith("skipped: the teacher was not measured")
    assert set(load_labels(tmp_path / "labels").groups["dataset"]) == {"win"}

    raw["labelling"]["min_teacher_gain"] = 10.0  # nothing left worth distilling: a clear error
    with pytest.raises(DataError, match="beats the bi-encoder on no labelling dataset"):
        label_groups(params_from_dict(raw), tmp_path / "neg.parquet", gated_dir, tmp_path / "labels2")


def test_a_per_task_teacher_labels_each_group_with_the_part_of_its_task(tiny_bert_dir, tmp_path):
    """Sym groups are scored by the sym teacher, asym (QA) groups by the asym one
    (``teacher.finetune.per_task``), and nothing else in labelling knows there are two."""
    cfg = TeacherConfig(kind="cross_encoder", model=str(tiny_bert_dir), max_length=32, batch_size=4)
    parts = {"sym": load_teacher(cfg, None, "cpu"), "asym": load_teacher(cfg, None, "cpu")}
    with torch.no_grad():
        parts["asym"].head.weight.mul_(-3.0)  # another judge
    PerTaskTeacher(parts).save_pretrained(tmp_path / "teacher")
    negatives = pd.concat([_negatives(4), _negatives(4, dataset="qa", task="asym")], ignore_index=True)
    negatives.to_parquet(tmp_path / "neg.parquet")
    params = params_from_dict(_params(group_size=2, shard_groups=1))
    label_groups(params, tmp_path / "neg.parquet", tmp_path / "teacher", tmp_path / "labels")
    labels = load_labels(tmp_path / "labels")
    assert set(labels.groups["task"]) == {"sym", "asym"}
    for g in labels.groups.itertuples():
        a, cands = g.anchors[0], [g.positives[0], *g.negatives[0]]
        own = parts[g.task].score([(a, c) for c in cands], g.task).logits
        other = parts["asym" if g.task == "sym" else "sym"].score([(a, c) for c in cands], g.task).logits
        torch.testing.assert_close(labels.hard[g.group_id, 0], own, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(labels.hard[g.group_id, 0], other, atol=1e-3)
