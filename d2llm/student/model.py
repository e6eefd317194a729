"""The D2LLM student: backbone (+LoRA) -> PMA -> one vector per text; IEM -> a logit per pair.

Texts are encoded independently (``encode``/``embed``), passages once and offline
(``passage_cache``), and pairs are scored from vectors (``score_vectors``, ``score_matrix``).

A saved student is a folder of safetensors and JSON only, nothing pickled:

- ``student.json``: ``format_version``, the ``StudentConfig``, and the dims it was built with;
- ``heads.safetensors``: the PMA and IEM weights (keys ``pma.*``, ``iem.*``);
- ``adapter/``: the LoRA adapter as peft writes it (``adapter_model.safetensors`` +
  ``adapter_config.json``), when LoRA is enabled.

The backbone's base weights are not copied: ``student.backbone`` (a model reference) points at
them, and LoRA-disabled students keep the backbone frozen, so the reference stays exact.

For inference (encode, index, search, serving, evaluation) the LoRA adapters are merged into
the backbone's weights (:meth:`D2LLMStudent.for_inference`, ``from_pretrained(merged=True)``):
the backbone then runs as a plain model, without the adapters' extra matrix products per
projection. A merged student scores like the unmerged one (to float rounding), keeps the
unmerged weights' fingerprint for its indexes, and can neither train nor be saved. Merging
also sets the IEM's branch layer to ``student.iem.inference_dtype`` (float32 by default;
bfloat16 and int8 are faster approximations, see ``d2llm.student.iem``) and, with
``student.inference_quantization: int8``, quantises the backbone's Linear layers
(``d2llm.quantization``; CPU only, approximate). Callers that hold the current params pass
:func:`inference_options` so that those settings, not the ones saved with the student, apply.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2llm.config import ScoringKey, StudentConfig, TrainingConfig
from d2llm.errors import DataError, ModelError
from d2llm.hub import cpu_bf16_autocast
from d2llm.quantization import apply_quantization, is_quantized
from d2llm.student.backbone import (
    apply_lora,
    enable_gradient_checkpointing,
    hidden_size,
    load_base_model,
    load_student_tokenizer,
    token_states,
)
from d2llm.student.iem import IEM
from d2llm.student.pma import PMA

FORMAT_VERSION = 1
CONFIG_FILE = "student.json"
HEADS_FILE = "heads.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class D2LLMStudent(nn.Module):
    """Backbone + LoRA + PMA + IEM. Build with :meth:`from_config` or :meth:`from_pretrained`."""

    def __init__(self, cfg: StudentConfig, backbone: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.dim = hidden_size(backbone)
        self.pma = PMA(self.dim, num_heads=cfg.pma.num_heads, init=cfg.pma.init)
        self.iem = IEM(
            self.dim,
            hidden_size=cfg.iem.hidden_size,
            branch_size=cfg.iem.branch_size,
            residual=cfg.iem.residual,
            cosine_scale=cfg.iem.cosine_scale,
            branches=cfg.iem.branches,
        )
        self._merged_from: str | None = None  # fingerprint of the unmerged weights, once merged

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        cfg: StudentConfig,
        *,
        gradient_checkpointing: bool = False,
        device: str | torch.device | None = None,
    ) -> D2LLMStudent:
        """A fresh student: pretrained backbone, new LoRA adapters, newly initialised PMA and IEM.

        Initialisation draws from torch's global RNG: call ``hub.seed_everything`` first for a
        reproducible student. Returned in eval mode; call ``.train()`` before training.
        """
        student = cls(cfg, apply_lora(load_base_model(cfg), cfg.lora), load_student_tokenizer(cfg))
        if gradient_checkpointing:
            student.enable_gradient_checkpointing()
        if device is not None:
            student.to(device)
        return student.eval()

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory in the backbone (see ``backbone.enable_gradient_checkpointing``)."""
        enable_gradient_checkpointing(self.backbone)

    # ------------------------------------------------------------------ inference

    @property
    def merged(self) -> bool:
        """True once the LoRA adapters are merged into the backbone (inference only)."""
        return self._merged_from is not None

    def for_inference(self, iem_dtype: str | None = None, quantization: str | None = None) -> D2LLMStudent:
        """A copy of this student with LoRA merged into the backbone weights, in eval mode.

        This student is left as it is (it may keep training, and saves its adapter as before);
        the copy shares only the tokenizer. Use it wherever the student only encodes and scores.
        ``iem_dtype``, ``quantization``: as in :meth:`merge_lora`.
        """
        clone = copy.deepcopy(self, memo={id(self.tokenizer): self.tokenizer})
        return clone.merge_lora(iem_dtype, quantization)

    def merge_lora(self, iem_dtype: str | None = None, quantization: str | None = None) -> D2LLMStudent:
        """In place: merge the LoRA adapters into the backbone weights and freeze everything.

        For a student nothing else holds (``from_pretrained(merged=True)`` calls it on the one it
        just loaded); to keep a trainable student, use :meth:`for_inference`, which merges a copy.
        Records the fingerprint of the unmerged weights first (:meth:`fingerprint`), so indexes
        built by either form fit both. The IEM's branch layer then computes in ``iem_dtype``
        (None: ``student.iem.inference_dtype`` of the config), and the backbone's Linear layers
        are quantised as ``quantization`` says (None: ``student.inference_quantization``).
        Idempotent.
        """
        if self.merged:
            return self
        from d2llm.fingerprint import state_fingerprint

        fingerprint = state_fingerprint(self)
        if self.cfg.lora.enabled:
            self.backbone = self.backbone.merge_and_unload()  # the plain base model, adapters folded in
        for param in self.parameters():
            param.requires_grad_(False)
        self.iem.set_branch_format(iem_dtype or self.cfg.iem.inference_dtype)
        self.backbone = apply_quantization(self.backbone, quantization or self.cfg.inference_quantization)
        self._merged_from = fingerprint
        return self.eval()

    def fingerprint(self) -> str:
        """sha256 of the weights ``save_pretrained`` writes (for a merged student: of those it was
        merged from). A search index records it and refuses any other student."""
        from d2llm.fingerprint import state_fingerprint

        return self._merged_from if self._merged_from is not None else state_fingerprint(self)

    def train(self, mode: bool = True) -> D2LLMStudent:
        if mode and self.merged:
            raise ModelError(
                "this student has its LoRA merged for inference and cannot train: train the unmerged "
                "student (D2LLMStudent.from_pretrained without merged=True)"
            )
        return super().train(mode)

    @property
    def device(self) -> torch.device:
        return next(self.pma.parameters()).device

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters an optimiser should update: LoRA, PMA and IEM (the backbone is frozen)."""
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self, cfg: TrainingConfig) -> torch.optim.AdamW:
        """AdamW over the trainable weights: the PMA at ``training.head_lr``, the IEM at
        ``training.iem_lr`` (or ``head_lr``), and the backbone's LoRA weights at ``training.lr``
        (every unset rate falls back to ``lr``, the paper's single rate).

        The heads start from scratch while LoRA nudges pretrained weights, so a small backbone
        keeps its geometry better with a low LoRA rate and faster heads. The IEM only scores
        pairs of finished vectors; its zero-initialised output layer grows slowly at LoRA's rate.
        """
        head_lr = cfg.head_lr or cfg.lr
        rates = {"pma": head_lr, "iem": cfg.iem_lr or head_lr, "lora": cfg.lr}
        params: dict[str, list[nn.Parameter]] = {part: [] for part in rates}
        for name, param in self.trainable_parameters():
            params[trainable_part(name)].append(param)
        groups = [{"params": group, "lr": rates[part]} for part, group in params.items() if group]
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    # ------------------------------------------------------------------ encoding

    def tokenize(self, texts: Sequence[str]) -> Any:
        """Pad and truncate a batch of texts to ``student.max_length``, on the model's device."""
        batch = self.tokenizer(
            list(texts),
            padding=True,
            padding_side="right",  # positions 0..n-1 for every text, as encoded alone
            truncation=True,
            max_length=self.cfg.max_length,
            return_tensors="pt",
        )
        return batch.to(self.device)

    def embed(self, batch: Any) -> Tensor:
        """Token ids -> PMA vectors ``[B, d]``, with gradients (the training path)."""
        states = token_states(self.backbone, batch, self.cfg.pooled_layer)
        return self.pma(states.to(self.pma.seed.dtype), batch["attention_mask"])

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """``embed(tokenize(texts))``: one padded batch, with gradients (the training path)."""
        return self.embed(self.tokenize(texts))

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32, show_progress: bool = False) -> Tensor:
        """Texts -> ``[N, d]`` float32 vectors on the CPU, in the order given.

        Runs in eval mode without gradients. Texts are tokenised once and batched longest first,
        so each batch pads to a similar length; right padding and masking make every vector
        independent of its batch.
        """
        from tqdm.auto import tqdm

        texts = list(texts)
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        if not texts:
            return out
        encoded = self.tokenizer(texts, truncation=True, max_length=self.cfg.max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        if 0 in lengths:
            raise DataError(f"text #{lengths.index(0)} ({texts[lengths.index(0)]!r}) has no tokens to encode")
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        # int8 kernels take float32 inputs: an int8 backbone runs without bf16 autocast.
        autocast = cpu_bf16_autocast(self.device, self.cfg.cpu_bf16 and not is_quantized(self.backbone))
        was_training = self.training
        if was_training:  # train()/eval() walk every module: skip it on the usual (eval) path
            self.eval()
        try:
            steps = range(0, len(order), batch_size)
            for start in tqdm(steps, desc="encode", disable=not show_progress, unit="batch"):
                idx = order[start : start + batch_size]
                features = [{key: encoded[key][i] for key in encoded} for i in idx]
                batch = self.tokenizer.pad(features, padding_side="right", return_tensors="pt")
                batch = batch.to(self.device)
                with autocast:
                    out[idx] = self.embed(batch).float().cpu()
        finally:
            if was_training:
                self.train()
        return out

    # ------------------------------------------------------------------ scoring

    def _heads_input(self, vectors: Tensor) -> Tensor:
        return vectors.to(device=self.device, dtype=self.iem.first_a.weight.dtype)

    def passage_cache(self, e_b: Tensor) -> Tensor:
        """``[N, d] -> [N, iem.cache_size]``: the passage half of the IEM, computed once per passage."""
        return self.iem.passage_cache(self._heads_input(e_b))

    def iem_features(self, e_a: Tensor, e_b: Tensor, task: ScoringKey) -> tuple[Tensor, Tensor]:
        """Row-wise ``(z [N], u_t [N, branch_size])``; ``u_t`` feeds feature imitation."""
        return self.iem(self._heads_input(e_a), self._heads_input(e_b), task)

    def score_vectors(self, e_a: Tensor, e_b: Tensor, task: ScoringKey) -> Tensor:
        """Row-wise logits ``z [N]`` for the pairs ``(e_a[i], e_b[i])``."""
        return self.iem_features(e_a, e_b, task)[0]

    def score_matrix(
        self, e_a: Tensor, cache_b: Tensor, task: ScoringKey, chunk_size: int = 65_536
    ) -> Tensor:
        """``[Q, N]`` logits of every query against every cached passage, in bounded-memory blocks.

        Keeps gradients (training uses it for the in-batch matrix); wrap in ``torch.no_grad()``
        for search.
        """
        return self.iem.score_matrix(self._heads_input(e_a), self._heads_input(cache_b), task, chunk_size)

    @torch.no_grad()
    def score(
        self,
        pairs: Sequence[tuple[str, str]],
        task: ScoringKey,
        batch_size: int = 32,
        show_progress: bool = False,
    ) -> Tensor:
        """Logits ``[N]`` (CPU, float32) for text pairs: encode each distinct text once, then IEM."""
        pairs = list(pairs)
        if not pairs:
            return torch.empty(0)
        texts = sorted({text for pair in pairs for text in pair})
        position = {text: i for i, text in enumerate(texts)}
        vectors = self.encode(texts, batch_size=batch_size, show_progress=show_progress)
        e_a = vectors[[position[a] for a, _ in pairs]]
        e_b = vectors[[position[b] for _, b in pairs]]
        step = 65_536  # rows per IEM call: bounds the [rows, hidden] activations
        scores = [
            self.score_vectors(e_a[i : i + step], e_b[i : i + step], task) for i in range(0, len(pairs), step)
        ]
        return torch.cat(scores).float().cpu()

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the student folder (safetensors + JSON only); returns its path."""
        from safetensors.torch import save_file

        if self.merged:
            raise ModelError(
                "cannot save a student whose LoRA is merged for inference (the adapter is folded into "
                "the backbone): save the unmerged student it came from"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        heads = {f"pma.{k}": v for k, v in self.pma.state_dict().items()}
        heads.update({f"iem.{k}": v for k, v in self.iem.state_dict().items()})
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in heads.items()},
            str(directory / HEADS_FILE),
            metadata={"format": "pt", "d2llm_format_version": str(FORMAT_VERSION)},
        )
        if self.cfg.lora.enabled:
            self.backbone.save_pretrained(str(directory / ADAPTER_DIR), safe_serialization=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "student": self.cfg.model_dump(mode="json"),
            "dim": self.dim,
            "cache_size": self.iem.cache_size,
            "backbone_model_type": getattr(self._base_config(), "model_type", None),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    def _base_config(self) -> Any:
        base = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return base.config

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device | None = None,
        merged: bool = False,
        iem_dtype: str | None = None,
        quantization: str | None = None,
    ) -> D2LLMStudent:
        """Load a folder written by :meth:`save_pretrained`, without unpickling anything.

        The backbone comes from the saved model reference; remote code runs only if the saved
        config says ``trust_remote_code: true``. Returned in eval mode. ``merged=True``: for
        inference only, the LoRA adapters merged into the backbone (:meth:`merge_lora`), the IEM's
        branch layer in ``iem_dtype`` and the backbone quantised as ``quantization`` says (None:
        the saved ``student.iem.inference_dtype`` / ``student.inference_quantization``).
        """
        directory = Path(directory)
        meta = _read_meta(directory)
        try:
            cfg = StudentConfig.model_validate(meta["student"])
        except Exception as err:
            raise ModelError(f"{directory / CONFIG_FILE}: invalid student config: {err}") from None
        backbone = apply_lora(load_base_model(cfg), cfg.lora)
        if cfg.lora.enabled:
            _load_adapter(backbone, directory / ADAPTER_DIR / ADAPTER_WEIGHTS)
        student = cls(cfg, backbone, load_student_tokenizer(cfg))
        if student.dim != meta.get("dim"):
            raise ModelError(
                f"{directory}: saved for hidden size {meta.get('dim')}, but backbone {cfg.backbone!r} "
                f"has {student.dim}: the backbone reference points at a different model"
            )
        _load_heads(student, directory / HEADS_FILE)
        quantized = (quantization or cfg.inference_quantization) != "none" or (
            iem_dtype or cfg.iem.inference_dtype
        ) == "int8"
        if merged and quantized and device is not None and torch.device(device).type != "cpu":
            raise ModelError(
                "int8 quantisation (student.inference_quantization, student.iem.inference_dtype) "
                f"runs on the CPU only, not on {device}"
            )
        if merged:
            student.merge_lora(iem_dtype, quantization)
        if device is not None:
            student.to(device)
        return student.eval()


def trainable_part(name: str) -> str:
    """The part a trainable weight (a ``trainable_parameters`` name) belongs to: ``pma``, ``iem``
    or ``lora`` (the backbone's adapters; the backbone itself never trains)."""
    return name.split(".")[0] if name.startswith(("pma.", "iem.")) else "lora"


def inference_options(cfg: StudentConfig) -> dict[str, str]:
    """The inference settings of ``cfg`` as keyword arguments of ``from_pretrained``/``merge_lora``."""
    return {"iem_dtype": cfg.iem.inference_dtype, "quantization": cfg.inference_quantization}


def _read_meta(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise ModelError(f"student folder {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{directory} is not a saved D2LLM student: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path} is corrupt (not JSON): {err}") from None
    if not isinstance(meta, dict) or "student" not in meta:
        raise ModelError(f"{path} has no 'student' config section")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path}: format version {meta.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    return meta


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"saved student is incomplete: {path} is missing")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a damaged header or body
        raise ModelError(f"{path} is corrupt: {err}") from None


def _load_adapter(backbone: nn.Module, path: Path) -> None:
    from peft import set_peft_model_state_dict

    weights = _read_safetensors(path)
    result = set_peft_model_state_dict(backbone, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ModelError(
            f"{path} does not match the LoRA layout of the configured backbone: "
            f"unexpected {list(result.unexpected_keys)[:5]}, missing {missing[:5]}"
        )


def _load_heads(student: D2LLMStudent, path: Path) -> None:
    weights = _read_safetensors(path)
    for prefix, module in (("pma.", student.pma), ("iem.", student.iem)):
        part = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as err:
            what = prefix.rstrip(".")
            raise ModelError(f"{path}: {what} weights do not fit the saved config: {err}") from None
