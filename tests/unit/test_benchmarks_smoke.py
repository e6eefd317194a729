"""Smoke tests of the benchmark scripts: each ``main`` runs end to end on tiny sizes.

A tiny random BERT (``tiny_bert_dir``) plays backbone, teacher and bi-encoder, and a tiny
prepared-data folder written here stands in for ``data/prepared`` (same canonical layout), so
the scripts cannot rot. No speed is asserted: only that the JSON (and PNG) is written, has the
expected keys and positive timings, and that the derived numbers follow from the raw ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = ["man", "woman", "child", "dog", "cat", "bird", "horse", "person"]
ACTIONS = ["plays a guitar", "rides a bike", "eats food", "sleeps on the mat", "runs in the park",
           "reads at the table", "sings in the kitchen", "walks on the beach"]  # fmt: skip


def _sentence(i: int) -> str:
    return f"a {SUBJECTS[i % len(SUBJECTS)]} {ACTIONS[(i // len(SUBJECTS)) % len(ACTIONS)]}"


def _pairs_frame(dataset: str, task: str, classes: bool, n: int = 72) -> pd.DataFrame:
    rows = []
    for i in range(n):
        split = ("train", "dev", "test")[i % 3]
        a, b = _sentence(i), _sentence(i + (0 if i % 2 else 5))
        if classes:
            name = ("entailment", "neutral", "contradiction")[i % 3 if i % 2 else 0]
            label, positive = (
                float(("entailment", "neutral", "contradiction").index(name)),
                name == "entailment",
            )
        else:
            name, label = "", float(i % 6) if dataset == "stsb_en" else 1.0 + (i % 5)
            positive = label >= (4.0 if dataset == "stsb_en" else 4.2)
        rows.append((a, b, label, name, task, dataset, split, positive))
    cols = ["text_a", "text_b", "label", "label_name", "task", "source", "split", "is_positive"]
    return pd.DataFrame(rows, columns=cols)


def _qa_frame(per_split: int = 8, candidates: int = 4) -> pd.DataFrame:
    """Answer selection (asym): each question has one right candidate among ``candidates``."""
    rows = []
    for split in ("train", "dev", "test"):
        for q in range(per_split):
            question = f"what does the {SUBJECTS[q % 3]} do {split} {q}"
            for c in range(candidates):
                right = c == q % candidates
                rows.append((question, _sentence(q + c), float(right), "yes" if right else "no", "asym",
                             "trecqa", split, right))  # fmt: skip
    cols = ["text_a", "text_b", "label", "label_name", "task", "source", "split", "is_positive"]
    return pd.DataFrame(rows, columns=cols)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prepared folder: sick, snli, stsb_en, sick_r, trecqa pairs (dev splits big enough to cut
    into select and validate parts with both classes each); cranfield and cisi IR tables."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "pairs").mkdir()
    for name, classes in (("sick", True), ("snli", True), ("stsb_en", False), ("sick_r", False)):
        _pairs_frame(name, "sym", classes).to_parquet(root / "pairs" / f"{name}.parquet", index=False)
    _qa_frame().to_parquet(root / "pairs" / "trecqa.parquet", index=False)
    for name, offset in (("cranfield", 0), ("cisi", 7)):
        folder = root / "ir" / name
        folder.mkdir(parents=True)
        docs = [f"{_sentence(i + offset)} and the {SUBJECTS[i % 3]} sleeps" for i in range(30)]
        pd.DataFrame({"doc_id": [str(i) for i in range(30)], "text": docs}).to_parquet(
            folder / "corpus.parquet"
        )
        queries = [f"what {ACTIONS[i]}" for i in range(6)]
        pd.DataFrame({"query_id": [str(i + 1) for i in range(6)], "text": queries}).to_parquet(
            folder / "queries.parquet"
        )
        qrels = [(str(q + 1), str((q * 5 + j) % 30), 1 + j % 2) for q in range(6) for j in range(3)]
        pd.DataFrame(qrels, columns=["query_id", "doc_id", "relevance"]).to_parquet(folder / "qrels.parquet")
    return root


def _tiny_args(tiny_bert_dir: Path, prepared_dir: Path, out_dir: Path) -> list[str]:
    """Common options: the tiny BERT everywhere, small heads, CPU, one thread."""
    model = str(tiny_bert_dir)
    overrides = {
        "device": "cpu",
        "student.backbone": model,
        "student.max_length": 32,
        "student.pma.num_heads": 4,
        "student.iem.hidden_size": 16,
        "student.iem.branch_size": 8,
        "student.lora.r": 2,
        "student.lora.alpha": 2,
        "teacher.model": model,
        "teacher.max_length": 48,
        "teacher.batch_size": 4,
        "labelling.group_size": 4,
        "mining.num_negatives": 2,
        "mining.labelled_negatives": 1,
        "search.passage_window": 24,  # fits the tiny student's 32 tokens
        "search.passage_stride": 12,
        # only the datasets the tiny prepared folder has
        "training.dev_datasets": "[sick, stsb_en, sick_r, trecqa]",
        "training.watch_datasets": "[snli]",
        "evaluation.validation_datasets": "[sick, stsb_en, sick_r, trecqa]",
        "labelling.datasets": "[sick, snli, stsb_en, trecqa]",
        "teacher.finetune.datasets": "[sick, snli, stsb_en, trecqa]",
        "teacher.finetune.dev_datasets": "[sick, stsb_en, sick_r, trecqa]",
    }
    args = ["--params", str(ROOT / "params.yaml"), "--prepared-dir", str(prepared_dir)]
    args += ["--out-dir", str(out_dir), "--threads", "1", "--repeats", "2"]
    for key, value in overrides.items():
        args += ["-S", f"{key}={value}"]
    return args


def _read_json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text(encoding="utf-8"))


def test_interleaved_timings_rotate_order_and_count_repetitions():
    from benchmarks.common import interleaved_timings, median, ratio

    calls: list[str] = []
    systems = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = interleaved_timings(systems, repeats=3, warmup=1)
    # warm-up round in order, then each repetition rotated by one place
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert ratio(6.0, 3.0) == 2.0
    assert ratio(1.0, 0.0) is None


def test_ranking_cost(tiny_bert_dir, prepared_dir, tmp_path):
    from benchmarks import ranking_cost

    args = _tiny_args(tiny_bert_dir, prepared_dir, tmp_path)
    args += ["--sizes", "8", "40", "--queries", "2", "--rerank-depth", "5", "--teacher-max-pairs", "10"]
    args += [
        "--pool-size",
        "20",
        "--student-dir",
        str(tmp_path / "none"),
        "--teacher-dir",
        str(tmp_path / "none"),
        "--iem-formats",
        "bfloat16",
        "int8",
    ]
    returned = ranking_cost.main(args)
    report = _read_json(tmp_path / "ranking_cost.json")
    assert (tmp_path / "ranking_cost.png").stat().st_size > 0
    assert report["sizes"] == [8, 40] == returned["sizes"]
    assert report["student"].startswith("untrained")
    # N=8 fits under the teacher cap; N=40 is extrapolated from 10 measured pairs.
    assert report["teacher_measured_pairs"] == {"8": 8, "40": 10}
    assert report["teacher_extrapolated"] == {"8": False, "40": True}
    per_query, scoring = report["seconds_per_query"], report["scoring_seconds_per_query"]
    for system in ("teacher", "student", "two-stage", "bi-encoder"):
        assert all(per_query[system][n] > 0 for n in ("8", "40")), system
        assert all(report["best"]["end_to_end"][system][n] <= per_query[system][n] for n in ("8", "40"))
    for system in ("student", "two-stage", "bi-encoder"):
        assert all(scoring[system][n] > 0 for n in ("8", "40")), system
    # The hybrid search (the preset's BM25 weight) is timed end to end beside the plain two-stage.
    assert report["lexical_weight"] == 1.5
    assert all(per_query["hybrid"][n] > 0 for n in ("8", "40")) and "hybrid" not in scoring
    assert (
        report["query_encoding_seconds"]["student"] > 0 and report["query_encoding_seconds"]["bi-encoder"] > 0
    )
    assert all(len(v) == 2 for v in report["raw_seconds"].values())
    # --iem-formats: each variant is timed alongside, and its logits stay near float32's.
    for fmt in ("bfloat16", "int8"):
        system = f"student-{fmt}"
        assert all(per_query[system][n] > 0 and scoring[system][n] > 0 for n in ("8", "40"))
        assert report["ratios"]["40"][f"{system}/bi-encoder"] == pytest.approx(
            per_query[system]["40"] / per_query["bi-encoder"]["40"]
        )
        change = report["iem_format_score_change"][fmt]
        assert change["n_candidates"] == 40 and change["n_queries"] == 2
        assert 0.0 <= change["max_abs"] < 0.05 and 0.0 <= change["top10_overlap"] <= 1.0
    # Derived numbers follow from the raw timings.
    raw = report["raw_seconds"]
    assert per_query["teacher"]["40"] == pytest.approx(np.median(raw["teacher@10"]) * 40 / 10)
    assert per_query["student"]["8"] == pytest.approx(np.median(raw["student@8"]) / 2)
    assert scoring["bi-encoder"]["40"] == pytest.approx(np.median(raw["score:bi-encoder@40"]) / 2)
    assert report["ratios"]["8"]["scoring student/bi-encoder"] == pytest.approx(
        scoring["student"]["8"] / scoring["bi-encoder"]["8"]
    )
    r = report["ratios"]["40"]
    assert r["teacher/student"] == pytest.approx(per_query["teacher"]["40"] / per_query["student"]["40"])
    assert r["two-stage/bi-encoder"] == pytest.approx(
        per_query["two-stage"]["40"] / per_query["bi-encoder"]["40"]
    )
    quality = report["full_vs_two_stage"]
    assert quality["n_queries"] == 6 and quality["n_docs"] == 30
    assert quality["ndcg@10_difference"] == pytest.approx(
        quality["ndcg@10_two_stage"] - quality["ndcg@10_full"]
    )
    assert 0.0 <= quality["first_stage_recall@10"] <= 1.0


def test_every_timed_ranker_encodes_its_queries_inside_the_timed_call(
    tiny_bert_dir, prepared_dir, tmp_path, monkeypatch
):
    """A query vector remembered from before the timings (or from the warm-up round) would time
    a ranking without its query pass, the largest part of a bi-encoder's cost. So every call of an
    end-to-end ranker or a query encoder, warm-up included, must run the encoder once per query;
    scoring-only calls (query vectors given, by design) run none. Counted on the encoder's
    forward passes (the tiny BERT is every system's encoder), call by call."""
    from benchmarks import common, ranking_cost

    forwards: list[str] = []
    per_call: dict[str, list[int]] = {}
    timings = common.interleaved_timings

    def counted(name, fn):
        def call():
            before = len(forwards)
            fn()
            per_call.setdefault(name, []).append(len(forwards) - before)

        return call

    def counting_timings(systems, repeats, warmup=1, clock="wall"):
        return timings({n: counted(n, fn) for n, fn in systems.items()}, repeats, warmup, clock)

    def hook(module, args, output):
        if type(module).__name__ == "BertModel":
            forwards.append(type(module).__name__)

    monkeypatch.setattr(common, "interleaved_timings", counting_timings)
    args = _tiny_args(tiny_bert_dir, prepared_dir, tmp_path)
    args += ["--sizes", "8", "--queries", "2", "--teacher-max-pairs", "4", "--pool-size", "20", "--no-ndcg"]
    args += ["--student-dir", str(tmp_path / "none"), "--teacher-dir", str(tmp_path / "none")]
    args += ["--iem-formats", "int8"]
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        ranking_cost.main(args)
    finally:
        handle.remove()

    calls = 1 + 2  # one warm-up round, then --repeats 2
    ends = ("student@8", "two-stage@8", "bi-encoder@8", "student-int8@8")
    for name in (*ends, "encode:student", "encode:bi-encoder"):
        assert per_call[name] == [2] * calls, f"{name}: encoder passes per call {per_call[name]}, 2 queries"
    for name in ("score:student@8", "score:two-stage@8", "score:bi-encoder@8", "score:student-int8@8"):
        assert per_call[name] == [0] * calls, name
    assert all(n > 0 for n in per_call["teacher@4"])


def test_ranking_cost_rejects_bad_sizes(tiny_bert_dir, prepared_dir, tmp_path):
    from benchmarks import ranking_cost

    with pytest.raises(SystemExit, match="--sizes must be >= 1"):
        ranking_cost.main([*_tiny_args(tiny_bert_dir, prepared_dir, tmp_path), "--sizes", "0"])


def test_labelling_throughput(tiny_bert_dir, prepared_dir, tmp_path):
    from benchmarks import labelling_throughput

    args = _tiny_args(tiny_bert_dir, prepared_dir, tmp_path)
    args += ["--pairs", "12", "--teacher-dir", str(tmp_path / "none")]
    labelling_throughput.main(args)
    report = _read_json(tmp_path / "labelling_throughput.json")
    assert (tmp_path / "labelling_throughput.png").stat().st_size > 0
    assert report["pairs"] == 12 and report["slices"] == 2 and report["batch_size"] == 4
    assert all(report["pairs_per_second"][m] > 0 for m in ("bucketed", "fixed"))
    assert all(len(report["raw_seconds"][m]) == 2 for m in ("bucketed", "fixed"))
    rates = report["pairs_per_second"]
    assert report["speedup_bucketed_over_fixed"] == pytest.approx(rates["bucketed"] / rates["fixed"])
    # Fixed padding computes every row at max_length; bucketing never computes more.
    assert report["computed_tokens"]["fixed"] == 12 * 48
    assert report["computed_tokens"]["bucketed"] <= report["computed_tokens"]["fixed"]
    assert 0.0 <= report["padding_fraction"]["bucketed"] < report["padding_fraction"]["fixed"] < 1.0
    # Padding is masked out: both modes give the same teacher logits.
    assert report["max_abs_logit_difference"] < 1e-4


def test_labelling_scaling(tiny_bert_dir, prepared_dir, tmp_path, ray_cluster):
    from benchmarks import labelling_scaling

    args = _tiny_args(tiny_bert_dir, prepared_dir, tmp_path)
    args += ["--workers", "1", "2", "--groups", "2", "--group-size", "2", "--negatives", "1"]
    args += ["--shard-groups", "1", "--repeats", "1", "--teacher-dir", str(tmp_path / "none")]
    labelling_scaling.main(args)
    report = _read_json(tmp_path / "labelling_scaling.json")
    assert report["pairs"] == 2 * (2 * 2 + 2 * 1) and report["shards"] == 2
    rates, efficiency = report["pairs_per_second"], report["scaling_efficiency"]
    assert set(rates) == {"1", "2"} and all(rate > 0 for rate in rates.values())
    assert efficiency["1"] == pytest.approx(1.0)
    assert efficiency["2"] == pytest.approx(rates["2"] / (2 * rates["1"]))
    [one], [two] = report["raw_runs"]["1"], report["raw_runs"]["2"]
    assert (one["workers"], two["workers"]) == (1, 2) and one["lost_workers"] == two["lost_workers"] == 0
    assert rates["1"] == pytest.approx(report["pairs"] / one["scoring_seconds"])


def test_computed_tokens_hand_worked():
    from benchmarks.labelling_throughput import computed_tokens

    lengths = [3, 10, 4, 9, 2]
    # bucketed, batch 2: sorted 10, 9 | 4, 3 | 2 -> 2*10 + 2*4 + 1*2 = 30
    assert computed_tokens(lengths, "bucketed", 2, 16) == 30
    assert computed_tokens(lengths, "fixed", 2, 16) == 5 * 16


def test_training_throughput(tiny_bert_dir, prepared_dir, tmp_path):
    from benchmarks import training_throughput

    args = _tiny_args(tiny_bert_dir, prepared_dir, tmp_path)
    args += ["--steps", "2", "--warmup-steps", "1"]
    training_throughput.main(args)
    report = _read_json(tmp_path / "training_throughput.json")
    assert (report["group_size"], report["num_negatives"], report["texts_per_group"]) == (4, 2, 4 + 4 + 4 * 2)
    assert report["steps"] == 2 and len(report["raw_seconds"]) == 2
    assert report["groups_per_second"] == pytest.approx(1.0 / np.median(report["raw_seconds"]))
    assert report["texts_per_second"] == pytest.approx(16 * report["groups_per_second"])
    assert report["trainable_parameters"] > 0
    assert all(np.isfinite(report["losses"]))
    mem = report["memory"]
    assert mem["peak_rss_mib"] >= mem["rss_before_steps_mib"] > 0
    assert mem["peak_rss_mib"] >= mem["rss_after_load_mib"] > 0
    assert mem["cuda_max_allocated_mib"] is None


def test_peak_rss_sees_an_allocation():
    """In a fresh interpreter: a long test session's allocator may reuse freed memory silently."""
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from benchmarks.training_throughput import PeakRSS\n"
        "with PeakRSS() as memory:\n"
        "    before = memory.current()\n"
        "    block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched\n"
        "    block.sum()\n"
        "print(memory.peak - before)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True, timeout=60
    )
    assert int(done.stdout.strip()) > 48 * 1024 * 1024


