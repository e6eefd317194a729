"""Fine-tune a teacher on gold labels ("LLM-ce" in the paper): a stronger teacher, a better student.

Targets: class datasets (NLI) give ``is_positive`` (entailment vs the rest); score datasets
(STS) give the gold score rescaled to [0, 1]. The loss is binary cross-entropy between the
teacher's yes-probability ``softmax([z_yes, z_no])[0] = sigmoid(z_yes - z_no)`` and the target
(soft targets allowed), computed from the logit difference for numerical stability. With
``teacher.finetune.rank_weight > 0`` a listwise loss over each question's candidates is added
(``list_softmax_loss``): the asym datasets are then sampled as lists, one list per question, and
a list is always trained within one batch.

Recipe: AdamW, linear warm-up then linear decay, gradient clipping, length-bucketed batches in
shuffled order; LoRA for causal LMs (``teacher.finetune.lora``), full fine-tuning for encoders.
The dev split of every dataset is scored before training and after every epoch (AP for class
datasets, Spearman for score datasets); the best epoch's weights are kept (epoch 0, the
untouched model, included: fine-tuning that only hurts is not shipped). With
``teacher.finetune.per_task`` this is done twice, once per task kind, each part on its own
datasets and dev sets (``d2llm.teachers.per_task``).
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from d2llm.batching import Encoding, bucket_batches, pack_lists, padded_batches
from d2llm.biencoder import baseline_encoder, pair_cosines
from d2llm.config import TASK_KINDS, TaskKind
from d2llm.data.tables import load_pairs
from d2llm.errors import ArtifactError, DataError, ModelError
from d2llm.evaluation.dev import (
    DevSet,
    dataset_metric,
    dev_score,
    dev_sets_id,
    load_dev_sets,
    mean_metric,
    sample_rows,
)
from d2llm.hub import cpu_bf16_active, cpu_bf16_autocast, seed_everything
from d2llm.optim import warmup_decay_scheduler
from d2llm.teachers.base import Pair, Teacher, log_odds
from d2llm.teachers.dev_report import teacher_gains, write_dev_report
from d2llm.teachers.factory import load_teacher
from d2llm.teachers.fusion import FusedScorer, fit_fusion
from d2llm.teachers.per_task import PerTaskTeacher

if TYPE_CHECKING:
    import pandas as pd
    from torch import Tensor

    from d2llm.biencoder import MeanPoolEncoder
    from d2llm.config import Params

log = logging.getLogger(__name__)


class GoldPair(NamedTuple):
    """One training pair of the teacher: its task's prompt, the texts, the target in [0, 1] and,
    when it belongs to a ranked list (``rank_weight > 0``), the list's id."""

    task: str
    pair: Pair
    target: float
    list_id: int | None = None


def gold_targets(df: pd.DataFrame, split: str, dataset: str) -> tuple[pd.DataFrame, list[float]]:
    """Rows of ``split`` and their training targets in [0, 1]: ``is_positive``, or the rescaled score."""
    rows = df[df["split"] == split]
    if rows.empty:
        raise DataError(f"dataset {dataset!r} has no {split!r} rows to fine-tune or evaluate the teacher on")
    if dataset_metric(df) != "spearman":  # a class dataset
        return rows, rows["is_positive"].astype(float).tolist()
    # The scale comes from the whole table, so train and dev are rescaled identically.
    lo, hi = float(df["label"].min()), float(df["label"].max())
    if hi <= lo:
        raise DataError(f"dataset {dataset!r}: every score is {lo}; cannot rescale to [0, 1]")
    return rows, ((rows["label"] - lo) / (hi - lo)).tolist()


def dev_log_odds(teacher: Teacher, dev_sets: list[DevSet]) -> dict[str, np.ndarray]:
    """The teacher's yes/no log-odds ``z_yes - z_no`` on every dev pair, per dev set."""
    out = {}
    for dev in dev_sets:
        logits = teacher.score(dev.pairs, dev.task).logits
        out[dev.name] = log_odds(logits)
    return out


def evaluate_teacher(
    teacher: Teacher, dev_sets: list[DevSet], log_odds: dict[str, np.ndarray] | None = None
) -> dict[str, float]:
    """Dev metric per dataset (points, ``<dataset>/<metric>``) and their mean as ``main``.

    ``log_odds``, when given, receives the scores the metrics were computed from.
    """
    scores = dev_log_odds(teacher, dev_sets)
    if log_odds is not None:
        log_odds.update(scores)
    out = {dev.name: dev_score(dev, scores[dev.name]) for dev in dev_sets}  # monotone in P(yes)
    return {**out, "main": mean_metric(out)}


