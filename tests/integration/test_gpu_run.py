"""scripts/gpu_run.py, the one-session GPU script, dry-run on a CPU with the tiny Llama project.

The tiny decoder project (conftest) is the LLM path at test sizes: the script runs its stages,
scores the labelled pairs again for throughput, and writes the record and the dev table. What a
GPU adds (the card's bf16 peak, the vLLM check) is exercised through ``--peak-tflops`` and the
recorded reason for skipping.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_run.py"


def test_gpu_run_records_throughput_and_the_dev_table_on_cpu(tiny_decoder_project, tmp_path: Path) -> None:
    project = tiny_decoder_project.clone(tmp_path / "p")
    done = project.run(
        sys.executable, str(SCRIPT), "--params", "params.yaml", "-S", "device=cpu",
        "--out-dir", "runs/gpu", "--throughput-pairs", "40", "--peak-tflops", "2.0",
        timeout=600,
    )  # fmt: skip
    record = json.loads((project.root / "runs" / "gpu" / "gpu_run.json").read_text(encoding="utf-8"))

    stages = ["fetch-data", "prepare", "validate", "mine", "teacher-finetune", "label", "train"]
    assert [*record["steps"]] == stages
    assert all(step["returncode"] == 0 for step in record["steps"].values())
    check = record["vllm_check"]
    assert check["status"] == "skipped" and ("vllm" in check["reason"] or "CUDA" in check["reason"])

    lab = record["labelling"]
    assert lab["pairs"] == 40 and lab["tokens"] > lab["pairs"]  # a prompt is many tokens
    assert lab["pairs_per_second"] > 0 and lab["parameters"] > 0
    flops = 2 * lab["parameters"] * lab["tokens"] / lab["seconds"]
    assert math.isclose(lab["model_tflops_per_second"], flops / 1e12, rel_tol=1e-6)
    assert math.isclose(lab["share_of_bf16_peak"], lab["model_tflops_per_second"] / 2.0, rel_tol=1e-6)

    train = json.loads((project.root / "runs" / "gpu" / "reports" / "train_metrics.json").read_text())
    assert record["training"]["steps"] == train["steps"] == 4
    assert math.isclose(record["training"]["steps_per_second"], 4 / train["seconds"])

    rows = {row["dev set"]: row for row in record["dev_table"]}
    assert "sick/ap" in rows
    sick = rows["sick/ap"]
    assert all(math.isfinite(sick[k]) for k in ("bi-encoder", "teacher (raw)", "student")), sick
    assert sick["teacher (fused)"] is None  # the tiny project's teacher is not fused (teacher.fusion: none)
    assert "pairs/s" in done.stdout and "| sick/ap |" in done.stdout
    assert (project.root / "runs" / "gpu" / "gpu_run.md").read_text(encoding="utf-8") in done.stdout


def test_gpu_run_refuses_a_bad_override_before_any_work(tiny_decoder_project, tmp_path: Path) -> None:
    project = tiny_decoder_project.clone(tmp_path / "p")
    done = project.run(
        sys.executable, str(SCRIPT), "--params", "params.yaml", "-S", "training.lr=fast", check=False
    )
    assert done.returncode == 2
    assert "training.lr" in done.stderr and "invalid config" in done.stderr
    assert not (project.root / "outputs" / "gpu-run").exists()
