"""The backbone read as a plain bi-encoder: masked mean of the last hidden states, L2-normalised.

One implementation serves as the mining encoder, the baseline of every evaluation and the
baseline the teacher is checked against, so "the bi-encoder" means the same thing everywhere:
``baseline_encoder(params)`` builds it from the student's backbone settings, ``pair_cosines``
scores pairs with it (the bi-encoder rows of evaluation, the teacher's dev report, fusion).

Batches are always padded on the right, whatever the tokenizer's ``padding_side``: every text
then sits at positions 0..n-1, the positions every model gives it when it is encoded alone, and a
causal decoder's real tokens never see a padding token. A text's vector therefore does not depend
on its batch companions, for encoders and decoders alike. (Left padding shifts the positions of
the shorter rows: harmless for rotary decoders such as Llama or Qwen2, whose attention depends
only on relative positions, but it changes the vectors of any model with absolute positions.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from d2llm.config import Params


class MeanPoolEncoder:
    def __init__(
        self, model: Any, tokenizer: Any, max_length: int = 128, batch_size: int = 64, cpu_bf16: bool = False
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.cpu_bf16 = cpu_bf16  # bf16 autocast on a CPU (student.cpu_bf16)

    @classmethod
    def from_ref(
        cls,
        ref: str,
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
        max_length: int = 128,
        batch_size: int = 64,
        device: str = "auto",
        cpu_bf16: bool = False,
    ) -> MeanPoolEncoder:
        from d2llm.hub import load_pretrained, load_tokenizer, pick_device

        tokenizer = load_tokenizer(ref, gguf_file, trust_remote_code)
        model = load_pretrained("AutoModel", ref, gguf_file, trust_remote_code).to(pick_device(device))
        return cls(model, tokenizer, max_length, batch_size, cpu_bf16)

    def _bf16_asked(self) -> bool:
        """student.cpu_bf16, for a model that is not int8 (int8 kernels take float32 inputs)."""
        from d2llm.quantization import is_quantized

        return self.cpu_bf16 and not is_quantized(self.model)

    def number_format(self) -> str:
        """What :meth:`encode` computes in here: ``"bfloat16 (autocast)"`` or ``"float32"``."""
        from d2llm.hub import cpu_bf16_active

        device = next(self.model.parameters()).device
        return "bfloat16 (autocast)" if cpu_bf16_active(device, self._bf16_asked()) else "float32"

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> torch.Tensor:
        """L2-normalised mean-pooled vectors ``[N, d]`` on the CPU, in input order."""
        import torch
        import torch.nn.functional as F

        from d2llm.batching import map_batched
        from d2llm.hub import cpu_bf16_autocast

        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        encodings = [{k: enc[k][i] for k in keys} for i in range(len(texts))]
        device = next(self.model.parameters()).device

        def run(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return (F.normalize(pooled.float(), dim=-1),)

        with torch.inference_mode(), cpu_bf16_autocast(device, self._bf16_asked()):
            (vectors,) = map_batched(
                encodings,
                run,
                batch_size=self.batch_size,
                pad_id=self.tokenizer.pad_token_id,
                side="right",  # never the tokenizer's side: see the module docstring
                show_progress=show_progress,
                desc="bi-encoder",
            )
        return vectors


def baseline_encoder(params: Params) -> MeanPoolEncoder:
    """The student's backbone read as a plain bi-encoder (mean pooling, cosine)."""
    student = params.student
    return MeanPoolEncoder.from_ref(
        student.backbone,
        student.gguf_file,
        student.trust_remote_code,
        max_length=student.max_length,
        device=params.device,
        cpu_bf16=student.cpu_bf16,
    )


def pair_cosines(
    encoder: MeanPoolEncoder, pairs: Sequence[tuple[str, str]], show_progress: bool = False
) -> np.ndarray:
    """Cosine of each pair's two texts; each distinct text is encoded once."""
    texts = list(dict.fromkeys([a for a, _ in pairs] + [b for _, b in pairs]))
    row = {t: i for i, t in enumerate(texts)}
    vectors = encoder.encode(texts, show_progress=show_progress)
    a = vectors[[row[x] for x, _ in pairs]]
    b = vectors[[row[y] for _, y in pairs]]
    return (a * b).sum(dim=1).double().numpy()
