"""Is bf16 autocast worth it on this CPU? float32 against bf16 for the student's backbone.

The CPU options ``student.cpu_bf16``, ``teacher.finetune.cpu_bf16`` and ``labelling.quantization:
bf16`` pay only where the CPU does bf16 arithmetic in hardware (AVX512-BF16, AMX, Arm BF16);
elsewhere torch emulates it and autocast is slower than float32. ``d2llm.hub.cpu_bf16_allowed``
decides which one a run gets; this measures both here, whatever it decides, on the backbone of
``student.backbone`` (mean pooling, as the bi-encoder reads it):

- **encode**: ``--texts`` real train texts (SICK + SNLI), batches of ``--batch-size``, under
  ``torch.inference_mode``;
- **train**: ``--steps`` optimiser steps on batches of ``--batch-size`` texts (a mean-pooled
  forward pass, a scalar loss, backward, AdamW on every weight: the backbone's share of a
  distillation or teacher fine-tuning step).

Both formats run interleaved, ``--repeats`` times (median reported).

    python -m benchmarks.cpu_bf16 [--texts 512] [--steps 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import common
from d2llm.config import Params

FORMATS = {"float32": "off", "bf16": "on"}  # the format -> $D2LLM_CPU_BF16 that forces it


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=512, help="texts encoded per repetition")
    p.add_argument("--steps", type=int, default=4, help="training steps per repetition")
    p.add_argument("--batch-size", type=int, default=32, help="texts per batch")
    p.add_argument(
        "--datasets", nargs="+", default=["sick", "snli"], help="where the texts come from (train)"
    )
    args = p.parse_args(argv)
    for name in ("texts", "steps", "batch_size", "repeats"):
        common.check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    return args


def sample_texts(args: argparse.Namespace, params: Params) -> list[str]:
    """``--texts`` distinct train texts of ``--datasets``, a seeded sample."""
    from d2llm.data.tables import load_pairs

    prepared = args.prepared_dir or params.data.prepared_dir
    texts: list[str] = []
    for name in args.datasets:
        df = load_pairs(prepared, name)
        texts += df.loc[df["split"] == "train", "text_a"].drop_duplicates().tolist()
    if len(texts) < args.texts:
        raise SystemExit(f"only {len(texts)} train texts in {args.datasets}, --texts asks for {args.texts}")
    return random.Random(args.seed).sample(texts, args.texts)


def in_format(fmt: str, work: Callable[[], Any]) -> Callable[[], Any]:
    """``work`` with ``$D2LLM_CPU_BF16`` set so that d2llm's autocast runs ``fmt``."""

    def run() -> Any:
        with common.cpu_bf16_env(FORMATS[fmt]):
            return work()

    return run


def measure(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    import torch

    from d2llm.biencoder import MeanPoolEncoder
    from d2llm.hub import cpu_bf16_autocast, cpu_has_bf16

    student = params.student
    encoder = MeanPoolEncoder.from_ref(
        student.backbone, student.gguf_file, student.trust_remote_code,
        max_length=student.max_length, batch_size=args.batch_size, device="cpu", cpu_bf16=True,
    )  # fmt: skip
    texts = sample_texts(args, params)
    tok = encoder.tokenizer(
        texts, truncation=True, max_length=student.max_length, padding=True, return_tensors="pt"
    )
    batches = [
        {k: v[i : i + args.batch_size] for k, v in tok.items()} for i in range(0, len(texts), args.batch_size)
    ]
    model = encoder.model
    # A tiny learning rate: the weights barely move between repeats.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def train() -> None:
        model.train()
        for step in range(args.steps):
            batch = batches[step % len(batches)]
            with cpu_bf16_autocast(torch.device("cpu"), True):
                hidden = model(**batch).last_hidden_state
            hidden.float().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()

    systems = {}
    for fmt in FORMATS:
        systems[f"encode {fmt}"] = in_format(fmt, lambda: encoder.encode(texts))
        systems[f"train {fmt}"] = in_format(fmt, train)
    times = common.interleaved_timings(systems, args.repeats)
    seconds = {name: common.median(t) for name, t in times.items()}
    return {
        "backbone": student.backbone,
        "cpu_has_bf16": cpu_has_bf16(),
        "d2llm_chooses": "bf16" if cpu_has_bf16() else "float32",
        "texts": args.texts,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": student.max_length,
        "seconds": seconds,
        "raw_seconds": times,
        "texts_per_second": {fmt: args.texts / seconds[f"encode {fmt}"] for fmt in FORMATS},
        "steps_per_second": {fmt: args.steps / seconds[f"train {fmt}"] for fmt in FORMATS},
        "bf16_speedup": {
            work: common.ratio(seconds[f"{work} float32"], seconds[f"{work} bf16"])
            for work in ("encode", "train")
        },
    }


def print_report(results: dict[str, Any]) -> None:
    rows = [
        [
            work,
            results["seconds"][f"{work} float32"],
            results["seconds"][f"{work} bf16"],
            results["bf16_speedup"][work],
        ]
        for work in ("encode", "train")
    ]
    print(common.format_table(["work", "float32 s", "bf16 s", "bf16 speed-up (x)"], rows))
    chosen = results["d2llm_chooses"]
    print(f"bf16 in hardware: {results['cpu_has_bf16']}; d2llm's bf16 options run {chosen} here")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run("cpu_bf16", argv, parse_args, measure, print_report)


if __name__ == "__main__":
    main()
