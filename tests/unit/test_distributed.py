"""Distillation on two processes with real torch.distributed (gloo on the CPU).

- mode "groups": two ranks taking whole groups train the student exactly as one process with
  ``grad_accum: 2`` (to float rounding);
- mode "global_batch": the ranks' gathered in-batch logits are the single-process B x B logits of
  the same group, positives on the diagonal; their loss shares and summed gradients are the
  single-process loss and gradient; two ranks train like one process on the whole groups;
- a rank killed mid-run stops the job; the same command again resumes from rank 0's checkpoint
  and ends with the weights of the uninterrupted run.

The backbone is the tiny BERT with dropout off: dropout masks are drawn per process, so with
dropout on no two layouts of the same work could agree exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_training import _params, workspace  # noqa: F401 - the labelled toy workspace fixture

from d2llm.config import Params

torch.set_num_threads(1)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def still_bert_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """The tiny BERT with dropout off (a copy: the shared folder stays as it is)."""
    folder = tmp_path_factory.mktemp("still_bert") / "bert"
    shutil.copytree(tiny_bert_dir, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _run_params(bert: Path, **training: object) -> Params:
    """4-anchor groups (3 of them), 40 steps, checkpoints every step, dev at steps 0, 20 and 40."""
    return _params(bert, max_steps=40, eval_every=20, checkpoint_every=1, **training)


def _weights(out_dir: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(out_dir / "checkpoint" / "state.safetensors"))
    return {k: v for k, v in state.items() if k.startswith("model.")}


# The key bias of PMA's attention adds the same amount to every key's logit, so softmax cancels
# it: its true gradient is 0 and what it gets is rounding noise, which Adam scales into steps of
# size lr. Summing the same terms in another order (two ranks) gives other noise, other steps.
NO_GRADIENT = {"model.pma.k_proj.bias"}


def _assert_same_weights(got_dir: Path, expected_dir: Path) -> None:
    got, expected = _weights(got_dir), _weights(expected_dir)
    assert got.keys() == expected.keys()
    for name in expected.keys() - NO_GRADIENT:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def _dev_curve(history: list[dict[str, object]]) -> list[object]:
    return [h["dev_metric"] for h in history if "dev_metric" in h]


def _train_in_process(params: Params, space: dict[str, Path], out: Path):
    from d2llm.training import train_student

    return train_student(params, space["labels"], space["prepared"], out)


def _cli_train(params: Params, space: dict[str, Path], out: Path) -> list[str]:
    """``d2llm train`` arguments for ``params`` (written next to ``out``)."""
    config = out.parent / f"{out.name}.params.yaml"
    config.write_text(yaml.safe_dump(params.model_dump(mode="json")), encoding="utf-8")
    return [
        *("--params", str(config), "train", "--labels-dir", str(space["labels"])),
        *("--prepared-dir", str(space["prepared"]), "--out-dir", str(out)),
        *("--metrics", str(out.parent / f"{out.name}.metrics.json")),
        *("--plots-dir", str(out.parent / f"{out.name}.plots")),
    ]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


@pytest.fixture(scope="module")
def accumulated_run(
    workspace: dict[str, Path],  # noqa: F811
    still_bert_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, object]:
    """The reference of mode "groups": one process accumulating two groups per step."""
    out = tmp_path_factory.mktemp("accumulated") / "student"
    return out, _train_in_process(_run_params(still_bert_dir, grad_accum=2), workspace, out)


def test_two_ranks_taking_whole_groups_train_like_one_process_accumulating_two(
    workspace: dict[str, Path],  # noqa: F811
    still_bert_dir: Path,
    accumulated_run: tuple[Path, object],
    tmp_path: Path,
) -> None:
    """`d2llm train` with nproc_per_node 2 starts torchrun itself (the pipeline's path)."""
    params = _run_params(still_bert_dir, distributed={"nproc_per_node": 2, "mode": "groups"})
    out = tmp_path / "student"
    argv = _cli_train(params, workspace, out)
    done = subprocess.run([sys.executable, "-m", "d2llm.cli", *argv], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 of 2 (gloo on cpu)" in done.stderr

    reference_dir, reference = accumulated_run
    _assert_same_weights(out, reference_dir)
    summary = json.loads((tmp_path / "student.metrics.json").read_text(encoding="utf-8"))
    assert summary["steps"] == reference.steps == 40
    history = json.loads((out / "training_history.json").read_text(encoding="utf-8"))["history"]
    assert _dev_curve(history) == pytest.approx(_dev_curve(reference.history), abs=1e-3)


# --------------------------------------------------------------------------- global in-batch negatives


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fresh_student(params: Params):
    from d2llm.hub import seed_everything
    from d2llm.student.model import D2LLMStudent

    seed_everything(params.seed)
    return D2LLMStudent.from_config(params.student).train()


def _global_batch_rank(rank: int, params: Params, labels_dir: Path, out_dir: Path, port: int) -> None:
    """One rank: its slice of group 0 scored against the gathered positives, its loss share, its gradient."""
    import torch.distributed as dist

    from d2llm.distributed import DistContext
    from d2llm.labelling import load_labels
    from d2llm.losses import D2LLMLoss
    from d2llm.training import group_logits, group_loss, labelled_group

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ranks = DistContext(rank=rank, world_size=2)
        student = _fresh_student(params)
        group = labelled_group(load_labels(labels_dir), 0)
        share, _ = group.anchor_slice(rank, 2)
        z_in, z_hn, _ = group_logits(
            student, share.anchors, share.positives, share.negatives, share.key, ranks.gather_rows
        )
        loss_fn = D2LLMLoss(params.loss, teacher_temperature=params.teacher.temperature)
        loss = group_loss(student, loss_fn, group, ranks)["total"]
        loss.backward()
        trainable = dict(student.trainable_parameters())
        ranks.sum_gradients(list(trainable.values()))
        grads = {name: p.grad.clone() for name, p in trainable.items() if p.grad is not None}
        torch.save(
            {"z_in": z_in.detach(), "z_hn": z_hn.detach(), "loss": loss.detach(), "grads": grads},
            out_dir / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_global_batch_ranks_see_the_whole_groups_in_batch_matrix_with_positives_aligned(
    workspace: dict[str, Path],  # noqa: F811
    still_bert_dir: Path,
    tmp_path: Path,
) -> None:
    import torch.multiprocessing as mp

    from d2llm.labelling import load_labels
    from d2llm.losses import D2LLMLoss
    from d2llm.training import group_logits, group_loss, labelled_group

    params = _run_params(still_bert_dir)
    mp.spawn(
        _global_batch_rank, args=(params, workspace["labels"], tmp_path, _free_port()), nprocs=2, join=True
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    student = _fresh_student(params)
    group = labelled_group(load_labels(workspace["labels"]), 0)
    z_in, _, _ = group_logits(student, group.anchors, group.positives, group.negatives, group.key)
    loss = group_loss(student, D2LLMLoss(params.loss, params.teacher.temperature), group)["total"]
    loss.backward()

    gathered = torch.cat([r["z_in"] for r in ranks])  # rank 0 holds anchors 0-1, rank 1 anchors 2-3
    assert gathered.shape == z_in.shape == (4, 4)
    torch.testing.assert_close(gathered, z_in.detach(), rtol=0, atol=1e-6)
    # Each anchor's positive is on the diagonal: the logit of the pair scored among its hard negatives.
    torch.testing.assert_close(
        gathered.diagonal(), torch.cat([r["z_hn"][:, 0] for r in ranks]), atol=1e-6, rtol=0
    )
    assert not torch.allclose(gathered.diagonal(), gathered.flip(1).diagonal())  # a misalignment would show
    torch.testing.assert_close(ranks[0]["loss"] + ranks[1]["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
    for name, param in student.trainable_parameters():
        if param.grad is not None:
            for r in ranks:
                torch.testing.assert_close(r["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_global_batch_training_on_two_ranks_equals_one_process_on_the_whole_groups(
    workspace: dict[str, Path],  # noqa: F811
    still_bert_dir: Path,
    tmp_path: Path,
) -> None:
    """`torchrun ... -m d2llm.cli train` by hand, mode global_batch, against one process."""
    params = _params(still_bert_dir, max_steps=6, distributed={"mode": "global_batch"})
    reference = _train_in_process(params, workspace, tmp_path / "single")
    out = tmp_path / "student"
    done = subprocess.run(
        _torchrun("-m", "d2llm.cli", *_cli_train(params, workspace, out)),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_weights(out, tmp_path / "single")
    history = json.loads((out / "training_history.json").read_text(encoding="utf-8"))["history"]
    losses = [h["loss_total"] for h in history if "loss_total" in h]
    assert losses == pytest.approx(
        [h["loss_total"] for h in reference.history if "loss_total" in h], rel=1e-5
    )


# --------------------------------------------------------------------------- a killed rank


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=rank`` among ``launcher``'s child processes."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0") if parent == launcher else []
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


def test_a_job_whose_rank_was_killed_resumes_from_the_checkpoint_when_rerun(
    workspace: dict[str, Path],  # noqa: F811
    still_bert_dir: Path,
    accumulated_run: tuple[Path, object],
    tmp_path: Path,
) -> None:
    """SIGKILL rank 1 at step >= 4: torchrun stops the job; the same command again resumes it
    from rank 0's checkpoint and ends with the weights of the uninterrupted run."""
    params = _run_params(still_bert_dir, distributed={"mode": "groups"})
    out = tmp_path / "student"
    command = _torchrun("-m", "d2llm.cli", *_cli_train(params, workspace, out))
    launcher = subprocess.Popen(
        command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    state = out / "checkpoint" / "state.json"
    killed_at = None
    deadline = time.monotonic() + 900  # a fail-safe: on a quiet machine step 4 comes in seconds
    try:
        while killed_at is None and time.monotonic() < deadline:
            assert launcher.poll() is None, "training ended before a rank could be killed"
            step = json.loads(state.read_text(encoding="utf-8"))["loop"]["step"] if state.exists() else 0
            worker = _worker_of_rank(launcher.pid, 1)
            if step >= 4 and worker is not None:
                os.kill(worker, signal.SIGKILL)
                killed_at = step
            time.sleep(0.02)
        launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert killed_at is not None and killed_at < 40, "no rank was killed mid-run"
    assert launcher.returncode != 0  # torchrun reports the lost rank
    assert not (tmp_path / "student.metrics.json").exists()

    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step" in done.stderr
    summary = json.loads((tmp_path / "student.metrics.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 40
    _assert_same_weights(out, accumulated_run[0])