def baseline_dev_metrics(
    params: Params,
    dev_sets: list[DevSet],
    cosines: dict[str, np.ndarray] | None = None,
    encoder: MeanPoolEncoder | None = None,
) -> dict[str, float]:
    """The same dev metrics for the student's backbone read as a plain bi-encoder (mean-pool cosine).

    A teacher is only worth distilling on a task where it beats this baseline; the report puts
    the two side by side and ``teacher_gains`` decides from them. ``cosines``, when given,
    receives the scores.
    """
    encoder = encoder or baseline_encoder(params)
    out = {}
    for dev in dev_sets:
        scores = pair_cosines(encoder, dev.pairs)
        if cosines is not None:
            cosines[dev.name] = scores
        out[dev.name] = dev_score(dev, scores)
    return {**out, "main": mean_metric(out)}


def fit_dev_fusion(
    dev_sets: list[DevSet], log_odds: dict[str, np.ndarray], cosines: dict[str, np.ndarray]
) -> tuple[FusedScorer, dict[str, float]]:
    """Per dev set, the teacher/bi-encoder interpolation with the best dev metric (teachers.fusion)."""
    by_dataset, tasks, fused = {}, {}, {}
    for dev in dev_sets:
        weights, value = fit_fusion(log_odds[dev.name], cosines[dev.name], lambda s, d=dev: dev_score(d, s))
        by_dataset[dev.dataset], tasks[dev.dataset] = weights, dev.task
        fused[dev.name] = value
    # Weights only (no bi-encoder): they go into the dev report, FusedScorer.load reads them back.
    return FusedScorer(by_dataset, tasks), {**fused, "main": mean_metric(fused)}


def fused_dev_metrics(
    fusion: FusedScorer,
    dev_sets: list[DevSet],
    log_odds: dict[str, np.ndarray],
    cosines: dict[str, np.ndarray],
) -> dict[str, float]:
    """Dev metrics of the teacher fused with weights fitted elsewhere (the select part's, applied to
    the validate part: an estimate of the fused teacher's gain that its fit did not see)."""
    out = {}
    for dev in dev_sets:
        weights = fusion.for_dataset(dev.dataset, dev.task)
        out[dev.name] = dev_score(dev, weights.log_odds(log_odds[dev.name], cosines[dev.name]))
    return {**out, "main": mean_metric(out)}


def validate_report(
    teacher: Teacher, params: Params, prepared_dir: str | Path, fusion: FusedScorer | None
) -> dict[str, dict[str, float]]:
    """Teacher, bi-encoder and (with fusion) fused teacher on the *validate* parts of the dev
    splits: what gates the datasets worth distilling (``teacher_gains``); nothing was tuned on it.
    It covers the dev report's datasets (zero-shot ones included) and every trained one (the gate's)."""
    ft = params.teacher.finetune
    sets = load_dev_sets(
        prepared_dir,
        list(dict.fromkeys([*teacher_dev_datasets(params), *ft.datasets])),
        ft.max_dev_pairs,
        params.seed,
        "validate",
        params.selection.validate_fraction,
    )
    log_odds: dict[str, np.ndarray] = {}
    cosines: dict[str, np.ndarray] = {}
    report = {
        "validate_after": evaluate_teacher(teacher, sets, log_odds),
        "validate_baseline": baseline_dev_metrics(params, sets, cosines),
    }
    if fusion is not None:
        report["validate_fused"] = fused_dev_metrics(fusion, sets, log_odds, cosines)
    return report


