"""Content fingerprints of files, folders and configs.

Used wherever "has this input changed?" must be answered: Prefect cache keys, the search index
manifest, the labelling manifest. Content, not modification times, so a fresh clone with the same
data gets the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_sha256(path: Path, digest: Any = None) -> str:
    digest = digest or hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def path_fingerprint(path: str | Path, ignore: tuple[str, ...] = ("checkpoint",)) -> str:
    """sha256 over the relative names and contents of every file under ``path`` (or of one file).

    Folders named in ``ignore`` (e.g. a training checkpoint) are left out: they describe how an
    artefact was made, not what it is. A missing path has the fingerprint "missing".
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    digest = hashlib.sha256()
    if path.is_file():
        return file_sha256(path, digest)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part in ignore or part.endswith(".tmp") for part in relative.parts):
            continue
        digest.update(str(relative).encode())
        digest.update(b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def value_fingerprint(value: Any) -> str:
    """sha256 of a JSON-able value (e.g. a config section's ``model_dump(mode="json")``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def code_fingerprint() -> str:
    """sha256 of the d2llm package's source: a code change invalidates cached pipeline steps."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for file in sorted(package.rglob("*.py")):
        digest.update(str(file.relative_to(package)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def state_fingerprint(module: Any) -> str:
    """sha256 of a torch module's state dict (names, dtypes, shapes and bytes, sorted by name)."""
    import torch

    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            # Raw bytes, whatever the dtype (bf16 has no numpy equivalent).
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
