"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

A checkpoint holds the trainable weights, the optimizer and scheduler state, every RNG state and
the loop position, so a resumed run continues exactly where the interrupted one stopped. It is
written to a temporary folder and renamed into place, so a kill mid-write never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from d2llm.errors import ArtifactError

FORMAT_VERSION = 1

log = logging.getLogger(__name__)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loop_state: dict[str, Any],
) -> None:
    """Write the whole training state atomically to ``folder``."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainable.items()}
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "state.safetensors"))

    np_state = np.random.get_state()
    meta = {
        "format_version": FORMAT_VERSION,
        "loop": loop_state,
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict(),
        "rng_python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=_json_default), encoding="utf-8")
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def read_loop_state(folder: Path) -> dict[str, Any] | None:
    """The loop state of a checkpoint without restoring anything (None when unreadable)."""
    try:
        return json.loads((Path(folder) / "state.json").read_text(encoding="utf-8"))["loop"]
    except (OSError, ValueError, KeyError):
        return None


def load_checkpoint(
    folder: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore optimizer, scheduler and RNG states; return (trainable weights, loop state)."""
    folder = Path(folder)
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ArtifactError(f"checkpoint {folder} is unreadable ({err}); delete it to start afresh") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"checkpoint {folder} has format {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )

    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["rng_numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return weights, meta["loop"]


def resume_matching(
    folder: Path,
    inputs: str,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    stale: str,
    what: str,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Resume from ``folder``'s checkpoint when it was made from ``inputs`` (the fingerprint in its
    loop state): the ``trainable`` weights, optimizer, scheduler and RNGs restored in place.

    Returns the loop state and the checkpoint's other tensors (beyond ``trainable``), or None: no
    checkpoint, or one of other inputs (``stale`` is logged as a warning: resuming it would hand
    back a model of the old inputs, so the caller trains afresh and overwrites it). A checkpoint
    whose weights do not fit ``trainable`` (``what`` names the model) is an ArtifactError.
    """
    folder = Path(folder)
    if not folder.exists():
        return None
    saved = read_loop_state(folder)
    if saved is None or saved.get("inputs") != inputs:
        log.warning(stale)
        return None
    weights, loop = load_checkpoint(folder, optimizer, scheduler)
    mismatched = sorted(
        name for name, param in trainable.items() if name not in weights or weights[name].shape != param.shape
    )
    if mismatched:
        raise ArtifactError(
            f"checkpoint {folder} does not match {what} ({len(mismatched)} params missing or of another "
            f"shape, e.g. {mismatched[0]}); delete it or train into a new folder"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(param.device))
    return loop, {name: tensor for name, tensor in weights.items() if name not in trainable}
