"""Labelling and encoding throughput as a share of this machine's matmul FLOP/s, and int8.

Three questions, one interleaved run:

1. **Peak**: what a plain float32 GEMM reaches here (``torch.mm`` on transformer-shaped
   products: tokens x d x 4d, tokens x 4d x d, tokens x d x d; the best of them is the peak).
2. **Share**: teacher labelling (the forward passes of ``Teacher.score``: length-bucketed
   batches of ``teacher.batch_size``, pre-tokenised as in ``labelling_throughput``) and student
   encoding (``D2LLMStudent.encode``, the merged student, batches of ``--batch-size`` sorted by
   length) in FLOP/s, counted analytically on the real tokens (padding is not counted: it is
   waste), as a share of that peak.
3. **int8**: the same two workloads with the Linear layers dynamically quantised to int8
   (``labelling.quantization`` / ``student.inference_quantization``: ``d2llm.quantization``),
   their speed-up, and what int8 changes in quality: the teacher's and the student's dev
   metrics (SICK AP, STS-B Spearman: ``d2llm.evaluation.dev``) on seeded dev samples, float32 vs
   int8, and how far the vectors / logits move.

FLOPs of one text of T real tokens through an encoder: ``2 * P * T`` for the Linear layers
(P = their weights: Q, K, V, O and the two FFN matrices of every layer; embeddings are lookups,
the pooler and heads act on one vector per text and are left out) plus ``4 * L * d * T^2``
for the attention products (Q K^T and A V in every one of L layers). The student adds PMA:
``4 * d^2 * T`` (K and V projections) and ``2 * 4 * d^2`` per text (Q, O and the FFN).

    python -m benchmarks.cpu_efficiency [--pairs 256] [--teacher-dir DIR] [--student-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.labelling_throughput import label, sample_pairs
from d2llm import layout

NAME = "cpu_efficiency"
TARGET_SHARE = 0.6  # issue 11: model forward at >= 60% of the plain GEMM's FLOP/s

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=5)
    p.add_argument(
        "--pairs", type=int, default=256, help="train pairs labelled / texts encoded per repetition"
    )
    p.add_argument("--datasets", nargs="+", default=["sick", "snli"], help="pair datasets (train split)")
    p.add_argument("--dev-datasets", nargs="+", default=["sick", "stsb_en"], help="quality check datasets")
    p.add_argument("--dev-pairs", type=int, default=300, help="dev pairs per quality dataset")
    p.add_argument("--batch-size", type=int, default=64, help="student encoding batch size")
    p.add_argument("--gemm-tokens", type=int, default=2048, help="rows of the reference GEMMs")
    p.add_argument("--teacher-dir", type=Path, default=layout.TEACHER_DIR, help="saved teacher, if any")
    p.add_argument("--student-dir", type=Path, default=layout.STUDENT_DIR, help="trained student, if any")
    common.add_clock_option(p)
    args = p.parse_args(argv)
    for name in ("pairs", "dev_pairs", "batch_size", "gemm_tokens", "repeats"):
        common.check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    return args


# --------------------------------------------------------------------------- FLOP counts


def encoder_shape(model: Any) -> tuple[int, int, int]:
    """(weights of the per-token Linear layers, layers L, width d) of a transformer encoder."""
    from torch import nn

    linear = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(part in name for part in ("pooler", "classifier", "lm_head"))
    )
    cfg = model.config
    return linear, int(cfg.num_hidden_layers), int(cfg.hidden_size)


def encoder_flops(shape: tuple[int, int, int], lengths: Sequence[int]) -> float:
    """Forward FLOPs of texts of the given real lengths (see the module docstring)."""
    linear, layers, dim = shape
    t = np.asarray(lengths, dtype=np.float64)
    return float((2.0 * linear * t + 4.0 * layers * dim * t**2).sum())


def pma_flops(dim: int, lengths: Sequence[int]) -> float:
    t = np.asarray(lengths, dtype=np.float64)
    return float((4.0 * dim * dim * t).sum() + 8.0 * dim * dim * len(t))


def gemm_shapes(tokens: int, dim: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the products a transformer layer runs on ``tokens`` rows of width ``dim``."""
    return [(tokens, dim, 4 * dim), (tokens, 4 * dim, dim), (tokens, dim, dim)]