def _tiny_student_config(tiny_bert_dir: Path, **iem: str):
    """The tiny student's config (small heads on the tiny BERT), IEM options added by ``iem``."""
    from d2llm.config import StudentConfig

    return StudentConfig(
        backbone=str(tiny_bert_dir),
        max_length=32,
        lora={"r": 2, "alpha": 2},
        pma={"num_heads": 4},
        iem={"hidden_size": 16, "branch_size": 8, **iem},
    )


@pytest.fixture(scope="module")
def saved_models(tiny_bert_dir, tmp_path_factory):
    """A saved tiny student and cross-encoder teacher, as the pipeline would leave them."""
    from d2llm.config import TeacherConfig
    from d2llm.hub import seed_everything
    from d2llm.student.model import D2LLMStudent
    from d2llm.teachers.factory import load_teacher

    root = tmp_path_factory.mktemp("models")
    seed_everything(0)
    student = D2LLMStudent.from_config(_tiny_student_config(tiny_bert_dir), device="cpu")
    student.save_pretrained(root / "student")
    teacher = load_teacher(TeacherConfig(model=str(tiny_bert_dir), max_length=48, batch_size=4), None, "cpu")
    teacher.save_pretrained(root / "teacher")
    return root / "student", root / "teacher"


def test_quality_evaluates_when_no_metrics_file(tiny_bert_dir, prepared_dir, saved_models, tmp_path):
    from benchmarks import quality

    student_dir, teacher_dir = saved_models
    args = _tiny_args(tiny_bert_dir, prepared_dir, tmp_path)
    args += ["--metrics", str(tmp_path / "missing.json"), "--student-dir", str(student_dir)]
    args += ["--teacher-dir", str(teacher_dir), "--max-queries", "3"]
    quality.main(args)
    report = _read_json(tmp_path / "quality.json")
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert report["source"].startswith("evaluated now")
    assert (tmp_path / "quality_metrics.json").is_file()
    assert report["systems_present"] == ["bi-encoder", "teacher", "student"]
    rows = {r["dataset"]: r for r in report["rows"]}
    assert set(rows) == {"stsb_en", "sick", "sick_r", "trecqa", "cranfield", "cisi"}
    assert rows["sick"]["metric"] == "ap" and rows["cranfield"]["metric"] == "ndcg@10"
    assert rows["trecqa"]["metric"] == "map"
    assert all(r[s] is not None for r in rows.values() for s in ("bi-encoder", "teacher", "student"))
    assert report["mean"]["student"] == pytest.approx(np.mean([r["student"] for r in rows.values()]))