def sample_lists(rows: pd.DataFrame, list_size: int, limit: int | None, seed: int) -> pd.DataFrame:
    """A ranked dataset's training rows as lists, with a ``list_`` column numbering them.

    Per question (``text_a``, in a seeded order): at most ``list_size - 1`` of its positives
    (``target_ >= 0.5``) and negatives sampled to fill ``list_size`` rows. Questions without
    both are skipped (they teach no ranking); lists are added until the next would pass ``limit``
    rows. Empty when no question has both.
    """
    import pandas as pd

    questions = rows["text_a"].drop_duplicates().sample(frac=1.0, random_state=seed)
    groups = dict(tuple(rows.groupby("text_a", sort=False)))
    lists: list[pd.DataFrame] = []
    total = 0
    for question in questions:
        group = groups[question]
        positive = group["target_"] >= 0.5
        if positive.all() or not positive.any():
            continue
        pos = group[positive].sample(n=min(int(positive.sum()), list_size - 1), random_state=seed)
        neg = group[~positive]
        neg = neg.sample(n=min(len(neg), list_size - len(pos)), random_state=seed)
        if limit is not None and total + len(pos) + len(neg) > limit and lists:
            break
        lists.append(pd.concat([pos, neg]).assign(list_=len(lists)))
        total += len(pos) + len(neg)
    return pd.concat(lists) if lists else rows.iloc[:0].assign(list_=0)


def load_gold(params: Params, prepared_dir: str | Path) -> tuple[list[GoldPair], list[DevSet]]:
    """Training pairs and one dev set per fine-tuning dataset.

    ``max_train_pairs`` / ``max_dev_pairs`` cap each dataset (a seeded sample), keeping the mix;
    ``asym_max_train_pairs``, when set, caps the asym (QA) datasets instead.
    With ``rank_weight > 0`` an asym dataset's pairs come as lists (``sample_lists``); one with
    no question holding both a positive and a negative is sampled pair by pair.
    """
    ft = params.teacher.finetune
    train: list[GoldPair] = []
    num_lists = 0  # list ids run on across datasets
    for name in ft.datasets:
        try:
            df = load_pairs(prepared_dir, name)
        except ArtifactError as err:  # nothing to fine-tune on: a data error, as an empty split is
            raise DataError(f"prepared pairs for dataset {name!r} not found: {err}") from None
        rows, targets = gold_targets(df, "train", name)
        rows = rows.assign(target_=targets)
        asym = bool((rows["task"] == "asym").all())
        cap = ft.asym_max_train_pairs if asym and ft.asym_max_train_pairs is not None else ft.max_train_pairs
        if ft.rank_weight > 0 and asym:
            lists = sample_lists(rows, ft.rank_list_size, cap, params.seed)
            if not lists.empty:
                train += [
                    GoldPair(r.task, (r.text_a, r.text_b), float(r.target_), num_lists + int(r.list_))
                    for r in lists.itertuples()
                ]
                num_lists += int(lists["list_"].max()) + 1
                continue
            log.warning("teacher rank loss: %s has no question with both a positive and a negative", name)
        rows = sample_rows(rows, cap, params.seed, table_order=False)
        train += [GoldPair(r.task, (r.text_a, r.text_b), float(r.target_)) for r in rows.itertuples()]
    # Only the select parts choose the epoch and the fusion weights (validate_report).
    fraction = params.selection.validate_fraction
    dev_sets = load_dev_sets(
        prepared_dir, teacher_dev_datasets(params), ft.max_dev_pairs, params.seed, "select", fraction
    )
    return train, dev_sets


def teacher_dev_datasets(params: Params) -> list[str]:
    """The datasets the teacher's dev report covers (``teacher.finetune.dev_datasets``)."""
    ft = params.teacher.finetune
    return list(ft.dev_datasets if ft.dev_datasets is not None else ft.datasets)


def _encode_training(
    teacher: Teacher, train: list[GoldPair]
) -> tuple[list[Encoding], list[float], list[int | None]]:
    """Encodings of all training pairs (each with its task's prompt), targets and list ids aligned."""
    encodings: list[Encoding] = []
    targets: list[float] = []
    list_ids: list[int | None] = []
    for task in ("sym", "asym"):
        rows = [row for row in train if row.task == task]
        if rows:
            encodings += teacher.encode_pairs([row.pair for row in rows], task)  # type: ignore[arg-type]
            targets += [row.target for row in rows]
            list_ids += [row.list_id for row in rows]
    return encodings, targets, list_ids


def epoch_batches(
    encodings: list[Encoding], list_ids: list[int | None], batch_size: int, seed: int
) -> list[list[int]]:
    """One epoch's batches in seeded order: rows outside a list bucketed by length, each list
    whole within one batch (``pack_lists``). Without lists: exactly the length-bucketed batches."""
    free = [i for i, list_id in enumerate(list_ids) if list_id is None]
    lengths = [len(encodings[i]["input_ids"]) for i in free]
    batches = [[free[j] for j in b] for b in bucket_batches(lengths, batch_size, shuffle=True, seed=seed)]
    lists: dict[int, list[int]] = {}
    for i, list_id in enumerate(list_ids):
        if list_id is not None:
            lists.setdefault(list_id, []).append(i)
    if lists:
        batches += pack_lists(list(lists.values()), batch_size, seed)
        random.Random(seed).shuffle(batches)
    return batches


