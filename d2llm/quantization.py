"""int8 dynamic quantisation of a model's Linear layers, for CPU inference (labelling, serving).

Dynamic quantisation stores each ``nn.Linear`` weight as int8 (one scale per output row) and
quantises the activations per batch at run time, so the matrix products run as int8 x int8 with
int32 accumulation (fbgemm/oneDNN on x86). Everything else (embeddings, LayerNorm, softmax, the
attention products) stays float32. It is an approximation, off by default
(``teacher.quantization``, ``student.quantization``); ``benchmarks/cpu_efficiency.py`` measures
its speed-up and what it changes in the dev metrics.

torch 2.13 still ships ``torch.ao.quantization.quantize_dynamic`` but marks it deprecated in
favour of torchao's ``quantize_``; this module is the one place that calls it, so a move to
torchao touches nothing else.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Literal

from d2llm.errors import ModelError

if TYPE_CHECKING:
    from torch import nn

Quantization = Literal["none", "int8"]


def quantize_linear_int8(module: nn.Module, inplace: bool = False) -> nn.Module:
    """``module`` (a copy unless ``inplace``) with every ``nn.Linear`` replaced by a dynamically
    quantised int8 one. CPU only; the result runs inference only (no gradients)."""
    import torch
    from torch import nn

    device = next(module.parameters()).device
    if device.type != "cpu":
        raise ModelError(f"int8 dynamic quantisation runs on the CPU only; the model is on {device}")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    target = module if inplace else copy.deepcopy(module)
    with warnings.catch_warnings():
        # The deprecation notice of torch.ao.quantization: see the module docstring.
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        return quantize_dynamic(
            target, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )


def apply_quantization(module: nn.Module, kind: Quantization, inplace: bool = False) -> nn.Module:
    """``module`` as configured: unchanged for ``"none"``, int8 Linear layers for ``"int8"``."""
    if kind == "none":
        return module
    if kind == "int8":
        return quantize_linear_int8(module, inplace=inplace)
    raise ModelError(f"unknown quantization {kind!r}; expected 'none' or 'int8'")


def is_quantized(module: nn.Module) -> bool:
    """True when some layer of ``module`` is a dynamically quantised Linear."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(isinstance(m, DynamicLinear) for m in module.modules())