def _metrics_file(path: Path, student_dir: str | None = None) -> Path:
    """A hand-written evaluate output: baseline 70, teacher 80, student 77.5 on SICK AP."""

    def entry(main: str, base: float, teacher: float, student: float) -> dict:
        values = {"bi-encoder": base, "teacher": teacher, "student": student}
        return {"main_metric": main, "metrics": {s: {main: v} for s, v in values.items()}}

    results = {
        "systems": ["bm25", "bi-encoder", "teacher", "student"],
        "notes": [],
        "sources": {"student_dir": student_dir, "teacher_dir": None},
        "datasets": {"sick": entry("ap", 70.0, 80.0, 77.5), "cisi": entry("ndcg@10", 40.0, 30.0, 35.0)},
    }
    path.write_text(json.dumps(results), encoding="utf-8")
    return path


def test_quality_reads_a_fresh_metrics_file(tiny_bert_dir, prepared_dir, tmp_path):
    from benchmarks import quality

    metrics = _metrics_file(tmp_path / "metrics.json")
    args = _tiny_args(tiny_bert_dir, prepared_dir, tmp_path / "out")
    args += ["--metrics", str(metrics), "--student-dir", str(tmp_path / "none")]
    args += ["--teacher-dir", str(tmp_path / "none")]  # written after params.yaml: fresh
    quality.main(args)
    report = _read_json(tmp_path / "out" / "quality.json")
    assert report["source"].startswith(f"read {metrics}")
    rows = {r["dataset"]: r for r in report["rows"]}
    assert rows["sick"]["recovered"] == pytest.approx(0.75)  # (77.5 - 70) / (80 - 70)
    assert rows["cisi"]["recovered"] is None  # the teacher is worse than the baseline: no gain
    assert report["mean"]["student"] == pytest.approx(56.25)
    assert report["mean"]["recovered"] is None  # mean teacher 55 = mean baseline 55: no gain to recover