def list_softmax_loss(margins: Tensor, targets: Tensor, list_ids: Tensor) -> Tensor | None:
    """Listwise softmax loss: mean over the lists of ``logsumexp(m) - logsumexp(m[positives])``.

    ``margins`` are the yes-no log-odds of a batch, ``targets`` in [0, 1] (positive: >= 0.5),
    ``list_ids`` the list of each row (-1: none). The loss of a list is minus the log of the
    softmax mass its positives hold, 0 when they hold it all. Lists without both a positive and a
    negative teach no ranking and are left out; None when no list is left.
    """
    import torch

    losses = []
    for list_id in torch.unique(list_ids):
        if int(list_id) < 0:
            continue
        rows = list_ids == list_id
        m, positive = margins[rows], targets[rows] >= 0.5
        if positive.all() or not positive.any():
            continue
        losses.append(torch.logsumexp(m, dim=0) - torch.logsumexp(m[positive], dim=0))
    return torch.stack(losses).mean() if losses else None


CHECKPOINT_DIR = "checkpoint"  # inside the teacher's out_dir while it trains


@dataclass
class TeacherLoop:
    """Where the teacher's loop stands; each checkpoint saves it, and a resumed run goes on from it."""

    inputs: str  # fingerprint of what the run depends on: a checkpoint of other inputs is stale
    step: int = 0
    epoch: int = 0  # the epoch in progress (or last finished), 1-based; 0 before training
    batch: int = 0  # batches of that epoch done; 0 once its dev evaluation is done
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    best_main: float | None = None  # None: no epoch measured yet (eval_before off)
    best_epoch: int = 0
    best_scores: dict[str, list[float]] = field(default_factory=dict)  # the kept epoch's dev log-odds


def teacher_inputs_fingerprint(
    params: Params, train: list[GoldPair], dev_sets: list[DevSet], bf16: bool
) -> str:
    """What a fine-tuning run depends on: the config of stage "teacher-finetune", its training
    pairs and targets, its dev pairs, and whether its steps run in bf16."""
    from d2llm.fingerprint import value_fingerprint
    from d2llm.stages import param_values

    return value_fingerprint(
        {
            "params": param_values("teacher-finetune", params),
            "train": [[row.task, *row.pair, row.target, row.list_id] for row in train],
            "dev": dev_sets_id(dev_sets),
            "bf16": bf16,
        }
    )


def _save_teacher_checkpoint(
    folder: Path, trainable: list[Tensor], best: list[Tensor] | None, optimizer, scheduler, loop: TeacherLoop
) -> None:
    from d2llm.checkpoint import save_checkpoint

    tensors = {str(i): p for i, p in enumerate(trainable)}
    tensors.update({f"best.{i}": p for i, p in enumerate(best or [])})
    save_checkpoint(folder, tensors, optimizer, scheduler, asdict(loop))


def _resume_teacher(
    folder: Path, trainable: list[Tensor], optimizer, scheduler, inputs: str
) -> tuple[TeacherLoop, list[Tensor] | None] | None:
    """The loop and kept weights of ``folder``'s checkpoint, the trainable weights, optimizer,
    scheduler and RNGs restored; None (train afresh) when there is none or it is of other inputs."""
    from d2llm.checkpoint import resume_matching

    stale = f"teacher checkpoint in {folder} was made from other data or settings: training afresh"
    named = {str(i): p for i, p in enumerate(trainable)}
    resumed = resume_matching(
        folder, inputs, named, optimizer, scheduler, stale, "the teacher's trainable weights"
    )
    if resumed is None:
        return None
    loop, extra = resumed
    best = [extra[f"best.{i}"] for i in range(len(trainable))] if "best.0" in extra else None
    state = TeacherLoop(**loop)
    log.info("teacher fine-tuning: resumed at step %d (epoch %d)", state.step, max(state.epoch, 1))
    return state, best


