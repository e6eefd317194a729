"""Distil the teacher into the student: the training loop.

Each micro-step sees one labelled group (B anchors, their positives and K hard negatives each)
and the teacher's scores for exactly those pairs, so the in-batch teacher matrix is always
valid; an optimisation step accumulates ``grad_accum`` of them. Groups are shuffled between
epochs (never their content), with an order derived from the seed and the epoch so that a
resumed run replays the same sequence. Under torchrun the same loop runs on every rank
(``training.distributed``, docs/distributed.md); rank 0 alone evaluates and saves.

The dev metric (not a training loss) is measured at step 0, every ``eval_every`` steps and at the
last step (``is_evaluation_step``); the best student is kept, so early stopping can never return
a model worse than the one it started from.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from d2llm.config import Params, ScoringKey
from d2llm.errors import ArtifactError
from d2llm.evaluation.dev import DevSet, dev_score, load_dev_sets, mean_metric, task_kind_mean
from d2llm.hub import cpu_bf16_active
from d2llm.jsonfile import write_json

if TYPE_CHECKING:
    import pandas as pd

    from d2llm.distributed import DistContext
    from d2llm.labelling.shards import Labels
    from d2llm.losses import D2LLMLoss, GroupSlice
    from d2llm.student.model import D2LLMStudent

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
HISTORY_FILE = "training_history.json"


# --------------------------------------------------------------------------- dev evaluation


def load_training_dev_sets(params: Params, prepared_dir: Path, watch: bool = False) -> list[DevSet]:
    """The select parts of the dev splits early stopping reads (``training.dev_datasets``), or with
    ``watch`` those it only reports (``training.watch_datasets``); the validate parts are left for
    promotion and the reported validation figure."""
    cfg = params.training
    return load_dev_sets(
        prepared_dir,
        cfg.watch_datasets if watch else cfg.dev_datasets,
        cfg.max_dev_pairs,
        params.seed,
        "select",
        params.selection.validate_fraction,
    )


def dev_mean(per_set: dict[str, float], dev_sets: list[DevSet], how: str) -> float:
    """The one number early stopping maximises (``training.dev_mean``)."""
    return task_kind_mean(per_set, dev_sets) if how == "task_kinds" else mean_metric(per_set)


def evaluate_dev(student: D2LLMStudent, dev_sets: list[DevSet], batch_size: int = 64) -> dict[str, float]:
    """Each dev set's metric (points) from the student's IEM scores, and their mean as ``main``.

    The mean over every family is what early stopping maximises, so a step that helps one
    family by hurting another by as much is not taken as progress (``Distiller`` replaces it by
    ``dev_mean`` when the sets are weighed by task kind).
    """
    return score_dev(student, dev_sets, encode_dev(student, dev_sets, batch_size))


def encode_dev(
    student: D2LLMStudent, dev_sets: list[DevSet], batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """The student's vector of every distinct text of the dev sets, encoded once (SICK and SICK-R
    share their pairs; answer-selection questions repeat for each candidate)."""
    texts = sorted({text for dev in dev_sets for pair in dev.pairs for text in pair})
    was_training = student.training
    student.eval()
    with torch.no_grad():
        vectors = student.encode(texts, batch_size=batch_size)
    student.train(was_training)
    return dict(zip(texts, vectors, strict=True))


def score_dev(
    student: D2LLMStudent, dev_sets: list[DevSet], vectors: dict[str, torch.Tensor]
) -> dict[str, float]:
    """``evaluate_dev`` from vectors already encoded (``encode_dev``): only the IEM runs."""
    out = {}
    with torch.no_grad():
        for dev in dev_sets:
            e_a = torch.stack([vectors[a] for a, _ in dev.pairs])
            e_b = torch.stack([vectors[b] for _, b in dev.pairs])
            scores = student.score_vectors(e_a, e_b, dev.family).float().cpu().numpy()
            out[dev.name] = dev_score(dev, scores)
    return {**out, "main": mean_metric(out)}


@contextmanager
def iem_moved(iem: Any, start: dict[str, torch.Tensor], weight: float) -> Iterator[None]:
    """Inside the block the IEM is at ``start + weight (trained - start)`` (``training.iem_weights``);
    its trained weights are back after it, in the same tensors (the optimiser keeps them)."""
    if weight == 1.0:
        yield
        return
    from d2llm.student.iem import move_iem_

    trained = {name: value.detach().clone() for name, value in iem.state_dict().items()}
    move_iem_(iem, start, trained, weight)
    try:
        yield
    finally:
        iem.load_state_dict(trained)


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
    """One training group: its texts and the teacher's logits and feature cosines for them.

    ``key`` is what the student's IEM scores the group with: its dataset's family (nli, sts,
    asym), which the paper's two-branch IEM maps to sym/asym (d2llm.student.iem).
    """

    key: ScoringKey
    anchors: list[str]
    positives: list[str]
    negatives: list[list[str]]
    in_batch: torch.Tensor  # [B, B, 2]
    hard: torch.Tensor  # [B, K+1, 2]
    feature_cos: torch.Tensor  # [B, K+1, K+1]

    def anchor_slice(self, rank: int, world_size: int) -> tuple[LabelledGroup, GroupSlice]:
        """Rank ``rank``'s contiguous share of the anchors, with their rows of the teacher's tensors.

        The in-batch rows keep all B columns: the positives of every rank, gathered in rank
        order, are those columns, so anchor i's positive stays at column ``offset + i``.
        """
        from d2llm.losses import GroupSlice

        size = len(self.anchors)
        if size % world_size:
            raise ArtifactError(
                f"a group of {size} anchors does not split over {world_size} ranks: with "
                "training.distributed.mode global_batch, label with labelling.group_size a multiple "
                "of the number of processes"
            )
        rows = slice(rank * size // world_size, (rank + 1) * size // world_size)
        share = LabelledGroup(
            key=self.key,
            anchors=self.anchors[rows],
            positives=self.positives[rows],
            negatives=self.negatives[rows],
            in_batch=self.in_batch[rows],
            hard=self.hard[rows],
            feature_cos=self.feature_cos[rows],
        )
        return share, GroupSlice(offset=rows.start, anchors=size)


def group_families(groups: Any, families: dict[str, str], layout: str) -> dict[str, str]:
    """``{dataset: scoring key}`` for the datasets of ``groups``: the family where it is known.

    A per-family IEM (``layout == "family"``) cannot tell an NLI group from an STS one by its
    task kind alone, so a sym dataset of unknown family is an error there.
    """
    out = {}
    for dataset, task in dict.fromkeys(zip(groups["dataset"], groups["task"], strict=True)):
        if dataset in families:
            out[dataset] = families[dataset]
        elif layout == "family" and task == "sym":
            raise ArtifactError(
                f"the labels' dataset {dataset!r} is not in the prepared data, so its family (nli or "
                "sts) is unknown; student.iem.branches: family needs it (prepare it, or use 'task')"
            )
        else:
            out[dataset] = task
    return out


def first_groups(labels: Labels, per_dataset: int | None) -> Labels:
    """``labels`` with at most ``per_dataset`` groups of each dataset (the first by group id)."""
    from d2llm.labelling.shards import Labels

    if per_dataset is None:
        return labels
    rank = labels.groups.groupby("dataset").cumcount()
    keep = np.flatnonzero((rank < per_dataset).to_numpy())
    index = torch.as_tensor(keep)
    return Labels(
        labels.groups.iloc[keep].reset_index(drop=True),
        labels.group_id[index],
        labels.in_batch[index],
        labels.hard[index],
        labels.feature_cos[index],
    )


def labelled_group(labels: Any, index: int, families: dict[str, str] | None = None) -> LabelledGroup:
    """Group ``index`` of ``labels``; ``families`` ({dataset: family}) gives its scoring key
    (default: the group's task kind, sym or asym)."""
    row = labels.groups.iloc[index]
    return LabelledGroup(
        key=(families or {}).get(row["dataset"], row["task"]),
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
    task: ScoringKey,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits for a group: in-batch [B, B], hard [B, K+1] and IEM branch vectors [B, K+1, H].

    Each text is encoded once; the in-batch matrix reuses the positives' vectors. ``gather``
    (global in-batch negatives) turns this rank's positive vectors into the whole group's, with
    gradient: the in-batch logits are then this rank's rows, [b, B].
    """
    batch, k = len(anchors), len(negatives[0])
    flat_negatives = [text for row in negatives for text in row]
    e_a = student.embed_texts(anchors)
    e_c = student.embed_texts(positives + flat_negatives)
    e_pos, e_neg = e_c[:batch], e_c[batch:].view(batch, k, -1)
    e_in = e_pos if gather is None else gather(e_pos)  # the in-batch columns
    columns = e_in.shape[0]

    dim = e_a.shape[-1]
    z_in = student.score_vectors(
        e_a.unsqueeze(1).expand(batch, columns, dim).reshape(-1, dim),
        e_in.unsqueeze(0).expand(batch, columns, dim).reshape(-1, dim),
        task,
    ).view(batch, columns)
    candidates = torch.cat([e_pos.unsqueeze(1), e_neg], dim=1)  # [B, K+1, d], column 0 = positive
    z_hn, u_hn = student.iem_features(
        e_a.unsqueeze(1).expand(batch, k + 1, dim).reshape(-1, dim),
        candidates.reshape(-1, dim),
        task,
    )
    return z_in, z_hn.view(batch, k + 1), u_hn.view(batch, k + 1, -1)


def group_loss(
    student: D2LLMStudent,
    loss_fn: D2LLMLoss,
    group: LabelledGroup,
    ranks: DistContext | None = None,
    use_bf16: bool = False,
) -> dict[str, torch.Tensor]:
    """The loss parts of one labelled group (FlagEmbedding's ``compute_loss``, for D2LLM).

    ``ranks`` (global in-batch negatives): this rank scores its slice of the anchors against
    every rank's positives and returns its share of the group's loss; the shares add up to the
    loss of the whole group in one process.
    """
    device = student.device
    part, gather = None, None
    if ranks is not None and ranks.enabled:
        group, part = group.anchor_slice(ranks.rank, ranks.world_size)
        gather = ranks.gather_rows
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        z_in, z_hn, u_hn = group_logits(
            student, group.anchors, group.positives, group.negatives, group.key, gather
        )
        return loss_fn(
            z_in=z_in.float(),
            z_hn=z_hn.float(),
            t_in=group.in_batch.to(device),
            t_hn=group.hard.to(device),
            u_hn=u_hn.float(),
            c_teacher=group.feature_cos.to(device),
            part=part,
        )


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
    iem_weight: float = 1.0  # the kept student's IEM weight (training.iem_weights)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "history"}

    @classmethod
    def read(cls, out_dir: Path) -> TrainResult:
        """The result a finished run wrote to ``out_dir`` (how a launcher of torchrun gets it)."""
        saved = json.loads((Path(out_dir) / HISTORY_FILE).read_text(encoding="utf-8"))
        return cls(**saved["summary"], history=saved["history"])


@dataclass
class LoopState:
    """Where the loop stands; every checkpoint saves it, so a resumed run continues from here."""

    inputs: str  # fingerprint of what the run depends on: a checkpoint of other inputs is stale
    step: int = 0
    micro: int = 0  # groups consumed so far (by all ranks) in the seeded epoch order
    best_metric: float | None = None
    best_step: int = 0
    best_iem_weight: float = 1.0
    initial_metric: float | None = None
    initial_per_set: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def training_inputs_fingerprint(
    params: Params, labels_dir: Path, dev_sets: list[DevSet], world_size: int = 1, bf16: bool = False
) -> str:
    """What a training run depends on: its labels, its dev pairs, the config keys of stage "train",
    on several processes their number (it decides which groups make a step), and whether the
    steps run in bf16: the same config runs bf16 on one CPU and float32 on another
    (``Distiller.uses_bf16``), and a checkpoint of one format is not resumed in the other."""
    from d2llm.fingerprint import path_fingerprint, value_fingerprint
    from d2llm.labelling.shards import MANIFEST_FILE
    from d2llm.stages import param_values

    inputs: dict[str, Any] = {
        "params": param_values("train", params),
        "labels": path_fingerprint(Path(labels_dir) / MANIFEST_FILE),
        "dev": [
            {"name": d.name, "pairs": d.pairs, "gold": d.gold.tolist(), "task": d.task} for d in dev_sets
        ],
    }
    if world_size > 1:
        inputs["world_size"] = world_size
    if bf16:  # only then, so that float32 checkpoints keep the fingerprint they were made with
        inputs["number_format"] = "bf16"
    return value_fingerprint(inputs)


def is_evaluation_step(step: int, total_steps: int, eval_every: int) -> bool:
    """Evaluate every ``eval_every`` steps and at the last step. A periodic evaluation less than
    half an interval before the last is left to the last one: it would measure nearly the same
    student (step 300 of 303) at the cost of a whole dev pass."""
    if step == total_steps:
        return True
    return step % eval_every == 0 and 2 * (total_steps - step) >= eval_every


def epoch_order(datasets: Sequence[str], seed: int, epoch: int, sampling: str = "shuffle") -> list[int]:
    """The group indices of one epoch (``len(datasets)`` of them; ``datasets[i]`` is group i's).

    ``shuffle``: a seeded permutation. ``balanced``: rounds over the datasets, each round in a
    seeded order, each dataset giving its next group (its groups shuffled, cycled when used up),
    so every dataset gets an equal share of the epoch whatever its number of groups.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(datasets), generator=generator).tolist()
    if sampling == "shuffle":
        return order
    queues: dict[str, list[int]] = {}
    for index in order:
        queues.setdefault(datasets[index], []).append(index)
    names, taken, out = sorted(queues), dict.fromkeys(queues, 0), []
    while len(out) < len(order):
        for j in torch.randperm(len(names), generator=generator).tolist():
            queue = queues[names[j]]
            out.append(queue[taken[names[j]] % len(queue)])
            taken[names[j]] += 1
            if len(out) == len(order):
                break
    return out


class Distiller:
    """The student, its optimiser and the loop state of one distillation run.

    One optimiser step takes ``grad_accum`` micro-steps on each rank, one labelled group each.
    On several ranks (``training.distributed.mode``): "groups" gives each rank its own groups,
    so a step sees ``grad_accum x world size`` groups; "global_batch" gives every rank its
    slice of the same group. Either way each rank's loss is divided so that the gradients,
    summed over the ranks, are those of one process accumulating the same groups.
    """

    def __init__(
        self,
        params: Params,
        labels: Any,
        dev_sets: list[DevSet],
        out_dir: Path,
        ranks: DistContext,
        device: torch.device,
        inputs: str,
        families: dict[str, str] | None = None,
        watch_sets: list[DevSet] | None = None,
    ) -> None:
        from d2llm.losses import D2LLMLoss
        from d2llm.optim import warmup_decay_scheduler
        from d2llm.student.model import D2LLMStudent

        cfg = params.training
        self.params, self.cfg, self.labels, self.dev_sets = params, cfg, labels, dev_sets
        self.watch_sets = watch_sets or []
        self.out_dir, self.ranks = out_dir, ranks
        self.families = group_families(labels.groups, families or {}, params.student.iem.branches)
        self.checkpoint_dir = out_dir / CHECKPOINT_DIR
        self.student = D2LLMStudent.from_config(params.student).to(device)
        if cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.student.iem.detach_inputs = cfg.iem_detach
        self.loss_fn = D2LLMLoss(params.loss, teacher_temperature=params.teacher.temperature)
        self.trainable = dict(self.student.trainable_parameters())
        # The IEM's initial weights (seeded, so a resumed run rebuilds the same): training.iem_weights
        # moves the IEM along the line from them to its trained weights.
        self.iem_start = {k: v.detach().clone() for k, v in self.student.iem.state_dict().items()}
        self.optimizer = self.student.configure_optimizers(cfg)

        self.shard_groups = ranks.enabled and cfg.distributed.mode == "global_batch"
        if self.shard_groups and labels.in_batch.shape[1] % ranks.world_size:
            raise ArtifactError(
                f"groups of {labels.in_batch.shape[1]} anchors do not split over {ranks.world_size} ranks: "
                "with training.distributed.mode global_batch, label with labelling.group_size a multiple "
                "of the number of processes"
            )
        # Groups one step consumes over all ranks, and where this rank's come in that sequence.
        per_rank_stride = 1 if self.shard_groups else ranks.world_size
        self.groups_per_step = cfg.grad_accum * per_rank_stride
        self.stride, self.first = per_rank_stride, 0 if self.shard_groups else ranks.rank
        steps_per_epoch = math.ceil(len(labels.groups) / self.groups_per_step)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.scheduler = warmup_decay_scheduler(self.optimizer, self.total_steps, cfg.warmup_ratio)
        self.use_bf16 = self.uses_bf16(params, device)
        self.state = LoopState(inputs=inputs)
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its group order), see next_group

    @staticmethod
    def uses_bf16(params: Params, device: torch.device) -> bool:
        """bf16 autocast of the training steps: training.bf16 on CUDA, student.cpu_bf16 on a CPU."""
        if device.type == "cuda":
            return params.training.bf16
        return cpu_bf16_active(device, params.student.cpu_bf16)

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> None:
        """Continue from ``out_dir/checkpoint`` when it was made from the same inputs."""
        from d2llm.checkpoint import resume_matching

        # A kept checkpoint of other labels or settings (e.g. after a param change under DVC,
        # which keeps models/student to allow resumption) is stale: train afresh.
        stale = (
            f"checkpoint in {self.out_dir} was made from other labels or settings (or in another number "
            "format, bf16 or float32): training afresh"
        )
        resumed = resume_matching(
            self.checkpoint_dir, self.state.inputs, self.trainable, self.optimizer, self.scheduler, stale,
            "the student config",
        )  # fmt: skip
        if resumed is not None:
            self.state = LoopState(**resumed[0])
            log.info("resumed from step %d", self.state.step)

    def save_state(self) -> None:
        from d2llm.checkpoint import save_checkpoint

        if self.ranks.is_main:
            save_checkpoint(
                self.checkpoint_dir, self.trainable, self.optimizer, self.scheduler, asdict(self.state)
            )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> bool:
        """Rank 0 measures the dev metric and keeps the best student; True (on every rank) = stop."""
        stop = self._evaluate_and_keep_best() if self.ranks.is_main else False
        return self.ranks.broadcast(stop)

    def _evaluate_and_keep_best(self) -> bool:
        state = self.state
        sets = [*self.dev_sets, *self.watch_sets]
        vectors = encode_dev(self.student, sets)
        measured: dict[float, dict[str, float]] = {}  # per IEM weight (training.iem_weights)
        for weight in self.cfg.iem_weights:
            with iem_moved(self.student.iem, self.iem_start, weight):
                measured[weight] = score_dev(self.student, sets, vectors)
        per_set = {dev.name: measured[1.0][dev.name] for dev in self.dev_sets}
        metric = dev_mean(per_set, self.dev_sets, self.cfg.dev_mean)
        record = {"step": state.step, "dev_metric": metric, "lr": self.scheduler.get_last_lr()[0]}
        record.update({f"dev/{name}": value for name, value in per_set.items()})
        # Watched sets are reported, never selected on (training.watch_datasets).
        record.update({f"watch/{dev.name}": measured[1.0][dev.name] for dev in self.watch_sets})
        state.history.append(record)
        if state.initial_metric is None:
            state.initial_metric, state.initial_per_set = metric, per_set
        regressed = regressions(per_set, state.initial_per_set, self.cfg.dev_tolerance)
        if regressed:
            record["regressed"] = regressed
        weight, best = self._best_iem_weight(measured, record)
        if state.best_metric is None or (best is not None and best > state.best_metric):
            kept = metric if best is None else best  # step 0 is kept whatever the guard says
            state.best_metric, state.best_step, state.bad_evals = kept, state.step, 0
            state.best_iem_weight = weight
            with iem_moved(self.student.iem, self.iem_start, weight):
                self.student.save_pretrained(self.out_dir)
        else:
            state.bad_evals += 1
        log.info(
            "step %d: dev mean %.2f %s%s%s (best %.2f at step %d%s)",
            state.step,
            metric,
            {name: round(value, 2) for name, value in per_set.items()},
            f"; not kept, below the start on {sorted(regressed)}" if regressed else "",
            f"; IEM weight {weight:g}: {best:.2f}" if weight != 1.0 and best is not None else "",
            state.best_metric,
            state.best_step,
            f", IEM weight {state.best_iem_weight:g}" if state.best_iem_weight != 1.0 else "",
        )
        return state.bad_evals >= self.cfg.patience

    def _best_iem_weight(
        self, measured: dict[float, dict[str, float]], record: dict[str, Any]
    ) -> tuple[float, float | None]:
        """The IEM weight with the highest dev mean among those that pass the guard, and that mean
        (None: every weight regressed). The trained IEM (1.0) wins ties. Recorded in ``record``."""
        best: tuple[float, float | None] = (1.0, None)
        means = {}
        for weight in sorted(measured, key=lambda w: w != 1.0):
            per_set = {dev.name: measured[weight][dev.name] for dev in self.dev_sets}
            means[weight] = mean = dev_mean(per_set, self.dev_sets, self.cfg.dev_mean)
            if regressions(per_set, self.state.initial_per_set, self.cfg.dev_tolerance):
                continue
            if best[1] is None or mean > best[1]:
                best = (weight, mean)
        if len(measured) > 1:
            record["iem_weights"] = {f"{w:g}": value for w, value in sorted(means.items())}
            record["iem_weight"] = best[0]
        return best

    # ------------------------------------------------------------------ training

    def next_group(self, micro: int) -> LabelledGroup:
        """This rank's group for micro-step ``micro`` of the current step (seeded epoch order)."""
        num_groups = len(self.labels.groups)
        epoch, position = divmod(self.state.micro + micro * self.stride + self.first, num_groups)
        if self._order[0] != epoch:
            datasets = self.labels.groups["dataset"].tolist()
            self._order = (epoch, epoch_order(datasets, self.params.seed, epoch, self.cfg.group_sampling))
        return labelled_group(self.labels, self._order[1][position], self.families)

    def optimizer_step(self) -> None:
        params = list(self.trainable.values())
        self.ranks.sum_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def record_losses(self, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        """The last micro-step's loss parts: of the whole group (global batch), or the ranks' mean."""
        values = self.ranks.sum_(torch.stack([value.detach().float() for value in parts.values()]))
        if self.ranks.enabled and not self.shard_groups:
            values = values / self.ranks.world_size
        record = {f"loss_{name}": value for name, value in zip(parts, values.tolist(), strict=True)}
        self.state.history.append({"step": self.state.step, **record})
        return record

    def fit(self, stop_after_steps: int | None = None) -> None:
        """Train until ``max_steps``/``epochs`` or early stopping; checkpoint as configured."""
        from tqdm.auto import tqdm

        cfg, state = self.cfg, self.state
        self.student.train()
        if state.initial_metric is None:
            state.stopped_early = self.evaluate()
            self.save_state()
        progress = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc="distil",
            unit="step",
            disable=not self.ranks.is_main,
        )
        steps_this_run = 0
        while state.step < self.total_steps and not state.stopped_early:
            for micro in range(cfg.grad_accum):
                parts = group_loss(
                    self.student, self.loss_fn, self.next_group(micro), self._shards(), self.use_bf16
                )
                (parts["total"] / self.groups_per_step).backward()
            state.micro += self.groups_per_step
            self.optimizer_step()
            state.step += 1
            steps_this_run += 1
            losses = self.record_losses(parts)
            progress.update(1)
            progress.set_postfix(loss=f"{losses['loss_total']:.3f}")
            if is_evaluation_step(state.step, self.total_steps, cfg.eval_every):
                state.stopped_early = self.evaluate()
                self.save_state()
            elif state.step % cfg.checkpoint_every == 0:
                self.save_state()
            if stop_after_steps is not None and steps_this_run >= stop_after_steps:
                self.save_state()
                progress.close()
                raise InterruptedError(f"stopped after {steps_this_run} steps on request")
        progress.close()
        # Rank 0 alone evaluated: every rank returns its account of the run.
        self.state = self.ranks.broadcast(state)

    def _shards(self) -> DistContext | None:
        return self.ranks if self.shard_groups else None


def train_student(
    params: Params,
    labels_dir: Path,
    prepared_dir: Path,
    out_dir: Path,
    resume: bool = True,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train a student on labelled groups; write the best student to ``out_dir``.

    ``out_dir/checkpoint`` holds the latest full training state and is picked up by a rerun
    (``resume``). ``stop_after_steps`` ends the run early without finishing it, as a kill would
    (used to test resumption). Started by torchrun, this process is one rank of a distributed run
    (d2llm.distributed): rank 0 alone evaluates, saves the student and the checkpoint, and
    writes the history; every rank returns the same result.
    """
    from d2llm.data.tables import dataset_families
    from d2llm.distributed import distributed_context
    from d2llm.hub import pick_device, seed_everything
    from d2llm.labelling.shards import load_labels

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(params.seed)
    with distributed_context(params.training.distributed, pick_device(params.device)) as (ranks, device):
        labels = first_groups(load_labels(labels_dir), params.training.max_groups_per_dataset)
        if len(labels.groups) == 0:
            raise ArtifactError(f"no labelled groups in {labels_dir}: run `d2llm label` first")
        if params.loss.ci_variant == "paper":
            warn_doubted_positives(labels, params.teacher.temperature)
        dev_sets = load_training_dev_sets(params, prepared_dir)
        bf16 = Distiller.uses_bf16(params, device)
        inputs = training_inputs_fingerprint(params, labels_dir, dev_sets, ranks.world_size, bf16)
        families = dataset_families(prepared_dir, set(labels.groups["dataset"]))
        watch_sets = load_training_dev_sets(params, prepared_dir, watch=True)
        trainer = Distiller(params, labels, dev_sets, out_dir, ranks, device, inputs, families, watch_sets)
        if resume:
            trainer.resume()
        ranks.broadcast_parameters(list(trainer.trainable.values()))
        ranks.barrier()  # every rank has read the checkpoint before rank 0 writes the next one
        trainer.fit(stop_after_steps)
        state = trainer.state
        result = TrainResult(
            best_metric=state.best_metric,
            best_step=state.best_step,
            initial_metric=state.initial_metric,
            steps=state.step,
            stopped_early=state.stopped_early,
            seconds=time.perf_counter() - started,
            history=state.history,
            iem_weight=state.best_iem_weight,
        )
        if ranks.is_main:
            write_json(
                out_dir / HISTORY_FILE, {"summary": result.to_dict(), "history": result.history}, indent=1
            )
    return result


def warn_doubted_positives(labels: Labels, temperature: float) -> list[str]:
    """Warn about datasets whose positives the teacher doubts (d2llm.labelling.stats): with the
    paper's teacher-weighted in-batch CI, lowering every logit lowers their loss."""
    from d2llm.labelling.stats import DOUBTED_POSITIVE, doubted_datasets, label_stats

    stats = label_stats(labels, temperature)
    doubted = doubted_datasets(stats)
    if doubted:
        means = ", ".join(f"{r.dataset} {r.positive:.2f}" for r in stats if r.dataset in doubted)
        log.warning(
            "the teacher gives the positives of %s a mean probability below %.1f: the paper's "
            "teacher-weighted in-batch CI then rewards lowering every logit, not ranking "
            "(docs/model.md); loss.ci_variant: authors trains those sets with plain InfoNCE",
            means,
            DOUBTED_POSITIVE,
        )
    return doubted


def run_training(
    params: Params, labels_dir: Path, prepared_dir: Path, out_dir: Path, resume: bool = True
) -> TrainResult:
    """``train_student`` in this process, or on ``training.distributed.nproc_per_node`` torchrun
    workers on this machine (the entry point of the CLI, the DVC stage and the Prefect flow).

    The workers run ``d2llm train`` with this config under the caller's pipeline lock; their
    rank 0 writes the student, its checkpoint and history to ``out_dir``, read back from there.
    """
    import tempfile

    import yaml

    from d2llm.distributed import launch_torchrun, launched_by_torchrun

    nproc = params.training.distributed.nproc_per_node
    if nproc == 1 or launched_by_torchrun():
        return train_student(params, labels_dir, prepared_dir, out_dir, resume=resume)
    with tempfile.TemporaryDirectory(prefix="d2llm-train-") as tmp:
        config = Path(tmp) / "params.yaml"
        config.write_text(yaml.safe_dump(params.model_dump(mode="json")), encoding="utf-8")
        argv = ["--params", str(config), "train", "--labels-dir", str(labels_dir)]
        argv += ["--prepared-dir", str(prepared_dir), "--out-dir", str(out_dir)]
        # The workers' summary and curves are left in tmp: the caller writes its own.
        argv += ["--metrics", f"{tmp}/metrics.json", "--plots-dir", f"{tmp}/plots"]
        launch_torchrun(argv + ([] if resume else ["--no-resume"]), nproc)
    return TrainResult.read(out_dir)


def write_curves(history: list[dict[str, Any]], plots_dir: Path) -> None:
    """The dev metric and loss curves as flat JSON lists, one file each: the form `dvc plots` reads."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name, key in (("dev_metric", "dev_metric"), ("train_loss", "loss_total")):
        records = [record for record in history if key in record]
        write_json(plots_dir / f"{name}.json", records, indent=1)


def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(history)
