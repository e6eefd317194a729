"""Dev metrics of a trained student interpolated toward its starting weights (WiSE-FT probe).

WiSE-FT (Wortsman et al., CVPR 2022) averages fine-tuned and initial weights,
``init + a (trained - init)``, and often generalises better than either end. For the student
the line runs from the bi-encoder (a = 0: PMA as mean pooling, IEM output zero, no LoRA delta)
to the trained student (a = 1). PMA and IEM weights are interpolated; the LoRA update is
scaled, ``a B A``, i.e. the merged backbone weights are interpolated exactly. The initial
weights are rebuilt as training built them (same seed, same config). Two trained ends: the kept
(best) student in RUN_DIR, and the run's last step in RUN_DIR/checkpoint. ``--parts`` moves
only some parts (``lora``, ``pma``, ``iem``; the others stay as trained): ``--parts iem --alphas
1 1.5 2`` is what ``training.iem_weights`` measures during training (a kept student saved with
its IEM already moved is this script's trained end). Usage:

    python scripts/interpolate_student.py --run-dir models/student --alphas 1 0.75 0.5 \
        [--parts lora pma iem] [--params params.yaml] [--prepared-dir data/prepared]

Prints one JSON line per (end, a): the dev metric of each ``training.dev_datasets`` set and
their mean (``main``), as early stopping reads them (docs/results.md, run L).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def trained_ends(run_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """("best", the kept student's weights), then ("last", the checkpoint's) when there is one."""
    from safetensors.torch import load_file

    from d2llm.student.model import D2LLMStudent

    yield "best", dict(D2LLMStudent.from_pretrained(run_dir).named_parameters())
    state = run_dir / "checkpoint" / "state.safetensors"
    if state.is_file():
        tensors = load_file(str(state))
        yield "last", {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


PARTS = ("lora", "pma", "iem")  # what d2llm.student.model.trainable_part returns


def interpolate_(
    trainable: dict[str, Any],
    init: dict[str, Any],
    trained: dict[str, Any],
    alpha: float,
    parts: Sequence[str] = PARTS,
) -> None:
    """In place: ``trainable`` = ``init + alpha (trained - init)``, LoRA as ``alpha B A``; weights
    of the parts not in ``parts`` are the trained ones."""
    import torch

    from d2llm.student.model import trainable_part

    with torch.no_grad():
        for name, param in trainable.items():
            weight = trained[name].to(param.dtype)
            a = alpha if trainable_part(name) in parts else 1.0
            if "lora_A" in name:
                param.copy_(weight)  # the delta B A is scaled through B alone
            else:
                param.copy_(init[name] + a * (weight - init[name]))


def interpolated_dev(
    params_file: str | Path,
    run_dir: str | Path,
    alphas: Sequence[float],
    prepared_dir: str | Path,
    parts: Sequence[str] = PARTS,
) -> list[dict[str, Any]]:
    from d2llm.config import load_params
    from d2llm.hub import seed_everything
    from d2llm.student.model import D2LLMStudent
    from d2llm.training import evaluate_dev, load_training_dev_sets

    params = load_params(params_file)
    seed_everything(params.seed)  # as train_student does before building the student
    student = D2LLMStudent.from_config(params.student)
    trainable = dict(student.trainable_parameters())
    init = {name: p.detach().clone() for name, p in trainable.items()}
    dev_sets = load_training_dev_sets(params, Path(prepared_dir))
    rows = []
    for end, weights in trained_ends(Path(run_dir)):
        for alpha in alphas:
            interpolate_(trainable, init, weights, alpha, parts)
            metrics = evaluate_dev(student, dev_sets)
            rows.append({"end": end, "alpha": alpha, **{k: round(v, 4) for k, v in metrics.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("models/student"))
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared-dir", default="data/prepared")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts moved")
    args = parser.parse_args()
    for row in interpolated_dev(args.params, args.run_dir, args.alphas, args.prepared_dir, args.parts):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