def test_quality_reports_a_recovered_share_only_where_the_evaluation_report_does():
    """A teacher gain of 1 point or less (``RECOVERY_MIN_GAIN``) has no reported share: 0.5 points
    of gain would make the student's +1.0 a 200% recovery. The benchmark and the evaluation
    report apply the same rule, per dataset and to the means."""
    from benchmarks.quality import mean_row, quality_rows
    from d2llm.evaluation.evaluate import _add_gain

    def entry(main: str, base: float, teacher: float, student: float) -> dict:
        values = {"bi-encoder": base, "teacher": teacher, "student": student}
        return {"main_metric": main, "metrics": {s: {main: v} for s, v in values.items()}}

    datasets = {
        "sick": entry("ap", 70.0, 80.0, 75.0),
        "sick_r": entry("spearman", 60.0, 60.5, 61.0),  # a 0.5-point teacher gain
        "stsb_en": entry("spearman", 80.0, 70.8, 81.0),
    }
    rows = quality_rows({"datasets": datasets})
    shares = {r["dataset"]: r["recovered"] for r in rows}
    assert shares == {"sick": pytest.approx(0.5), "sick_r": None, "stsb_en": None}
    for name, values in datasets.items():
        _add_gain(values)
        assert values["student_gain_recovered"] == shares[name], name
    # Means: bi-encoder 70, teacher 70.43, student 72.33: a 0.43-point gain, no share either.
    mean = mean_row(rows)
    assert mean["teacher"] - mean["bi-encoder"] == pytest.approx(1.3 / 3)
    assert mean["recovered"] is None


