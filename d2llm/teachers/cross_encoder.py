"""Cross-encoder teacher: an encoder reads the pair jointly; a 2-way linear head gives [z_yes, z_no].

The encoder sees ``[CLS] a [SEP] b [SEP]`` (the tokenizer's pair encoding, truncated longest
first). The head reads the CLS vector or the masked mean of the last hidden states
(``teacher.pooling``); that pooled vector is also the feature used for feature imitation.
The task kind does not change the input: one head serves both kinds.

Saved layout: ``encoder/`` (config + model.safetensors), ``head.safetensors``, tokenizer files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm.batching import Encoding
from d2llm.hub import load_pretrained, load_tokenizer
from d2llm.teachers.base import Pair, TaskKind, Teacher, WeightsKind

if TYPE_CHECKING:
    import torch

    from d2llm.config import TeacherConfig

log = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"
ENCODER_DIR = "encoder"
HEAD_INIT_SEED = 0  # an untrained head is still the same head in every process


class CrossEncoderTeacher(Teacher):
    kind = "cross_encoder"
    padding_side = "right"

    def __init__(self, cfg: TeacherConfig, tokenizer: Any, encoder: Any, head: Any, device: Any) -> None:
        super().__init__(cfg, tokenizer, device)
        self.encoder = encoder.to(device)
        self.head = head.to(device)

    @classmethod
    def load(
        cls, cfg: TeacherConfig, device: torch.device, weights_dir: Path | None = None
    ) -> CrossEncoderTeacher:
        import torch
        from safetensors.torch import load_file

        source = str(weights_dir / ENCODER_DIR) if weights_dir else cfg.model
        gguf = None if weights_dir else cfg.gguf_file
        tokenizer = load_tokenizer(
            str(weights_dir) if weights_dir else cfg.model, gguf, cfg.trust_remote_code
        )
        encoder = load_pretrained("AutoModel", source, gguf, cfg.trust_remote_code)
        head = torch.nn.Linear(encoder.config.hidden_size, 2)
        if weights_dir:
            head.load_state_dict(load_file(str(weights_dir / HEAD_FILE)))
        else:
            gen = torch.Generator().manual_seed(HEAD_INIT_SEED)
            with torch.no_grad():
                head.weight.normal_(0.0, 0.02, generator=gen)
                head.bias.zero_()
            log.warning("cross-encoder teacher %s has an untrained head: fine-tune it first", cfg.model)
        return cls(cfg, tokenizer, encoder, head, device)

    def modules(self) -> list[torch.nn.Module]:
        return [self.encoder, self.head]

    def encode_pairs(self, pairs: Sequence[Pair], task: TaskKind) -> list[Encoding]:
        enc = self.tokenizer(
            [a for a, _ in pairs],
            [b for _, b in pairs],
            truncation="longest_first",
            max_length=self.cfg.max_length,
        )
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        return [{k: enc[k][i] for k in keys} for i in range(len(pairs))]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(**batch).last_hidden_state
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled), pooled

    def _save_weights(self, out_dir: Path) -> WeightsKind:
        from safetensors.torch import save_file

        self.encoder.save_pretrained(out_dir / ENCODER_DIR)  # transformers 5 writes safetensors only
        self.tokenizer.save_pretrained(out_dir)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(out_dir / HEAD_FILE))
        return "full"
