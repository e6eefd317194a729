"""Students side by side on the *select* parts of dev splits: how recipes are compared.

Recipes are chosen on the select parts (docs/evaluation.md, "Selection"), the parts early
stopping reads; the validate parts are left for promotion and the test sets for the report.
This prints, for each saved student (and the bi-encoder it starts from), each dev set's metric,
the plain mean and the mean that weighs sym and asym sets equally.

    python -m benchmarks.student_dev --student base=models/student --student qa=/tmp/e1/student \\
        --dev sick stsb_en sick_r trecqa wikiqa
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import base_parser, dev_sample, format_table, start, write_report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--student", action="append", default=[], metavar="NAME=DIR", help="a saved student")
    p.add_argument("--dev", nargs="+", required=True, help="dev datasets (their select parts)")
    p.add_argument("--max-pairs", type=int, default=1300, help="per dev set (a seeded sample)")
    p.add_argument("--part", choices=["select", "validate"], default="select")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from d2llm.biencoder import baseline_encoder, pair_cosines
    from d2llm.evaluation.dev import dev_score, mean_metric, task_kind_mean
    from d2llm.hub import pick_device
    from d2llm.student.model import D2LLMStudent
    from d2llm.training import evaluate_dev

    argv, args, params = start(argv, parse_args)
    sets = dev_sample(args, params)
    rows: dict[str, dict[str, float]] = {}
    encoder = baseline_encoder(params)
    rows["bi-encoder"] = {dev.name: dev_score(dev, pair_cosines(encoder, dev.pairs)) for dev in sets}
    for spec in args.student:
        name, _, folder = spec.partition("=")
        student = D2LLMStudent.from_pretrained(Path(folder), device=pick_device(params.device))
        values = evaluate_dev(student, sets)
        values.pop("main")
        rows[name] = values
    for values in rows.values():
        values["mean"] = mean_metric(values)
        values["task-kind mean"] = task_kind_mean({k: v for k, v in values.items() if "/" in k}, sets)
    columns = [*(dev.name for dev in sets), "mean", "task-kind mean"]
    print(f"{args.part} parts of the dev splits (points)")
    table = [[name, *(round(values[c], 2) for c in columns)] for name, values in rows.items()]
    print(format_table(["system", *columns], table))
    report = {"part": args.part, "sets": {d.name: len(d.pairs) for d in sets}, "systems": rows}
    write_report("student_dev", args.out_dir, list(argv or []), report)
    return report


if __name__ == "__main__":
    main()