def test_quality_freshness_rules(tmp_path):
    import os

    from benchmarks.quality import freshness

    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\n")
    student = tmp_path / "student"
    student.mkdir()
    (student / "heads.safetensors").write_bytes(b"x")
    metrics = _metrics_file(tmp_path / "metrics.json", student_dir=str(student))
    os.utime(params, (1_000, 1_000))
    os.utime(student / "heads.safetensors", (2_000, 2_000))
    os.utime(metrics, (3_000, 3_000))
    assert freshness(metrics, student, None, params) == (
        True,
        f"{metrics} is newer than the student, teacher and params",
    )

    os.utime(student / "heads.safetensors", (4_000, 4_000))  # retrained after evaluation
    fresh, reason = freshness(metrics, student, None, params)
    assert not fresh and "older than" in reason

    fresh, reason = freshness(metrics, tmp_path / "other_student", None, params)
    assert not fresh and "written for student_dir" in reason
    assert freshness(tmp_path / "nope.json", student, None, params) == (
        False,
        f"{tmp_path / 'nope.json'} does not exist",
    )
    (tmp_path / "bad.json").write_text("{not json")
    assert not freshness(tmp_path / "bad.json", student, None, params)[0]


def test_cpu_efficiency(tiny_bert_dir, prepared_dir, tmp_path):
    from benchmarks import cpu_efficiency

    args = _tiny_args(tiny_bert_dir, prepared_dir, tmp_path)
    args += ["--pairs", "8", "--dev-pairs", "6", "--gemm-tokens", "64", "--batch-size", "4"]
    args += [
        "--teacher-dir",
        str(tmp_path / "none"),
        "--student-dir",
        str(tmp_path / "none"),
        "--clock",
        "cpu",
    ]
    cpu_efficiency.main(args)
    report = _read_json(tmp_path / "cpu_efficiency.json")
    assert report["pairs"] == 8 and len(report["gemm_flops_per_second"]) == 3 and report["clock"] == "cpu"
    assert report["gemm_peak_flops_per_second"] == max(report["gemm_flops_per_second"].values())
    for key in ("teacher:float32", "teacher:int8", "student:float32", "student:int8"):
        t = report["throughput"][key]
        model = key.split(":")[0]
        assert t["seconds_best"] == min(report["raw_seconds"][key])
        assert t["flops_per_second"] == pytest.approx(
            report["flops_per_repetition"][model] / t["seconds_best"]
        )
        assert t["share_of_gemm_peak"] == pytest.approx(
            t["flops_per_second"] / report["gemm_peak_flops_per_second"]
        )
    q = report["quality"]
    assert set(q["teacher"]["int8"]) == set(q["teacher"]["float32"]) == {"sick/ap", "stsb_en/spearman"}
    assert set(q["student"]["int8"]) == {"sick/ap", "stsb_en/spearman"}
    assert 0.0 < q["student_vectors"]["min_cosine"] <= 1.0 + 1e-6


