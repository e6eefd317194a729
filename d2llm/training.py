"""Distil the teacher into the student: the training loop.

One optimisation step sees one labelled group (B anchors, their positives and K hard negatives
each) and the teacher's scores for exactly those pairs, so the in-batch teacher matrix is always
valid. Groups are shuffled between epochs (never their content), with an order derived from the
seed and the epoch so that a resumed run replays the same sequence.

The dev metric (not a training loss) is measured at step 0 and every ``eval_every`` steps; the best
student is kept, so early stopping can never return a model worse than the one it started from.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from d2llm.config import Params, TaskKind
from d2llm.errors import ArtifactError
from d2llm.evaluation.dev import DevSet, dev_score, load_dev_sets, mean_metric

if TYPE_CHECKING:
    import pandas as pd

    from d2llm.student.model import D2LLMStudent

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
HISTORY_FILE = "training_history.json"


# --------------------------------------------------------------------------- dev evaluation


def load_training_dev_sets(params: Params, prepared_dir: Path) -> list[DevSet]:
    """The dev splits early stopping watches (``training.dev_datasets``)."""
    cfg = params.training
    return load_dev_sets(prepared_dir, cfg.dev_datasets, cfg.max_dev_pairs, params.seed)


def evaluate_dev(student: D2LLMStudent, dev_sets: list[DevSet], batch_size: int = 64) -> dict[str, float]:
    """Each dev set's metric (points) from the student's IEM scores, and their mean as ``main``.

    The mean over every family is what early stopping maximises, so a step that helps one
    family by hurting another by as much is not taken as progress.
    """
    was_training = student.training
    student.eval()
    # Every distinct text of every set is encoded once (SICK and SICK-R share their pairs;
    # answer-selection questions repeat for each candidate).
    texts = sorted({text for dev in dev_sets for pair in dev.pairs for text in pair})
    row = {text: i for i, text in enumerate(texts)}
    out = {}
    with torch.no_grad():
        vectors = student.encode(texts, batch_size=batch_size)
        for dev in dev_sets:
            e_a = vectors[[row[a] for a, _ in dev.pairs]]
            e_b = vectors[[row[b] for _, b in dev.pairs]]
            scores = student.score_vectors(e_a, e_b, dev.task).float().cpu().numpy()
            out[dev.name] = dev_score(dev, scores)
    student.train(was_training)
    return {**out, "main": mean_metric(out)}


def regressions(
    per_set: dict[str, float], start: dict[str, float], tolerance: float | None
) -> dict[str, float]:
    """Dev sets more than ``tolerance`` points below their value at step 0 (None: no guard).

    A step that raises the mean by trading one family for another is not kept as the best.
    """
    if tolerance is None:
        return {}
    return {
        name: round(value - start[name], 4)
        for name, value in per_set.items()
        if name in start and value < start[name] - tolerance
    }


# --------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class LabelledGroup:
    """One training group: its texts and the teacher's logits and feature cosines for them."""

    task: TaskKind
    anchors: list[str]
    positives: list[str]
    negatives: list[list[str]]
    in_batch: torch.Tensor  # [B, B, 2]
    hard: torch.Tensor  # [B, K+1, 2]
    feature_cos: torch.Tensor  # [B, K+1, K+1]


def labelled_group(labels: Any, index: int) -> LabelledGroup:
    row = labels.groups.iloc[index]
    return LabelledGroup(
        task=row["task"],
        anchors=list(row["anchors"]),
        positives=list(row["positives"]),
        negatives=[list(n) for n in row["negatives"]],
        in_batch=labels.in_batch[index],
        hard=labels.hard[index],
        feature_cos=labels.feature_cos[index],
    )


