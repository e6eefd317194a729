"""`d2llm search` as a user runs it (a separate process): its results and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from tiny_models import save_tiny_student

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["a", "man", "plays", "guitar", "dog", "runs", "cat", "sleeps", "on", "the", "mat"]
DOCS = ["a man plays a guitar", "a dog runs", "a cat sleeps on the mat"]


def test_search_prints_its_results_without_loading_bars_or_library_warnings(tmp_path: Path) -> None:
    from d2llm.search import build_index
    from d2llm.student.model import D2LLMStudent

    student_dir = save_tiny_student(tmp_path, WORDS)  # LoRA on: loading it warns in transformers
    student = D2LLMStudent.from_pretrained(student_dir)
    corpus = pd.DataFrame({"doc_id": ["1", "2", "3"], "text": DOCS})
    build_index(student, corpus, tmp_path / "index", model_version="test")

    env = {**os.environ, "PYTHONWARNINGS": "default"}  # show every warning a user could see
    command = [sys.executable, "-m", "d2llm.cli", "--params", str(ROOT / "params.yaml")]
    command += ["search", "a man plays", "-k", "2", "--index-dir", str(tmp_path / "index")]
    command += ["--student-dir", str(student_dir)]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and [line.split()[0] for line in lines] == ["1", "2"]
