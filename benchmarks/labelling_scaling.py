"""Labelling throughput on the Ray executor with 1, 2, ... workers: pairs/s and scaling efficiency.

Builds training groups from real pairs (SICK + SNLI train by default: each pair's second text
is its positive, K other texts of the sample its negatives; the cost is what matters here, not
the labels) and labels them with ``labelling.executor: ray`` and each worker count in
``--workers``, ``--repeats`` times, counts interleaved. Each run starts its actors afresh; the
report separates their start-up (process start, imports, teacher load) from the scoring, and
counts as pairs/s the teacher-scored pairs (per group B(K+1) with features plus B(B-1)
in-batch pairs) over the scoring seconds. Scaling efficiency of n workers:
``rate(n) / (n * rate(1))``.

Each worker is one actor with ``--threads`` torch threads and a whole CPU of Ray's count; the
local cluster gets ``max(--workers) * --threads`` CPUs. On a machine shared with other jobs the
figures move with their load: compare the ratios.

    python -m benchmarks.labelling_scaling [--workers 1 2] [--groups 24] [--teacher-dir models/teacher]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from d2llm import layout

NAME = "labelling_scaling"

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=2, threads=1)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    p.add_argument("--groups", type=int, default=24, help="groups labelled per run")
    p.add_argument("--group-size", type=int, default=8, help="B")
    p.add_argument("--negatives", type=int, default=3, help="K")
    p.add_argument("--shard-groups", type=int, default=2, help="groups per shard (the unit of work)")
    p.add_argument("--datasets", nargs="+", default=["sick", "snli"], help="pair datasets (train split)")
    p.add_argument("--teacher-dir", type=Path, default=layout.TEACHER_DIR, help="saved teacher, if any")
    args = p.parse_args(argv)
    for name in ("groups", "group_size", "negatives", "shard_groups", "repeats"):
        common.check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if min(args.workers) < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    return args


def synthetic_negatives(prepared_dir: Path, args: argparse.Namespace):
    """``groups * B`` real pairs as mined rows: positive = the pair's second text, K random others."""
    import pandas as pd

    from benchmarks.labelling_throughput import sample_pairs

    pairs = sample_pairs(prepared_dir, args.datasets, args.groups * args.group_size * 2, args.seed)
    seen: set[str] = set()
    unique = [(a, b) for a, b in pairs if not (a in seen or seen.add(a))]  # distinct anchors
    rows = unique[: args.groups * args.group_size]
    if len(rows) < args.groups * args.group_size:
        raise SystemExit(f"only {len(rows)} distinct pairs for {args.groups} groups of {args.group_size}")
    rng = np.random.default_rng(args.seed)
    others = [b for _, b in rows]
    negatives = [[others[j] for j in rng.choice(len(others), args.negatives, replace=False)] for _ in rows]
    return pd.DataFrame(
        {
            "dataset": "bench",
            "task": "sym",
            "anchor": [a for a, _ in rows],
            "positive": others,
            "negatives": negatives,
            "method": "bm25",
        }
    )


def teacher_folder(params: Any, teacher_dir: Path, scratch: Path) -> tuple[Path, str]:
    """The saved teacher, or the configured base model saved as a reference in ``scratch``."""
    from d2llm.teachers.base import TEACHER_JSON
    from d2llm.teachers.factory import load_teacher

    if (teacher_dir / TEACHER_JSON).is_file():
        return teacher_dir, f"saved ({teacher_dir})"
    load_teacher(params.teacher, None, "cpu").save_pretrained(scratch / "teacher", include_weights=False)
    return scratch / "teacher", f"base model ({params.teacher.kind} {params.teacher.model})"


def run_config(params: Any, args: argparse.Namespace, workers: int) -> Any:
    raw = params.model_dump(mode="json")
    raw["device"] = "cpu"
    raw["teacher"]["fusion"] = "none"  # the teacher's own cost (fusion needs a fine-tuned teacher)
    raw["labelling"].update(
        group_size=args.group_size,
        shard_groups=args.shard_groups,
        max_groups_per_dataset=None,
        min_teacher_gain=None,
        executor="ray",
        engine="hf",
    )
    raw["labelling"]["ray"].update(
        num_workers=workers, cpus_per_worker=float(args.threads), torch_threads=args.threads
    )
    from d2llm.config import params_from_dict

    return params_from_dict(raw, "benchmark config")


def label_once(params: Any, negatives: Path, teacher: Path, out_dir: Path) -> dict[str, Any]:
    from d2llm.labelling import finalise_labelling, plan_labelling
    from d2llm.labelling.ray_executor import score_on_ray

    shutil.rmtree(out_dir, ignore_errors=True)
    plan = plan_labelling(params, negatives, teacher, out_dir)
    start = time.perf_counter()
    run, scoring = score_on_ray(plan, params, teacher)
    run["wall_seconds"] = time.perf_counter() - start
    finalise_labelling(plan, scoring, run)
    return run


def measure(args: argparse.Namespace, params: Any) -> dict[str, Any]:
    import ray

    prepared_dir = args.prepared_dir or params.data.prepared_dir
    pairs_per_group = args.group_size * (args.negatives + 1) + args.group_size * (args.group_size - 1)
    scratch = Path(tempfile.mkdtemp(prefix="d2llm-bench-"))
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=max(args.workers) * args.threads, include_dashboard=False, logging_level="WARNING")
    try:
        synthetic_negatives(prepared_dir, args).to_parquet(scratch / "negatives.parquet")
        teacher, teacher_desc = teacher_folder(params, args.teacher_dir, scratch)
        runs: dict[int, list[dict[str, Any]]] = {w: [] for w in args.workers}
        for rep in range(args.repeats):
            order = args.workers[rep % len(args.workers) :] + args.workers[: rep % len(args.workers)]
            for workers in order:  # rotate which count runs first
                cfg = run_config(params, args, workers)
                runs[workers].append(label_once(cfg, scratch / "negatives.parquet", teacher, scratch / "out"))
    finally:
        if started_here:
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    pairs = args.groups * pairs_per_group
    rate = {w: common.median([pairs / r["scoring_seconds"] for r in rs]) for w, rs in runs.items()}
    base = rate.get(1)
    return {
        "teacher": teacher_desc,
        "groups": args.groups,
        "group_size": args.group_size,
        "num_negatives": args.negatives,
        "shards": -(-args.groups // args.shard_groups),
        "pairs": pairs,
        "threads_per_worker": args.threads,
        "pairs_per_second": rate,
        "scaling_efficiency": {w: common.ratio(rate[w], w * base) if base else None for w in rate},
        "startup_seconds": {w: common.median([r["startup_seconds"] for r in rs]) for w, rs in runs.items()},
        "raw_runs": runs,
    }


def print_report(results: dict[str, Any]) -> None:
    rows = [
        [w, results["pairs_per_second"][w], results["scaling_efficiency"][w], results["startup_seconds"][w]]
        for w in results["pairs_per_second"]
    ]
    print(
        f"\nRay labelling scaling ({results['pairs']} teacher-scored pairs in {results['groups']} groups, "
        f"B={results['group_size']}, K={results['num_negatives']}, {results['shards']} shards, "
        f"{results['threads_per_worker']} thread(s) per worker; teacher: {results['teacher']})"
    )
    print(common.format_table(["workers", "pairs/s", "scaling efficiency", "start-up s"], rows))
    print(common.SHARED_MACHINE_NOTE)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run(NAME, argv, parse_args, measure, print_report)


if __name__ == "__main__":
    main()