def make_gemm(m: int, k: int, n: int) -> Callable[[], Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    out = torch.empty(m, n)
    return lambda: torch.mm(a, b, out=out)


# --------------------------------------------------------------------------- models


def teacher_backbone(teacher: Any) -> Any:
    """The transformer of a teacher (the cross-encoder's encoder, the causal LM's model)."""
    encoder = getattr(teacher, "encoder", None)
    return encoder if encoder is not None else teacher.modules()[0]


def int8_teacher(teacher: Any) -> Any:
    return copy.deepcopy(teacher).quantize("int8")


def int8_student(student: Any) -> Any:
    """A copy of the merged student with its backbone quantised (shares the tokenizer)."""
    from d2llm.quantization import quantize_linear_int8

    clone = copy.deepcopy(student, {id(student.tokenizer): student.tokenizer})
    clone.backbone = quantize_linear_int8(clone.backbone, inplace=True)
    return clone


# --------------------------------------------------------------------------- quality


def teacher_dev(teacher: Any, devs: Sequence[Any]) -> dict[str, float]:
    from d2llm.evaluation.dev import dev_score
    from d2llm.teachers.base import probabilities

    return {
        dev.name: dev_score(
            dev, probabilities(teacher.score(dev.pairs, dev.task, show_progress=False).logits)
        )
        for dev in devs
    }


def student_dev(student: Any, devs: Sequence[Any]) -> dict[str, float]:
    from d2llm.evaluation.dev import dev_score

    return {dev.name: dev_score(dev, student.score(dev.pairs, dev.family).numpy()) for dev in devs}


def vector_change(reference: Any, other: Any) -> dict[str, float]:
    """How far int8 outputs (vectors, or logit rows) move from float32: row cosines (min, mean)
    and the largest absolute change relative to the largest absolute float32 value."""
    import torch.nn.functional as F

    reference, other = reference.float(), other.float()
    cos = F.cosine_similarity(reference, other, dim=-1)
    relative = (other - reference).abs().max() / reference.abs().max().clamp(min=1e-12)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "max_relative": float(relative)}


# --------------------------------------------------------------------------- measure