def group_logits(
    student: D2LLMStudent,
    anchors: list[str],
    positives: list[str],
    negatives: list[list[str]],
    task: TaskKind,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits for a group: in-batch [B, B], hard [B, K+1] and IEM branch vectors [B, K+1, H].

    Each text is encoded once; the in-batch matrix reuses the positives' vectors.
    """
    batch, k = len(anchors), len(negatives[0])
    flat_negatives = [text for row in negatives for text in row]
    e_a = student.embed_texts(anchors)
    e_c = student.embed_texts(positives + flat_negatives)
    e_pos, e_neg = e_c[:batch], e_c[batch:].view(batch, k, -1)

    dim = e_a.shape[-1]
    z_in = student.score_vectors(
        e_a.unsqueeze(1).expand(batch, batch, dim).reshape(-1, dim),
        e_pos.unsqueeze(0).expand(batch, batch, dim).reshape(-1, dim),
        task,
    ).view(batch, batch)
    candidates = torch.cat([e_pos.unsqueeze(1), e_neg], dim=1)  # [B, K+1, d], column 0 = positive
    z_hn, u_hn = student.iem_features(
        e_a.unsqueeze(1).expand(batch, k + 1, dim).reshape(-1, dim),
        candidates.reshape(-1, dim),
        task,
    )
    return z_in, z_hn.view(batch, k + 1), u_hn.view(batch, k + 1, -1)


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    best_metric: float
    best_step: int
    initial_metric: float
    steps: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def training_inputs_fingerprint(params: Params, labels_dir: Path, dev_sets: list[DevSet]) -> str:
    """What a training run depends on: its labels, its dev pairs and the config keys of stage "train"."""
    from d2llm.fingerprint import path_fingerprint, value_fingerprint
    from d2llm.labelling import MANIFEST_FILE
    from d2llm.stages import param_values

    return value_fingerprint(
        {
            "params": param_values("train", params),
            "labels": path_fingerprint(Path(labels_dir) / MANIFEST_FILE),
            "dev": [
                {"name": d.name, "pairs": d.pairs, "gold": d.gold.tolist(), "task": d.task} for d in dev_sets
            ],
        }
    )


def _checkpoint_matches(checkpoint_dir: Path, inputs: str) -> bool:
    from d2llm.checkpoint import read_loop_state

    state = read_loop_state(checkpoint_dir)
    return state is not None and state.get("inputs") == inputs


def _param_groups(trainable: dict[str, torch.nn.Parameter], cfg: Any) -> list[dict[str, Any]]:
    """The backbone's LoRA weights at ``lr``; the PMA and IEM heads at ``head_lr`` when it is set."""
    heads = [p for n, p in trainable.items() if n.startswith(("pma.", "iem."))]
    backbone = [p for n, p in trainable.items() if not n.startswith(("pma.", "iem."))]
    groups = [{"params": heads, "lr": cfg.head_lr or cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr})
    return groups


def _linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(total_steps - warmup_steps, 1)
        return max(0.0, (total_steps - step) / remaining)

    return factor


def _epoch_order(num_groups: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_groups, generator=generator).tolist()


def train_student(
    params: Params,
    labels_dir: Path,
    prepared_dir: Path,
    out_dir: Path,
    resume: bool = True,
    stop_after_steps: int | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train a student on labelled groups; write the best student to ``out_dir``.

    ``out_dir/checkpoint`` holds the latest full training state and is picked up by a rerun
    (``resume``). ``stop_after_steps`` ends the run early without finishing it, as a kill would
    (used to test resumption). ``on_eval`` receives each dev evaluation record (for tracking).
    """
    from d2llm.hub import pick_device, seed_everything
    from d2llm.labelling import load_labels
    from d2llm.losses import D2LLMLoss
    from d2llm.student.model import D2LLMStudent

    started = time.perf_counter()
    cfg = params.training
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(params.seed)
    device = pick_device(params.device)

    labels = load_labels(labels_dir)
    num_groups = len(labels.groups)
    if num_groups == 0:
        raise ArtifactError(f"no labelled groups in {labels_dir}: run `d2llm label` first")
    dev_sets = load_training_dev_sets(params, prepared_dir)

    student = D2LLMStudent.from_config(params.student).to(device)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    loss_fn = D2LLMLoss(params.loss, teacher_temperature=params.teacher.temperature)
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(_param_groups(trainable, cfg), weight_decay=cfg.weight_decay)

    steps_per_epoch = math.ceil(num_groups / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _linear_warmup_decay(total_steps, int(cfg.warmup_ratio * total_steps))
    )

    loop: dict[str, Any] = {
        "step": 0,
        "micro": 0,
        "best_metric": None,
        "best_step": 0,
        "initial_metric": None,
        "initial_per_set": {},
        "bad_evals": 0,
        "stopped_early": False,
        "inputs": training_inputs_fingerprint(params, labels_dir, dev_sets),
        "history": [],
    }
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    if resume and checkpoint_dir.exists() and not _checkpoint_matches(checkpoint_dir, loop["inputs"]):
        # A kept checkpoint of other labels or settings (e.g. after a param change under DVC,
        # which keeps models/student to allow resumption) is stale: resuming it would hand back
        # the old student. Train afresh; the new run overwrites it.
        log.warning("checkpoint in %s was made from other labels or settings: training afresh", out_dir)
        resume = False
    if resume and checkpoint_dir.exists():
        from d2llm.checkpoint import load_checkpoint

        weights, loop = load_checkpoint(checkpoint_dir, optimizer, scheduler)
        mismatched = sorted(
            name
            for name, param in trainable.items()
            if name not in weights or weights[name].shape != param.shape
        )
        if mismatched:
            raise ArtifactError(
                f"checkpoint {checkpoint_dir} does not match the student config ({len(mismatched)} params "
                f"missing or of another shape, e.g. {mismatched[0]}); delete it or train into a new folder"
            )
        with torch.no_grad():
            for name, tensor in weights.items():
                trainable[name].copy_(tensor.to(device))
        log.info("resumed from step %d", loop["step"])

    use_bf16 = cfg.bf16 and device.type == "cuda"
    student.train()

    def evaluate_and_keep_best() -> bool:
        """Measure the dev metric; save the student when it is the best so far. True = stop."""
        per_set = evaluate_dev(student, dev_sets)
        metric = per_set.pop("main")
        record = {"step": loop["step"], "dev_metric": metric, "lr": scheduler.get_last_lr()[0]}
        record.update({f"dev/{name}": value for name, value in per_set.items()})
        loop["history"].append(record)
        if on_eval:
            on_eval(record)
        if loop["initial_metric"] is None:
            loop["initial_metric"] = metric
            loop["initial_per_set"] = per_set
        regressed = regressions(per_set, loop["initial_per_set"], cfg.dev_tolerance)
        if regressed:
            record["regressed"] = regressed
        if loop["best_metric"] is None or (metric > loop["best_metric"] and not regressed):
            loop.update(best_metric=metric, best_step=loop["step"], bad_evals=0)
            student.save_pretrained(out_dir)
        else:
            loop["bad_evals"] += 1
        log.info(
            "step %d: dev mean %.2f %s%s (best %.2f at step %d)",
            loop["step"],
            metric,
            {name: round(value, 2) for name, value in per_set.items()},
            f"; not kept, below the start on {sorted(regressed)}" if regressed else "",
            loop["best_metric"],
            loop["best_step"],
        )
        return loop["bad_evals"] >= cfg.patience

    def save_state() -> None:
        from d2llm.checkpoint import save_checkpoint

        save_checkpoint(checkpoint_dir, trainable, optimizer, scheduler, loop)

    from tqdm.auto import tqdm

    stopped_early = loop["stopped_early"]
    if loop["initial_metric"] is None:
        stopped_early = evaluate_and_keep_best()
        save_state()
    progress = tqdm(total=total_steps, initial=loop["step"], desc="distil", unit="step")
    steps_this_run = 0
    while loop["step"] < total_steps and not stopped_early:
        epoch, position = divmod(loop["micro"], num_groups)
        group_index = _epoch_order(num_groups, params.seed, epoch)[position]
        group = labelled_group(labels, group_index)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            z_in, z_hn, u_hn = group_logits(
                student, group.anchors, group.positives, group.negatives, group.task
            )
            parts = loss_fn(
                z_in=z_in.float(),
                z_hn=z_hn.float(),
                t_in=group.in_batch.to(device),
                t_hn=group.hard.to(device),
                u_hn=u_hn.float(),
                c_teacher=group.feature_cos.to(device),
            )
        (parts["total"] / cfg.grad_accum).backward()
        loop["micro"] += 1
        if loop["micro"] % cfg.grad_accum:
            continue
        torch.nn.utils.clip_grad_norm_(trainable.values(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loop["step"] += 1
        steps_this_run += 1
        progress.update(1)
        progress.set_postfix(loss=f"{parts['total'].item():.3f}")
        loop["history"].append({"step": loop["step"], **{f"loss_{k}": v.item() for k, v in parts.items()}})
        if loop["step"] % cfg.eval_every == 0 or loop["step"] == total_steps:
            stopped_early = loop["stopped_early"] = evaluate_and_keep_best()
            save_state()
        elif loop["step"] % cfg.checkpoint_every == 0:
            save_state()
        if stop_after_steps is not None and steps_this_run >= stop_after_steps:
            save_state()
            progress.close()
            raise InterruptedError(f"stopped after {steps_this_run} steps on request")
    progress.close()

    result = TrainResult(
        best_metric=loop["best_metric"],
        best_step=loop["best_step"],
        initial_metric=loop["initial_metric"],
        steps=loop["step"],
        stopped_early=stopped_early,
        seconds=time.perf_counter() - started,
        history=loop["history"],
    )
    (out_dir / HISTORY_FILE).write_text(
        json.dumps({"summary": result.to_dict(), "history": result.history}, indent=1), encoding="utf-8"
    )
    return result


def write_curves(history: list[dict[str, Any]], plots_dir: Path) -> None:
    """The dev metric and loss curves as flat JSON lists, one file each: the form `dvc plots` reads."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name, key in (("dev_metric", "dev_metric"), ("train_loss", "loss_total")):
        records = [record for record in history if key in record]
        (plots_dir / f"{name}.json").write_text(json.dumps(records, indent=1), encoding="utf-8")


def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(history)