def train_teacher(
    teacher: Teacher,
    params: Params,
    train: list[GoldPair],
    dev_sets: list[DevSet],
    best_log_odds: dict[str, np.ndarray] | None = None,
    checkpoint_dir: Path | None = None,
    stop_after_steps: int | None = None,
):
    """The training loop; returns metrics per epoch, losses and the number of optimiser steps.

    ``best_log_odds``, when given, receives the kept epoch's dev scores (for fusion).
    ``checkpoint_dir``: the loop's whole state is saved there every
    ``teacher.finetune.checkpoint_every`` steps and after each epoch's dev evaluation, and a run
    finding a checkpoint of the same inputs there goes on from it (the same steps, batches and
    dropout as without the stop). ``stop_after_steps`` stops (InterruptedError) after that many
    steps of this call, its state saved, as a kill would (to test resumption).
    """
    import torch

    ft = params.teacher.finetune
    if teacher.kind == "causal_lm" and ft.lora.enabled:
        teacher.enable_lora(ft.lora)  # type: ignore[attr-defined]
    trainable = [p for m in teacher.modules() for p in m.parameters() if p.requires_grad]
    if not trainable:
        raise ModelError("the teacher has no trainable parameters")
    encodings, targets, list_ids = _encode_training(teacher, train)
    steps_per_epoch = math.ceil(len(encodings) / ft.batch_size)
    total = math.ceil(ft.epochs * steps_per_epoch)
    if ft.max_steps is not None:
        total = min(total, ft.max_steps)
    optimizer = torch.optim.AdamW(trainable, lr=ft.lr, weight_decay=ft.weight_decay)
    scheduler = warmup_decay_scheduler(optimizer, total, ft.warmup_ratio)
    target_t = torch.tensor(targets, dtype=torch.float32)
    list_t = torch.tensor([-1 if i is None else i for i in list_ids], dtype=torch.long)

    bf16 = cpu_bf16_active(teacher.device, ft.cpu_bf16)
    inputs = teacher_inputs_fingerprint(params, train, dev_sets, bf16)
    resumed = (
        _resume_teacher(checkpoint_dir, trainable, optimizer, scheduler, inputs) if checkpoint_dir else None
    )
    if resumed is not None:
        loop, best_weights = resumed
    else:
        loop, best_weights = TeacherLoop(inputs), None
        loop.history.append({"epoch": 0, "step": 0})
        if ft.eval_before:  # else the first epoch is kept unless a later one beats it
            scores: dict[str, np.ndarray] = {}
            loop.history[0].update(evaluate_teacher(teacher, dev_sets, scores))
            loop.best_main, best_weights = loop.history[0]["main"], [p.detach().clone() for p in trainable]
            loop.best_scores = {k: v.tolist() for k, v in scores.items()}

    def save() -> None:
        if checkpoint_dir is not None:
            _save_teacher_checkpoint(checkpoint_dir, trainable, best_weights, optimizer, scheduler, loop)

    steps_this_run = 0
    bar = tqdm(total=total, initial=loop.step, desc="teacher fine-tune", leave=False)
    while loop.step < total:
        if loop.batch == 0:
            loop.epoch += 1
        teacher.train()
        # The epoch's seeded order, less the batches a stopped run already trained on.
        order = epoch_batches(encodings, list_ids, ft.batch_size, params.seed + loop.epoch)[loop.batch :]
        for batch in padded_batches(encodings, order, teacher.tokenizer.pad_token_id, teacher.padding_side):
            with cpu_bf16_autocast(teacher.device, ft.cpu_bf16):
                logits, _ = teacher.forward({k: v.to(teacher.device) for k, v in batch.tensors.items()})
            y = target_t[batch.indices].to(logits.device)
            # softmax([z_yes, z_no])[0] == sigmoid(z_yes - z_no): BCE on the difference is stable.
            # float(): under bf16 autocast the logits are bf16; the loss is taken in float32.
            margin = (logits[:, 0] - logits[:, 1]).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(margin, y)
            if ft.rank_weight > 0:
                rank = list_softmax_loss(margin, y, list_t[batch.indices].to(logits.device))
                loss = loss if rank is None else loss + ft.rank_weight * rank
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, ft.grad_clip)
            optimizer.step()
            scheduler.step()
            loop.losses.append(float(loss.detach()))
            loop.step, loop.batch, steps_this_run = loop.step + 1, loop.batch + 1, steps_this_run + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loop.losses[-1]:.4f}")
            if loop.step >= total:
                break
            if loop.step % ft.checkpoint_every == 0 or steps_this_run == stop_after_steps:
                save()
            if steps_this_run == stop_after_steps:
                bar.close()
                raise InterruptedError(f"teacher fine-tuning stopped after {steps_this_run} steps on request")
        scores = {}
        metrics = evaluate_teacher(teacher, dev_sets, scores)
        loop.history.append({"epoch": loop.epoch, "step": loop.step, **metrics})
        log.info("teacher epoch %d (step %d): dev %s", loop.epoch, loop.step, metrics)
        if loop.best_main is None or math.isnan(loop.best_main) or metrics["main"] > loop.best_main:
            loop.best_main, loop.best_epoch = metrics["main"], loop.epoch
            best_weights = [p.detach().clone() for p in trainable]
            loop.best_scores = {k: v.tolist() for k, v in scores.items()}
        loop.batch = 0
        save()
    bar.close()
    if best_log_odds is not None:
        best_log_odds.update({k: np.asarray(v) for k, v in loop.best_scores.items()})
    with torch.no_grad():
        for p, saved in zip(trainable, best_weights or [], strict=best_weights is not None):
            p.copy_(saved)
    teacher.eval()
    return loop.history, loop.losses, loop.step, loop.best_epoch