def test_encoder_flops_hand_worked():
    from benchmarks.cpu_efficiency import encoder_flops, pma_flops

    # 100 Linear weights, 2 layers of width 4; texts of 3 and 5 tokens:
    # 2*100*(3+5) + 4*2*4*(9+25) = 1600 + 1088.
    assert encoder_flops((100, 2, 4), [3, 5]) == 2688.0
    # PMA of width 4 over the same texts: 4*16*(3+5) + 8*16*2 = 512 + 256.
    assert pma_flops(4, [3, 5]) == 768.0


def test_cpu_clock_counts_work_not_waiting():
    import time

    from benchmarks.common import interleaved_timings

    systems = {"sleep": lambda: time.sleep(0.05)}
    wall = interleaved_timings(systems, repeats=2, warmup=0, clock="wall")["sleep"]
    cpu = interleaved_timings(systems, repeats=2, warmup=0, clock="cpu")["sleep"]
    assert min(wall) >= 0.05 and max(cpu) < 0.025  # sleeping takes time but no CPU


def test_student_dev_compares_students_on_the_select_parts(
    tiny_bert_dir, prepared_dir, saved_models, tmp_path
):
    from benchmarks import student_dev
    from d2llm.evaluation.dev import load_dev_sets

    student_dir, _ = saved_models
    args = [a for a in _tiny_args(tiny_bert_dir, prepared_dir, tmp_path) if a not in ("--repeats", "2")]
    args += ["--student", f"tiny={student_dir}", "--dev", "sick", "trecqa"]
    report = student_dev.main(args)
    assert report["part"] == "select"
    assert set(report["systems"]) == {"bi-encoder", "tiny"}
    tiny = report["systems"]["tiny"]
    assert set(tiny) == {"sick/ap", "trecqa/map", "mean", "task-kind mean"}
    assert tiny["mean"] == pytest.approx((tiny["sick/ap"] + tiny["trecqa/map"]) / 2)
    assert tiny["task-kind mean"] == pytest.approx(tiny["mean"])  # one sym set, one asym set
    sets = load_dev_sets(prepared_dir, ["sick", "trecqa"], 1300, 42, "select", 0.5)
    assert report["sets"] == {d.name: len(d.pairs) for d in sets}
    assert (tmp_path / "student_dev.json").is_file()


