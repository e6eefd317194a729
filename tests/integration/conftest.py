"""A tiny, self-contained d2llm project for pipeline tests (DVC, Prefect).

``build_tiny_project(root)`` writes a project folder that runs the whole pipeline in well under
a minute on a CPU:

- ``data/raw/sick``: a copy of the fetched SICK files (the only source prepared), with the data
  catalogue, so that ``fetch-data`` finds them in place and verified;
- ``backbones/tiny-bert``: a random 2-layer, 32-d BERT with a WordPiece vocabulary built from
  the SICK words, used as both teacher and student backbone;
- with ``decoder=True``, also ``backbones/tiny-llama``: a random 2-layer, 32-d Llama causal LM
  with a BPE tokenizer over the same words and a ChatML chat template (the LLM path's shapes);
- ``params.yaml``: the tiny config below (a few steps, a few groups, small test samples);
- ``dvc.yaml``, ``.dvc/config``, ``.dvcignore`` copied from the repository, and a snapshot of
  ``d2llm/`` (the stages list library modules as deps; the code that runs is the installed one);
- a git repository with everything committed, DVC initialised, analytics off.

The session fixture ``tiny_project`` builds one such folder, ``tiny_decoder_project`` one that
runs the LLM path (DECODER_PARAMS: causal-LM teacher fine-tuned with LoRA, decoder student).
A test that changes one should work on ``tiny_project.clone(tmp_path / "p")`` instead, so that
other tests see it untouched.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny_models import CHAT_TEMPLATE, save_tiny_bert, save_tiny_causal_lm

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the d2llm and dvc console scripts live next to python
BACKBONE = "backbones/tiny-bert"
DECODER_BACKBONE = "backbones/tiny-llama"

# Small enough for seconds per stage, big enough that every step does real work: two teacher
# fine-tuning steps, four labelled groups of four anchors, four distillation steps with two
# dev evaluations, and 48-pair test samples of SICK (NLI) and SICK-R (relatedness).
TINY_PARAMS: dict[str, Any] = {
    "seed": 42,
    "device": "cpu",
    "data": {"sources": ["sick"], "ir_train_pairs": "none"},
    "teacher": {
        "kind": "cross_encoder",
        "model": BACKBONE,
        "max_length": 48,
        "batch_size": 32,
        "finetune": {
            "epochs": 1.0,
            "batch_size": 16,
            "max_train_pairs": 64,
            "max_steps": 2,
            "max_dev_pairs": 48,
            "datasets": ["sick"],
            "dev_datasets": ["sick"],
        },
    },
    "mining": {
        "method": "bm25",
        "num_negatives": 2,
        "depth_min": 1,
        "depth_max": 10,
        "max_length": 48,
        "labelled_negatives": 1,
    },
    "search": {"passage_window": 32, "passage_stride": 16},  # fits the tiny student's 48 tokens
    "labelling": {"group_size": 4, "shard_groups": 2, "max_groups_per_dataset": 4, "datasets": ["sick"]},
    "student": {
        "backbone": BACKBONE,
        "max_length": 48,
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "pma": {"num_heads": 4},
        "iem": {"hidden_size": 32, "branch_size": 32},
    },
    "training": {
        "epochs": 1.0,
        "max_steps": 4,
        "lr": 1e-3,
        "eval_every": 2,
        "bf16": False,
        "dev_datasets": ["sick"],
        "watch_datasets": [],
        "max_dev_pairs": 48,
    },
    "evaluation": {
        "pair_datasets": ["sick", "sick_r"],
        "ir_datasets": [],
        "max_pairs": 48,
        "teacher_rerank_depth": 10,
        "batch_size": 32,
        "validation_datasets": ["sick"],
        "max_validation_pairs": 48,
    },
}


# The LLM path on the same data and step counts: a causal-LM yes/no teacher with LoRA (its
# prompt is ~40 tokens, hence the longer max_length) and a decoder student backbone.
DECODER_PARAMS: dict[str, Any] = {
    "teacher": {
        "kind": "causal_lm",
        "model": DECODER_BACKBONE,
        "max_length": 128,
        "finetune": {"lr": 1e-3, "lora": {"enabled": True, "r": 4, "alpha": 8}},
    },
    "student": {"backbone": DECODER_BACKBONE},
}


@dataclass(frozen=True)
class TinyProject:
    """A project folder plus helpers to run commands in it."""

    root: Path

    @property
    def params_path(self) -> Path:
        return self.root / "params.yaml"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a pipeline run: the venv first on PATH, everything offline and quiet."""
        env = dict(os.environ)
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            GX_ANALYTICS_ENABLED="false",
            DVC_NO_ANALYTICS="1",
            OMP_NUM_THREADS="1",  # the test machines are shared: one core per pipeline step
            GIT_AUTHOR_NAME="d2llm tests",
            GIT_AUTHOR_EMAIL="tests@d2llm.invalid",
            GIT_COMMITTER_NAME="d2llm tests",
            GIT_COMMITTER_EMAIL="tests@d2llm.invalid",
        )
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run a command in the project root; on failure the error shows its output."""
        done = subprocess.run(
            list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"`{' '.join(args)}` exited {done.returncode} in {self.root}\n"
                f"--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-6000:]}"
            )
        return done

    def dvc(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run("dvc", *args, check=check, timeout=timeout)

    def git(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("git", *args)

    def read_params(self) -> dict[str, Any]:
        return yaml.safe_load(self.params_path.read_text(encoding="utf-8"))

    def set_param(self, dotted: str, value: Any) -> None:
        """Edit one value of params.yaml, e.g. ``set_param("training.lr", 3e-3)``."""
        raw = self.read_params()
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
        self.params_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")

    def clone(self, dest: Path) -> TinyProject:
        """A full copy (git history, DVC cache and outputs included) at ``dest``."""
        shutil.copytree(self.root, dest, symlinks=True)
        return TinyProject(dest)


# --------------------------------------------------------------------------- building


def _sick_vocabulary(sick_dir: Path, size: int = 3000) -> list[str]:
    """The commonest lower-cased words of SICK, plus the special tokens BERT needs."""
    counts: collections.Counter[str] = collections.Counter()
    for path in sorted(sick_dir.glob("SICK_*.txt")):
        counts.update(re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", path.read_text(encoding="utf-8").lower()))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [w for w, _ in counts.most_common(size) if w not in special]
    return special + words + ["##s", "##ing", "##ed", "##er", "##ly"]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def _save_tiny_llama(folder: Path, words: list[str]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    # The prompt's words, then the commonest SICK words: room enough in the vocabulary for each to
    # be one token (the rarer words are spelt with several, as in a real BPE).
    prompt = ["yes", "no", "judge", "whether", "correct", "answer", "question", "event", "about"]
    sick = [w for w in words if not w.startswith(("[", "##"))][:600]
    vocabulary = list(dict.fromkeys(prompt + sick))
    save_tiny_causal_lm(folder, LlamaConfig, LlamaForCausalLM, vocabulary, CHAT_TEMPLATE, vocab_size=3000)


def build_tiny_project(
    root: Path, params: dict[str, Any] | None = None, decoder: bool = False
) -> TinyProject:
    """Write a tiny project at ``root`` (see the module docstring); ``params`` overrides TINY_PARAMS."""
    root.mkdir(parents=True, exist_ok=True)
    project = TinyProject(root)
    shutil.copytree(REPO / "data" / "raw" / "sick", root / "data" / "raw" / "sick")
    for name in ("catalog.yaml", "README.md"):  # what git tracks of data/raw: fetch-data finds sick in place
        shutil.copy2(REPO / "data" / "raw" / name, root / "data" / "raw" / name)
    words = _sick_vocabulary(root / "data" / "raw" / "sick")
    save_tiny_bert(root / BACKBONE, words)
    if decoder:
        _save_tiny_llama(root / DECODER_BACKBONE, words)
    shutil.copytree(REPO / "d2llm", root / "d2llm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(REPO / name, root / name)

    from d2llm.config import params_from_dict

    # Validated here (a typo fails now, not in a stage) and written in full: DVC needs every
    # section a stage lists under `params` to be present in params.yaml.
    full = params_from_dict(_merge(TINY_PARAMS, params or {}), "tiny project params").model_dump(mode="json")
    project.params_path.write_text(
        yaml.safe_dump(full, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )

    project.git("init", "-q", "-b", "main")
    project.dvc("init", "-q")
    # The shipped DVC config (default remote, analytics off) replaces the one `dvc init` wrote.
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    project.git("add", "-A")
    project.git("commit", "-q", "-m", "tiny project")
    return project


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> TinyProject:
    """One tiny project per test session, committed and not yet run. Clone it before changing it."""
    return build_tiny_project(tmp_path_factory.mktemp("tiny_project") / "project")


@pytest.fixture(scope="session")
def tiny_decoder_project(tmp_path_factory: pytest.TempPathFactory) -> TinyProject:
    """The tiny project on the LLM path (DECODER_PARAMS), committed and not yet run."""
    root = tmp_path_factory.mktemp("tiny_decoder_project") / "project"
    return build_tiny_project(root, DECODER_PARAMS, decoder=True)