class TeacherFit(NamedTuple):
    """What training one teacher (or both parts of a per-task one) gave."""

    history: list[dict[str, Any]]  # per epoch (per part and epoch, with "task", for a per-task teacher)
    losses: list[float]
    steps: int
    best_epoch: int | dict[str, int]  # per part for a per-task teacher
    dev_before: dict[str, float] | None
    dev_after: dict[str, float]
    train_pairs: int


def _fit(
    teacher: Teacher,
    params: Params,
    train: list[GoldPair],
    dev_sets: list[DevSet],
    log_odds: dict[str, np.ndarray],
    checkpoint_dir: Path | None = None,
    stop_after_steps: int | None = None,
) -> TeacherFit:
    history, losses, steps, best_epoch = train_teacher(
        teacher, params, train, dev_sets, log_odds, checkpoint_dir, stop_after_steps
    )
    metrics = [{k: v for k, v in h.items() if k not in ("epoch", "step")} for h in history]
    return TeacherFit(history, losses, steps, best_epoch, metrics[0] or None, metrics[best_epoch], len(train))


def _fit_per_task(
    params: Params,
    train: list[GoldPair],
    dev_sets: list[DevSet],
    log_odds: dict[str, np.ndarray],
    checkpoint_dir: Path | None = None,
    stop_after_steps: int | None = None,
) -> tuple[PerTaskTeacher, TeacherFit]:
    """One teacher per task kind, each fine-tuned from the base model on its task's datasets and
    chosen on its task's dev sets, as if trained alone (the same seed, sampling and recipe).
    Each part checkpoints in ``checkpoint_dir/<task>``."""
    parts: dict[TaskKind, Teacher] = {}
    fits: dict[str, TeacherFit] = {}
    rows_of = {task: [row for row in train if row.task == task] for task in TASK_KINDS}
    for task, rows in rows_of.items():  # before either part trains (and checkpoints)
        if not rows:
            raise DataError(
                f"teacher.finetune.per_task: no {task} dataset in teacher.finetune.datasets to fine-tune "
                f"the {task} teacher on (sym: NLI, STS; asym: QA)"
            )
    for task, rows in rows_of.items():
        seed_everything(params.seed)
        parts[task] = load_teacher(params.teacher, None, params.device)
        part_dev = [d for d in dev_sets if d.task == task]
        part_checkpoint = checkpoint_dir / task if checkpoint_dir is not None else None
        fits[task] = _fit(parts[task], params, rows, part_dev, log_odds, part_checkpoint, stop_after_steps)
        log.info("%s teacher: %d pairs, dev %s", task, len(rows), fits[task].dev_after)

    def merged(key: str) -> dict[str, float] | None:
        parts_metrics = [getattr(fit, key) for fit in fits.values()]
        if any(m is None for m in parts_metrics):
            return None
        out = {k: v for m in parts_metrics for k, v in m.items() if k != "main"}
        return {**out, "main": mean_metric(out)}

    fit = TeacherFit(
        history=[{"task": task, **h} for task, f in fits.items() for h in f.history],
        losses=[loss for f in fits.values() for loss in f.losses],
        steps=sum(f.steps for f in fits.values()),
        best_epoch={task: f.best_epoch for task, f in fits.items()},
        dev_before=merged("dev_before"),
        dev_after=merged("dev_after") or {},
        train_pairs=len(train),
    )
    return PerTaskTeacher(parts), fit