def test_teacher_dev_scores_teachers_and_biencoders_on_the_same_pairs(
    tiny_bert_dir, prepared_dir, saved_models, tmp_path
):
    """Raw metrics are the teacher report's (evaluate_teacher on the same sample); a teacher with
    fusion weights also gets a fused row; family means average the family's sets."""
    import shutil

    from benchmarks import teacher_dev
    from d2llm.config import TeacherConfig
    from d2llm.evaluation.dev import load_dev_sets
    from d2llm.teachers.dev_report import write_dev_report
    from d2llm.teachers.factory import load_teacher
    from d2llm.teachers.finetune import evaluate_teacher
    from d2llm.teachers.fusion import FusedScorer, FusionWeights

    _, teacher_dir = saved_models
    fused_dir = tmp_path / "fused_teacher"
    shutil.copytree(teacher_dir, fused_dir)
    weights = FusionWeights(weight=0.5, teacher_mean=0.0, teacher_std=1.0, cosine_mean=0.5, cosine_std=0.2)
    fusion = FusedScorer(
        {"sick": weights, "sick_r": weights, "trecqa": weights},
        {"sick": "sym", "sick_r": "sym", "trecqa": "asym"},
    )
    write_dev_report(fused_dir, {"fusion": fusion.to_json()})

    args = [a for a in _tiny_args(tiny_bert_dir, prepared_dir, tmp_path) if a not in ("--repeats", "2")]
    args += ["--teacher", f"plain={teacher_dir}", "--teacher", f"fused={fused_dir}"]
    args += ["--biencoder", f"a={tiny_bert_dir}", "--biencoder", f"b={tiny_bert_dir}"]
    args += ["--dev", "sick", "sick_r", "trecqa", "--max-pairs", "40", "--part", "validate"]
    report = teacher_dev.main(args)

    sets = load_dev_sets(prepared_dir, ["sick", "sick_r", "trecqa"], 40, 42, "validate", 0.5)
    assert report["sets"] == {d.name: len(d.pairs) for d in sets}
    teacher = load_teacher(
        TeacherConfig(model=str(tiny_bert_dir), max_length=48, batch_size=4), teacher_dir, "cpu"
    )
    expected = evaluate_teacher(teacher, sets)
    plain, with_fusion = report["teachers"]["plain"], report["teachers"]["fused"]
    for name in ("sick/ap", "sick_r/spearman", "trecqa/map"):
        assert plain["raw"][name] == pytest.approx(expected[name], abs=1e-6)
        assert with_fusion["raw"][name] == pytest.approx(expected[name], abs=1e-6)
    assert plain["fused"] is None and set(with_fusion["fused"]) == {
        "sick/ap",
        "sick_r/spearman",
        "trecqa/map",
    }
    assert with_fusion["fused"] != with_fusion["raw"]  # half the weight on the cosine changes the ranking
    assert report["biencoders"]["a"] == report["biencoders"]["b"]
    assert plain["labelling_pairs_per_second"] > 0
    families = report["families"]["plain raw"]
    assert families["NLI"] == pytest.approx(expected["sick/ap"])
    assert families["STS"] == pytest.approx(expected["sick_r/spearman"])
    assert families["QA"] == pytest.approx(expected["trecqa/map"])
    assert (tmp_path / "teacher_dev.json").is_file()


@pytest.mark.usefixtures("cpu_bf16_on")
def test_teacher_precision_compares_number_formats_on_the_same_pairs(
    tiny_bert_dir, prepared_dir, saved_models, tmp_path, monkeypatch
):
    """float32 agrees with itself and scores what the teacher report scores; bf16 and int8 round
    (r below 1, still close); a format the probe refuses is reported as refused, not scored."""
    from benchmarks import teacher_precision
    from d2llm.config import TeacherConfig
    from d2llm.evaluation.dev import load_dev_sets
    from d2llm.teachers.factory import load_teacher
    from d2llm.teachers.finetune import evaluate_teacher

    _, teacher_dir = saved_models
    args = [a for a in _tiny_args(tiny_bert_dir, prepared_dir, tmp_path) if a not in ("--repeats", "2")]
    args += ["--teacher-dir", str(teacher_dir), "--dev", "sick", "trecqa", "--max-pairs", "40"]
    report = teacher_precision.main(args)

    sets = load_dev_sets(prepared_dir, ["sick", "trecqa"], 40, 42, "validate", 0.5)
    teacher = load_teacher(
        TeacherConfig(model=str(tiny_bert_dir), max_length=48, batch_size=4), teacher_dir, "cpu"
    )
    expected = evaluate_teacher(teacher, sets)
    plain, bf16, int8 = (report["formats"][f] for f in ("none", "bf16", "int8"))
    assert plain["agreement"] == {"sick/ap": pytest.approx(1.0), "trecqa/map": pytest.approx(1.0)}
    for name in ("sick/ap", "trecqa/map"):
        assert plain["metrics"][name] == pytest.approx(expected[name], abs=1e-6)
        for approx in (bf16, int8):
            assert 0.9 < approx["agreement"][name] < 1.0
    assert all(r["pairs_per_second"] > 0 for r in report["formats"].values())
    assert (tmp_path / "teacher_precision.json").is_file()

    monkeypatch.setattr("d2llm.teachers.base.MIN_AGREEMENT", 1.01)  # no approximation can pass
    refused = teacher_precision.main([*args, "--formats", "none", "bf16"])["formats"]
    assert "metrics" in refused["none"] and "changes this teacher's judgement" in refused["bf16"]["refused"]


