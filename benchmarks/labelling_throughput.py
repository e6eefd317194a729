"""Teacher labelling throughput: length-bucketed batches vs padding every batch to max_length.

The authors' code padded every batch to the maximum length. ``d2llm.batching`` sorts pairs by
token length and pads each batch only to its own longest row. This benchmark labels the same
real pairs (SICK + SNLI train by default) with the same teacher and batch size both ways, as
labelling does (logits and features), and reports pairs/s and their ratio, the share of
computed tokens that were padding, and the largest difference between the two modes' logits
(padding is masked out, so it must be float noise).

Fixed padding is slow, so the pairs are split into ``--repeats`` slices: each repetition labels
one slice in both modes, in alternating order, and the medians over slices are reported.
Tokenisation is done once, untimed (it is the same work in both modes).

    python -m benchmarks.labelling_throughput [--pairs 1000] [--teacher-dir models/teacher]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from d2llm import layout

NAME = "labelling_throughput"
MODES = ("bucketed", "fixed")  # d2llm.batching padding "longest" and "fixed"

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=4)
    p.add_argument("--pairs", type=int, default=1000, help="pairs labelled per mode, over all slices")
    p.add_argument("--datasets", nargs="+", default=["sick", "snli"], help="pair datasets (train split)")
    p.add_argument("--teacher-dir", type=Path, default=layout.TEACHER_DIR, help="saved teacher, if any")
    p.add_argument("--batch-size", type=int, default=None, help="default: teacher.batch_size")
    args = p.parse_args(argv)
    common.check_positive("--pairs", args.pairs)
    common.check_positive("--repeats", args.repeats)
    if args.pairs < args.repeats:
        raise SystemExit(f"--pairs ({args.pairs}) must be at least --repeats ({args.repeats}): one per slice")
    return args


def sample_pairs(prepared_dir: Path, datasets: Sequence[str], total: int, seed: int) -> list[tuple[str, str]]:
    """About ``total / len(datasets)`` train pairs of each dataset (seeded), shuffled together."""
    from d2llm.data import load_pairs

    pairs: list[tuple[str, str]] = []
    for i, name in enumerate(datasets):
        want = total // len(datasets) + (1 if i < total % len(datasets) else 0)
        df = load_pairs(prepared_dir, name, split="train")
        df = df.sample(n=min(want, len(df)), random_state=seed)
        pairs += list(zip(df["text_a"].astype(str), df["text_b"].astype(str), strict=True))
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order]


def label(teacher: Any, encodings: list[dict], padding: str, batch_size: int) -> tuple[Any, Any]:
    """Teacher logits and features of pre-tokenised pairs, batched the given way (no grad)."""
    import torch

    from d2llm.batching import map_batched

    def run(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = teacher.forward({k: v.to(teacher.device) for k, v in batch.items()})
        return logits.float(), features.float()

    teacher.eval()
    with torch.inference_mode():
        return map_batched(
            encodings,
            run,
            batch_size=batch_size,
            pad_id=teacher.tokenizer.pad_token_id,
            side=teacher.padding_side,
            padding="longest" if padding == "bucketed" else "fixed",
            max_length=teacher.cfg.max_length,
        )


def computed_tokens(lengths: Sequence[int], padding: str, batch_size: int, max_length: int) -> int:
    """Token positions the model computes (real + padding) for one slice in one mode."""
    from d2llm.batching import bucket_batches

    if padding == "fixed":
        return len(lengths) * max_length  # every row padded to max_length
    return sum(len(b) * max(lengths[i] for i in b) for b in bucket_batches(lengths, batch_size))


def measure(args: argparse.Namespace, params: Any) -> dict[str, Any]:
    prepared_dir = args.prepared_dir or params.data.prepared_dir
    teacher, teacher_desc = common.load_teacher(params, args.teacher_dir)
    batch_size = args.batch_size or params.teacher.batch_size
    pairs = sample_pairs(prepared_dir, args.datasets, args.pairs, args.seed)
    encodings = teacher.encode_pairs(pairs, "sym")  # untimed: identical in both modes
    lengths = [len(e["input_ids"]) for e in encodings]
    slices = np.array_split(np.arange(len(encodings)), args.repeats)

    # Warm-up (untimed): one batch each way.
    for mode in MODES:
        label(teacher, encodings[:batch_size], mode, batch_size)

    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    max_diff = 0.0
    from tqdm.auto import tqdm

    for rep, idx in enumerate(tqdm(slices, desc="slices", unit="slice")):
        part = [encodings[i] for i in idx]
        outputs = {}
        for mode in MODES[rep % 2 :] + MODES[: rep % 2]:  # alternate which mode runs first
            start = time.perf_counter()
            outputs[mode] = label(teacher, part, mode, batch_size)
            elapsed = time.perf_counter() - start
            seconds[mode].append(elapsed)
            rates[mode].append(len(part) / elapsed)
        max_diff = max(max_diff, float((outputs["bucketed"][0] - outputs["fixed"][0]).abs().max()))

    real = sum(lengths)
    tokens = {m: sum(computed_tokens([lengths[i] for i in idx], m, batch_size, teacher.cfg.max_length)
                     for idx in slices) for m in MODES}  # fmt: skip
    pairs_per_s = {m: common.median(rates[m]) for m in MODES}
    return {
        "teacher": teacher_desc,
        "datasets": list(args.datasets),
        "pairs": len(pairs),
        "slices": len(slices),
        "batch_size": batch_size,
        "max_length": teacher.cfg.max_length,
        "mean_tokens_per_pair": real / len(lengths),
        "max_tokens_per_pair": max(lengths),
        "pairs_per_second": pairs_per_s,
        "speedup_bucketed_over_fixed": common.ratio(pairs_per_s["bucketed"], pairs_per_s["fixed"]),
        "computed_tokens": tokens,
        "padding_fraction": {m: 1.0 - real / tokens[m] for m in MODES},
        "max_abs_logit_difference": max_diff,
        "raw_seconds": seconds,
    }


def print_report(results: dict[str, Any]) -> None:
    rows = [
        [m, results["pairs_per_second"][m], results["computed_tokens"][m], results["padding_fraction"][m]]
        for m in MODES
    ]
    print(
        f"\nTeacher labelling throughput ({results['pairs']} pairs of {'+'.join(results['datasets'])}, "
        f"batch {results['batch_size']}, max_length {results['max_length']}, "
        f"median of {results['slices']} slices; teacher: {results['teacher']})"
    )
    print(common.format_table(["padding", "pairs/s", "computed tokens", "padding share"], rows))
    print(
        f"bucketed / fixed: {results['speedup_bucketed_over_fixed']:.2f}x; mean pair length "
        f"{results['mean_tokens_per_pair']:.1f} tokens; max |logit difference| between modes "
        f"{results['max_abs_logit_difference']:.2e}"
    )
    print(common.SHARED_MACHINE_NOTE)


def plot(results: dict[str, Any], path: Path) -> Path:
    fig, ax = common.new_figure(5.5, 3.5)
    values = [results["pairs_per_second"][m] for m in MODES]
    bars = ax.bar(MODES, values, color=["tab:green", "tab:gray"])
    for bar, m in zip(bars, MODES, strict=True):
        share = results["padding_fraction"][m]
        ax.annotate(f"{share:.0%} padding", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)  # fmt: skip
    ax.set_ylim(0, 1.15 * max(values))  # room for the labels
    ax.set_ylabel("pairs / s (median)")
    ax.set_title(f"Teacher labelling: {results['speedup_bucketed_over_fixed']:.2f}x with length bucketing")
    return common.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv, args, params = common.start(argv, parse_args)
    results = measure(args, params)
    results["plot"] = str(plot(results, args.out_dir / f"{NAME}.png"))
    path = common.write_report(NAME, args.out_dir, argv, results)
    print_report(results)
    print(f"wrote {path} and {results['plot']}")
    return results


if __name__ == "__main__":
    main()