def measure(args: argparse.Namespace, params: Any) -> dict[str, Any]:
    import torch

    from d2llm.evaluation.dev import load_dev_sets

    prepared_dir = args.prepared_dir or params.data.prepared_dir
    teacher, teacher_desc = common.load_teacher(params, args.teacher_dir)
    student, student_desc = common.load_student(params, args.student_dir)
    teachers = {"float32": teacher, "int8": int8_teacher(teacher)}
    students = {"float32": student, "int8": int8_student(student)}

    pairs = sample_pairs(prepared_dir, args.datasets, args.pairs, args.seed)
    encodings = teacher.encode_pairs(pairs, "sym")  # untimed, as in labelling_throughput
    teacher_lengths = [len(e["input_ids"]) for e in encodings]
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))[: args.pairs]
    tokenized = student.tokenizer(texts, truncation=True, max_length=student.cfg.max_length)
    student_lengths = [len(ids) for ids in tokenized["input_ids"]]
    t_shape, s_shape = encoder_shape(teacher_backbone(teacher)), encoder_shape(student.backbone)
    flops = {
        "teacher": encoder_flops(t_shape, teacher_lengths),
        "student": encoder_flops(s_shape, student_lengths) + pma_flops(student.dim, student_lengths),
    }
    shapes = gemm_shapes(args.gemm_tokens, s_shape[2])

    timed: dict[str, Callable[[], Any]] = {}
    for m, k, n in shapes:
        timed[f"gemm:{m}x{k}x{n}"] = make_gemm(m, k, n)
    for kind in ("float32", "int8"):
        timed[f"teacher:{kind}"] = lambda t=teachers[kind]: label(
            t, encodings, "bucketed", params.teacher.batch_size
        )
        timed[f"student:{kind}"] = lambda s=students[kind]: s.encode(texts, batch_size=args.batch_size)
    log.info("timing %d measurements x %d repetitions, interleaved", len(timed), args.repeats)
    with torch.inference_mode():
        raw = common.interleaved_timings(timed, args.repeats, warmup=1, clock=args.clock)

    best = {name: min(times) for name, times in raw.items()}
    gemm = {
        name: 2.0 * m * k * n / best[name] for name, (m, k, n) in zip(list(timed)[:3], shapes, strict=True)
    }
    peak = max(gemm.values())
    throughput: dict[str, dict[str, Any]] = {}
    for model in ("teacher", "student"):
        for kind in ("float32", "int8"):
            seconds = best[f"{model}:{kind}"]
            rate = flops[model] / seconds
            throughput[f"{model}:{kind}"] = {
                "seconds_best": seconds,
                "seconds_median": common.median(raw[f"{model}:{kind}"]),
                "items_per_second": (len(pairs) if model == "teacher" else len(texts)) / seconds,
                "flops_per_second": rate,
                "share_of_gemm_peak": rate / peak,  # int8: float32-equivalent FLOPs per second
            }

    log.info("quality: dev samples, float32 vs int8")
    # The select parts, as tuning reads them (the same pairs for float32 and int8).
    devs = load_dev_sets(prepared_dir, args.dev_datasets, args.dev_pairs, args.seed, "select", 0.5)
    with torch.inference_mode():
        quality = {
            "teacher": {kind: teacher_dev(t, devs) for kind, t in teachers.items()},
            "student": {kind: student_dev(s, devs) for kind, s in students.items()},
            "teacher_logits": vector_change(
                *(label(t, encodings, "bucketed", 32)[0] for t in teachers.values())
            ),
            "student_vectors": vector_change(*(s.encode(texts) for s in students.values())),
        }
    return {
        "teacher": teacher_desc,
        "student": student_desc,
        "pairs": len(pairs),
        "texts": len(texts),
        "real_tokens": {"teacher": sum(teacher_lengths), "student": sum(student_lengths)},
        "flops_per_repetition": flops,
        "encoder_shape": {"teacher": t_shape, "student": s_shape},
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "clock": args.clock,  # wall or cpu seconds
        "gemm_flops_per_second": gemm,
        "gemm_peak_flops_per_second": peak,
        "throughput": throughput,
        "int8_speedup": {
            model: throughput[f"{model}:float32"]["seconds_best"]
            / throughput[f"{model}:int8"]["seconds_best"]
            for model in ("teacher", "student")
        },
        "target_share": TARGET_SHARE,
        "quality": quality,
        "raw_seconds": raw,
    }


def print_report(results: dict[str, Any]) -> None:
    g = results["gemm_flops_per_second"]
    print(
        f"\nPlain float32 GEMM ({results['threads']} threads), best of {results['repeats']}: "
        + ", ".join(f"{name[5:]} {rate / 1e9:.1f}" for name, rate in g.items())
        + f" GFLOP/s; peak {results['gemm_peak_flops_per_second'] / 1e9:.1f} GFLOP/s"
    )
    rows = []
    for key, t in results["throughput"].items():
        model, kind = key.split(":")
        unit = "pairs/s" if model == "teacher" else "texts/s"
        rows.append(
            [model, kind, f"{t['items_per_second']:.1f} {unit}", f"{t['flops_per_second'] / 1e9:.1f}",
             f"{100 * t['share_of_gemm_peak']:.0f}%"]
        )  # fmt: skip
    print(common.format_table(["workload", "weights", "throughput (best)", "GFLOP/s", "share of GEMM"], rows))
    s = results["int8_speedup"]
    print(
        f"int8 speed-up: teacher labelling {s['teacher']:.2f}x, student encoding {s['student']:.2f}x "
        f"(target share of float32 forward: >= {100 * results['target_share']:.0f}%)"
    )
    q = results["quality"]
    for model in ("teacher", "student"):
        parts = [
            f"{name} {q[model]['float32'][name]:.2f} -> {q[model]['int8'][name]:.2f}"
            for name in q[model]["float32"]
        ]
        print(f"{model} dev (float32 -> int8): " + ", ".join(parts))
    print(
        f"teacher logits, int8 vs float32: largest change {100 * q['teacher_logits']['max_relative']:.1f}% "
        f"of the largest logit; student vectors cosine: min {q['student_vectors']['min_cosine']:.4f}, "
        f"mean {q['student_vectors']['mean_cosine']:.4f}"
    )
    print(common.SHARED_MACHINE_NOTE)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run(NAME, argv, parse_args, measure, print_report)


if __name__ == "__main__":
    main()