def test_ir_decomposition_splits_the_shipped_score_into_vectors_and_interaction(
    tiny_bert_dir, prepared_dir, saved_models, tmp_path
):
    """``w = 1`` re-ranks exactly as the shipped search; ``w = 0`` over a first stage deeper than
    the corpus is the student's vectors alone; a student without the cosine residual is refused."""
    from benchmarks import ir_decomposition
    from d2llm.hub import seed_everything
    from d2llm.student.model import D2LLMStudent

    seed_everything(0)
    student = D2LLMStudent.from_config(_tiny_student_config(tiny_bert_dir, residual="cosine"), device="cpu")
    with torch.no_grad():  # a trained head: the zero-initialised output layer would add nothing
        student.iem.out.weight.normal_(0.0, 1.0)
    student.save_pretrained(tmp_path / "student")

    args = [a for a in _tiny_args(tiny_bert_dir, prepared_dir, tmp_path) if a not in ("--repeats", "2")]
    args += ["-S", "student.iem.residual=cosine", "--datasets", "cranfield", "cisi"]
    report = ir_decomposition.main([*args, "--student-dir", str(tmp_path / "student"), "--weights", "0", "1"])
    assert set(report["datasets"]) == {"cranfield", "cisi"}
    for entry in report["datasets"].values():
        rows = entry["systems"]
        assert entry["passages"] <= report["rerank_depth"]  # so w = 0 sees every document
        assert rows["w=1"]["ndcg@10"] == pytest.approx(rows["student (shipped search)"]["ndcg@10"], abs=1e-6)
        assert rows["w=0"]["ndcg@10"] == pytest.approx(rows["student vectors"]["ndcg@10"], abs=1e-6)
        assert set(rows) == {"bi-encoder", "student vectors", "student (shipped search)", "w=0", "w=1"}
    assert (tmp_path / "ir_decomposition.json").is_file()

    plain_student, _ = saved_models  # residual "none"
    with pytest.raises(SystemExit, match="residual: cosine"):
        ir_decomposition.main([*args, "--student-dir", str(plain_student)])


def test_cpu_bf16_times_both_formats_whatever_the_cpu_has(tiny_bert_dir, prepared_dir, tmp_path, monkeypatch):
    """Both formats are timed (each forced through $D2LLM_CPU_BF16, restored after), with what
    d2llm would choose on this CPU beside them."""
    from benchmarks import cpu_bf16
    from d2llm.hub import cpu_has_bf16

    monkeypatch.setenv("D2LLM_CPU_BF16", "auto")
    args = _tiny_args(tiny_bert_dir, prepared_dir, tmp_path)
    cpu_bf16.main([*args, "--texts", "8", "--steps", "2", "--batch-size", "4", "--repeats", "1"])
    report = _read_json(tmp_path / "cpu_bf16.json")
    assert set(report["seconds"]) == {"encode float32", "encode bf16", "train float32", "train bf16"}
    assert all(s > 0 for s in report["seconds"].values())
    assert report["bf16_speedup"]["encode"] == pytest.approx(
        report["seconds"]["encode float32"] / report["seconds"]["encode bf16"]
    )
    assert report["texts_per_second"]["bf16"] == pytest.approx(8 / report["seconds"]["encode bf16"])
    assert report["cpu_has_bf16"] is cpu_has_bf16()
    assert report["d2llm_chooses"] == ("bf16" if cpu_has_bf16() else "float32")
    assert os.environ["D2LLM_CPU_BF16"] == "auto"  # put back
    with pytest.raises(SystemExit, match="--texts"):
        cpu_bf16.main([*args, "--texts", "0"])


def test_index_scale_measures_the_saved_bm25_on_tiled_real_text(prepared_dir, tmp_path):
    from benchmarks import index_scale

    args = ["--params", str(ROOT / "params.yaml"), "--out-dir", str(tmp_path), "--threads", "1"]
    args += ["--prepared-dir", str(prepared_dir), "--sizes", "90", "--dim", "8", "--clusters", "4"]
    args += ["--queries", "3", "--repeats", "2", "--first-stages", "exact", "--no-full-iem"]
    args += ["--bm25-datasets", "cranfield", "cisi", "-S", "search.rerank_depth=5"]
    args += ["-S", "student.iem.hidden_size=8", "-S", "student.iem.branch_size=8"]
    report = index_scale.main(args)
    assert "cranfield, cisi cut into 36-word passages, tiled" in report["bm25_data"]
    (size,) = report["sizes"]
    bm25 = size["bm25"]
    assert bm25["texts"] == 90  # the 60 short documents (one passage each) of the two collections, tiled
    assert bm25["build_peak_rss_growth_mib"] >= 0
    for key in ("build_seconds", "save_seconds", "load_seconds", "folder_mib", "query_ms"):
        assert bm25[key] > 0, key
    assert len(bm25["raw_seconds"]) == 2
    assert bm25["query_ms"] == pytest.approx(1000 * np.median(bm25["raw_seconds"]) / 3)
