"""Student training throughput and peak memory of the default preset's distillation steps.

One step is exactly what ``d2llm.training.train_student`` does per group: ``group_logits``
(B anchors, B positives, B x K hard negatives encoded with gradients, in-batch and hard IEM
logits), ``D2LLMLoss`` (CI + RI + FI with the params' weights), backward, gradient clipping and
an AdamW step on LoRA + PMA + IEM. B is ``labelling.group_size``, K ``mining.num_negatives``.

Groups are built from real texts (SICK + SNLI train positives, negatives drawn from other
rows); the teacher labels are synthetic with the right shapes (random logits, and the cosine
matrix of random features): the step's cost does not depend on their values.

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process RSS, sampled every
5 ms by a background thread from the first (warm-up) step on (psutil; falls back to
``ru_maxrss``, the whole process's peak, when psutil is missing), next to the RSS once the
student is loaded (weights) and after the warm-up steps (plus optimiser state).

    python -m benchmarks.training_throughput [--steps 10] [-S student.lora.r=16]
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

NAME = "training_throughput"
MIB = 1024 * 1024

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed optimisation steps (one group each)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    p.add_argument("--datasets", nargs="+", default=["sick", "snli"], help="pair datasets (train split)")
    args = p.parse_args(argv)
    common.check_positive("--steps", args.steps)
    if args.warmup_steps < 0:
        raise SystemExit(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    return args


# --------------------------------------------------------------------------- groups


def build_groups(
    prepared_dir: Path, datasets: Sequence[str], count: int, group_size: int, k: int, seed: int
) -> list[Any]:
    """``count`` groups of real texts with synthetic teacher labels of the training shapes."""
    import torch

    from d2llm.data import load_pairs
    from d2llm.data.tables import table_family
    from d2llm.training import LabelledGroup

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    frames = {name: load_pairs(prepared_dir, name, split="train") for name in datasets}
    groups = []
    for g in range(count):
        df = frames[datasets[g % len(datasets)]]
        positives = df[df["is_positive"]]
        if len(positives) < group_size or len(df) < group_size + k:
            raise SystemExit(f"{datasets[g % len(datasets)]}: too few train pairs for groups of {group_size}")
        rows = positives.iloc[rng.choice(len(positives), group_size, replace=False)]
        pool = df["text_b"].astype(str).tolist()
        negatives = [[pool[j] for j in rng.choice(len(pool), k, replace=False)] for _ in range(group_size)]
        features = torch.randn(group_size, k + 1, 64, generator=gen)
        unit = torch.nn.functional.normalize(features, dim=-1)
        groups.append(
            LabelledGroup(
                key=table_family(df),  # type: ignore[arg-type]
                anchors=rows["text_a"].astype(str).tolist(),
                positives=rows["text_b"].astype(str).tolist(),
                negatives=negatives,
                in_batch=torch.randn(group_size, group_size, 2, generator=gen),
                hard=torch.randn(group_size, k + 1, 2, generator=gen),
                feature_cos=unit @ unit.transpose(1, 2),
            )
        )
    return groups


# --------------------------------------------------------------------------- memory


class PeakRSS:
    """Highest resident set size seen while active, sampled by a daemon thread."""

    def __init__(self, interval_s: float = 0.005) -> None:
        try:
            import psutil

            self._process: Any = psutil.Process()
        except ImportError:
            self._process = None
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def method(self) -> str:
        return "psutil RSS sampled every 5 ms" if self._process else "resource ru_maxrss (process peak)"

    def current(self) -> int:
        if self._process is not None:
            return int(self._process.memory_info().rss)
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


# --------------------------------------------------------------------------- training steps


def make_step(student: Any, params: Any, device: Any):
    """One optimisation step on one group, as ``d2llm.training`` runs it; returns the total loss."""
    import torch

    from d2llm.losses import D2LLMLoss
    from d2llm.training import group_loss

    cfg = params.training
    loss_fn = D2LLMLoss(params.loss, teacher_temperature=params.teacher.temperature)
    trainable = [p for _, p in student.trainable_parameters()]
    optimizer = student.configure_optimizers(cfg)
    use_bf16 = cfg.bf16 and device.type == "cuda"

    def step(group: Any) -> float:
        parts = group_loss(student, loss_fn, group, use_bf16=use_bf16)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(parts["total"].detach())

    return step


def measure(args: argparse.Namespace, params: Any) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from d2llm.hub import pick_device
    from d2llm.student.model import D2LLMStudent

    prepared_dir = args.prepared_dir or params.data.prepared_dir
    device = pick_device(params.device)
    b, k = params.labelling.group_size, params.mining.num_negatives
    groups = build_groups(prepared_dir, args.datasets, args.warmup_steps + args.steps, b, k, args.seed)
    student = D2LLMStudent.from_config(
        params.student, gradient_checkpointing=params.training.gradient_checkpointing, device=device
    ).train()
    step = make_step(student, params, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # The monitor covers the warm-up too: the first steps allocate the optimiser state.
    memory = PeakRSS()
    rss_loaded = memory.current()
    seconds, losses = [], []
    with memory:
        for group in groups[: args.warmup_steps]:
            step(group)
        rss_before = memory.current()
        for group in tqdm(groups[args.warmup_steps :], desc="train steps", unit="step"):
            start = time.perf_counter()
            losses.append(step(group))
            seconds.append(time.perf_counter() - start)
    step_s = common.median(seconds)
    texts_per_group = b + b + b * k
    return {
        "device": str(device),
        "group_size": b,
        "num_negatives": k,
        "texts_per_group": texts_per_group,
        "student_max_length": params.student.max_length,
        "lora": params.student.lora.model_dump(),
        "gradient_checkpointing": params.training.gradient_checkpointing,
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "steps": len(seconds),
        "warmup_steps": args.warmup_steps,
        "seconds_per_step": step_s,
        "groups_per_second": 1.0 / step_s,
        "texts_per_second": texts_per_group / step_s,
        "memory": {
            "method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else memory.method,
            "rss_after_load_mib": rss_loaded / MIB,
            "rss_before_steps_mib": rss_before / MIB,
            "peak_rss_mib": memory.peak / MIB,
            "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / MIB
            if device.type == "cuda"
            else None,
        },
        "losses": losses,
        "raw_seconds": seconds,
    }


def print_report(results: dict[str, Any]) -> None:
    mem = results["memory"]
    rows = [[
        f"B={results['group_size']}, K={results['num_negatives']}", results["groups_per_second"],
        results["texts_per_second"], 1000 * results["seconds_per_step"], mem["rss_after_load_mib"],
        mem["peak_rss_mib"], mem["cuda_max_allocated_mib"],
    ]]  # fmt: skip
    header = ["group", "groups/s", "texts/s", "ms/step", "RSS loaded MiB", "peak RSS MiB", "CUDA peak MiB"]
    print(
        f"\nStudent training throughput (median of {results['steps']} steps on {results['device']}, "
        f"{results['trainable_parameters']:,} trainable parameters)"
    )
    print(common.format_table(header, rows))
    print(f"memory: {mem['method']}")
    print(common.SHARED_MACHINE_NOTE)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run(NAME, argv, parse_args, measure, print_report)


if __name__ == "__main__":
    main()