def finetune_teacher(
    params: Params,
    prepared_dir: str | Path,
    out_dir: str | Path,
    teacher: Teacher | None = None,
    resume: bool = True,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``params.teacher`` on the gold train splits and save it to ``out_dir``.

    With ``teacher.finetune.enabled: false`` only the reference to the base model is saved. With
    ``teacher.finetune.per_task`` one teacher per task kind is fine-tuned and saved
    (``d2llm.teachers.per_task``; ``teacher`` must then be None). Returns dev metrics
    before/after, the best epoch, losses and timing.

    While it trains, ``out_dir/checkpoint`` holds the loop's state (``train_teacher``); with
    ``resume`` a run finding one of the same inputs there goes on from it; without, it is
    replaced. It is removed once the teacher is saved. ``stop_after_steps``: as in
    ``train_teacher`` (tests).
    """
    seed_everything(params.seed)
    ft = params.teacher.finetune
    if ft.per_task and teacher is not None:
        raise ValueError("teacher.finetune.per_task builds its own parts: pass no teacher")
    if teacher is None and not ft.per_task:
        teacher = load_teacher(params.teacher, None, params.device)
    if not ft.enabled:
        assert teacher is not None  # per_task needs enabled (config)
        teacher.save_pretrained(out_dir, include_weights=False)
        return {"enabled": False, "kind": teacher.kind, "model": params.teacher.model}
    train, dev_sets = load_gold(params, prepared_dir)
    start = time.perf_counter()
    log_odds: dict[str, np.ndarray] = {}
    checkpoint_dir = Path(out_dir) / CHECKPOINT_DIR
    if not resume:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if ft.per_task:
        teacher, fit = _fit_per_task(params, train, dev_sets, log_odds, checkpoint_dir, stop_after_steps)
    else:
        assert teacher is not None
        fit = _fit(teacher, params, train, dev_sets, log_odds, checkpoint_dir, stop_after_steps)
    seconds = time.perf_counter() - start
    teacher.save_pretrained(out_dir)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the teacher is saved: nothing to resume
    cosines: dict[str, np.ndarray] = {}
    dev_baseline = baseline_dev_metrics(params, dev_sets, cosines)
    dev_report: dict[str, Any] = {"dev_after": fit.dev_after, "dev_baseline": dev_baseline}
    fusion = None
    if params.teacher.fusion == "biencoder":
        fusion, dev_report["dev_fused"] = fit_dev_fusion(dev_sets, log_odds, cosines)
        dev_report["fusion"] = fusion.to_json()
    dev_report.update(validate_report(teacher, params, prepared_dir, fusion))
    result = {
        "enabled": True,
        "kind": teacher.kind,
        "model": params.teacher.model,
        "train_pairs": fit.train_pairs,
        # Lists trained with the listwise loss (teacher.finetune.rank_weight > 0; else 0).
        "train_lists": len({row.list_id for row in train if row.list_id is not None}),
        "steps": fit.steps,
        "best_epoch": fit.best_epoch,
        "dev_before": fit.dev_before,
        "dev_after": fit.dev_after,
        "dev_baseline": dev_baseline,
        "dev_fused": dev_report.get("dev_fused"),
        "fusion": dev_report.get("fusion"),
        **{k: v for k, v in dev_report.items() if k.startswith("validate_")},
        # Teacher minus bi-encoder on the validate parts; the distil decision is labelling's gate.
        "gains": teacher_gains(dev_report),
        "history": fit.history,
        "loss_first": fit.losses[0] if fit.losses else None,
        "loss_last": fit.losses[-1] if fit.losses else None,
        "train_seconds": seconds,
        "pairs_per_second": fit.steps * ft.batch_size / seconds if seconds > 0 else None,
    }
    # The dev comparison travels with the teacher: labelling reads it to pick the families to distil.
    write_dev_report(out_dir, dev_report)
    log.info(
        "teacher fine-tuned: dev %s -> %s (best epoch %d); bi-encoder baseline %s",
        result["dev_before"],
        result["dev_after"],
        fit.best_epoch,
        result["dev_baseline"],
    )
    return result
