"""Length-bucketed batching: sort by token length, pad each batch only to its own longest row.

Texts in a real dataset vary from a few tokens to hundreds. Padding every batch to
``max_length`` (what the authors' code did) spends most of the compute on padding; sorting by
length first makes the rows of a batch similar in length, so padding nearly disappears. Every
batch carries the input positions of its rows, so results are scattered back into input order.

``padding="fixed"`` keeps the old behaviour (every batch padded to ``max_length``); it exists
only so that the benchmark can measure what bucketing buys.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

Padding = Literal["longest", "fixed"]
Side = Literal["left", "right"]
Encoding = dict[str, list[int]]


def bucket_batches(
    lengths: Sequence[int], batch_size: int, shuffle: bool = False, seed: int = 0
) -> list[list[int]]:
    """Input positions grouped into batches of similar length.

    Longest batches come first (an out-of-memory error shows up at once, not after an hour).
    ``shuffle`` shuffles the order of the batches, not their content: training then sees
    batches of mixed lengths in random order while each batch stays tightly padded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Ties broken by position, so the batching is deterministic.
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches


def collate(
    encodings: Sequence[Encoding],
    pad_id: int,
    side: Side = "right",
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad token-id lists into tensors: ``input_ids`` with ``pad_id``, other fields with 0.

    Adds ``attention_mask`` (1 on real tokens). ``pad_to`` pads to a fixed width instead of the
    longest row; rows longer than ``pad_to`` are an error (they should have been truncated).
    """
    import torch

    longest = max(len(e["input_ids"]) for e in encodings)
    width = longest if pad_to is None else pad_to
    if longest > width:
        raise ValueError(f"a row has {longest} tokens, more than pad_to={width}")
    fields = [k for k in encodings[0] if k != "attention_mask"]
    out: dict[str, list[list[int]]] = {k: [] for k in [*fields, "attention_mask"]}
    for enc in encodings:
        n_pad = width - len(enc["input_ids"])
        for key in fields:
            fill = pad_id if key == "input_ids" else 0
            out[key].append(_pad(list(enc[key]), fill, n_pad, side))
        out["attention_mask"].append(_pad([1] * len(enc["input_ids"]), 0, n_pad, side))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def _pad(row: list[int], fill: int, n: int, side: Side) -> list[int]:
    return [fill] * n + row if side == "left" else row + [fill] * n


@dataclass
class Batch:
    indices: list[int]  # input positions of the rows, in row order
    tensors: dict[str, torch.Tensor]


def iter_batches(
    encodings: Sequence[Encoding],
    batch_size: int,
    pad_id: int,
    side: Side = "right",
    padding: Padding = "longest",
    max_length: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[Batch]:
    """Padded batches of ``encodings``; bucketed by length unless ``padding == "fixed"``.

    Fixed padding keeps input order (no sorting) and pads to ``max_length``, as a plain
    DataLoader with ``padding="max_length"`` would.
    """
    if padding == "fixed":
        if max_length is None:
            raise ValueError("padding='fixed' needs max_length")
        positions = list(range(len(encodings)))
        batches = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
        if shuffle:
            random.Random(seed).shuffle(batches)
    else:
        batches = bucket_batches([len(e["input_ids"]) for e in encodings], batch_size, shuffle, seed)
    pad_to = max_length if padding == "fixed" else None
    yield from padded_batches(encodings, batches, pad_id, side, pad_to)


def padded_batches(
    encodings: Sequence[Encoding],
    batches: Sequence[list[int]],
    pad_id: int,
    side: Side = "right",
    pad_to: int | None = None,
) -> Iterator[Batch]:
    """The given batches of input positions, each padded (``collate``) and carrying its positions."""
    for idx in batches:
        yield Batch(idx, collate([encodings[i] for i in idx], pad_id, side, pad_to))


def pack_lists(lists: Sequence[Sequence[int]], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Whole lists of input positions (one question's candidates each) packed into batches of at
    most ``batch_size`` rows, the lists in seeded order: a loss over a list then sees all of it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = [list(rows) for rows in lists]
    random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    current: list[int] = []
    for rows in order:
        if len(rows) > batch_size:
            raise ValueError(f"a list of {len(rows)} rows does not fit a batch of {batch_size}")
        if len(current) + len(rows) > batch_size:
            batches.append(current)
            current = []
        current += rows
    if current:
        batches.append(current)
    return batches


def map_batched(
    encodings: Sequence[Encoding],
    fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
    batch_size: int,
    pad_id: int,
    side: Side = "right",
    padding: Padding = "longest",
    max_length: int | None = None,
    show_progress: bool = False,
    desc: str = "batches",
) -> tuple[torch.Tensor, ...]:
    """Run ``fn`` on padded batches and return its outputs row-aligned with ``encodings``.

    ``fn`` maps one batch of tensors to a tuple of tensors whose first dimension is the batch.
    """
    import torch

    n = len(encodings)
    results: list[torch.Tensor] | None = None
    batches = iter_batches(encodings, batch_size, pad_id, side, padding, max_length)
    total = -(-n // batch_size)
    for batch in tqdm(batches, total=total, desc=desc, disable=not show_progress, leave=False):
        outputs = fn(batch.tensors)
        if results is None:
            # Results live on the CPU: callers store them, and the device memory stays free.
            results = [torch.empty((n, *out.shape[1:]), dtype=out.dtype) for out in outputs]
        index = torch.tensor(batch.indices, dtype=torch.long)
        for store, out in zip(results, outputs, strict=True):
            store[index] = out.detach().to("cpu", store.dtype)
    if results is None:
        raise ValueError("map_batched needs at least one row")
    return tuple(results)
