"""The student's backbone: any Hugging Face model loaded as its *base* (no LM head), plus LoRA.

The paper's code ran the full causal LM and computed vocabulary logits it never used; here
``AutoModel`` gives the bare transformer for encoders and decoders alike (a ``*ForCausalLM``
checkpoint loads into its base model and the LM head is dropped). LoRA target modules are picked
from ``config.model_type`` instead of being hard-coded for one family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from d2llm.errors import ModelError
from d2llm.hub import load_pretrained, load_tokenizer

if TYPE_CHECKING:
    import torch
    from torch import nn

    from d2llm.config import LoraConfig, StudentConfig

# Attention projection names per architecture family (peft matches them as module-name suffixes).
_BERT_STYLE = ["query", "key", "value"]
_DECODER_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_TARGETS: dict[str, list[str]] = {
    "bert": _BERT_STYLE,
    "roberta": _BERT_STYLE,
    "xlm-roberta": _BERT_STYLE,
    "camembert": _BERT_STYLE,
    "electra": _BERT_STYLE,
    "ernie": _BERT_STYLE,
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
    "mpnet": ["q", "k", "v", "o"],
    "llama": _DECODER_STYLE,
    "mistral": _DECODER_STYLE,
    "qwen2": _DECODER_STYLE,
    "qwen3": _DECODER_STYLE,
    "gemma": _DECODER_STYLE,
    "gemma2": _DECODER_STYLE,
}


def load_base_model(cfg: StudentConfig) -> nn.Module:
    """Load the backbone without any task head, in float32, in eval mode.

    Hidden states of every layer are requested only when a layer other than the last is pooled:
    returning them all costs memory on every forward pass.
    """
    model = load_pretrained(
        "AutoModel", cfg.backbone, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code
    )
    num_layers = getattr(model.config, "num_hidden_layers", None)
    in_range = num_layers is None or -(num_layers + 1) <= cfg.pooled_layer <= num_layers
    if cfg.pooled_layer != -1 and not in_range:
        raise ModelError(
            f"student.pooled_layer={cfg.pooled_layer} is out of range for {cfg.backbone!r}, "
            f"which has {num_layers} layers (valid: -{num_layers + 1}..{num_layers}; 0 = embeddings)"
        )
    model.config.output_hidden_states = cfg.pooled_layer != -1
    model.eval()
    return model


def load_student_tokenizer(cfg: StudentConfig) -> Any:
    """The backbone's tokenizer, padding on the right.

    Right padding keeps position ids 0..n-1 for every text, so a text's vector does not depend on
    the batch it is encoded in (decoders with left padding would shift the positions).
    """
    tokenizer = load_tokenizer(cfg.backbone, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code)
    tokenizer.padding_side = "right"
    return tokenizer


def lora_target_modules(model: nn.Module, override: list[str] | None = None) -> list[str]:
    """The module names LoRA adapts: ``override`` if given, else the family's attention projections."""
    if override:
        return list(override)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LORA_TARGETS:
        raise ModelError(
            f"no default LoRA target modules for model type {model_type!r}; set "
            f"student.lora.target_modules (e.g. the names of its attention projections). "
            f"Known types: {', '.join(sorted(LORA_TARGETS))}"
        )
    return list(LORA_TARGETS[model_type])


def apply_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Freeze the backbone and wrap it with LoRA adapters (a ``peft.PeftModel``).

    No peft task type: the generic ``PeftModel`` passes every keyword (token_type_ids, ...)
    through to the base model, which is all the student needs. With LoRA disabled the backbone
    is returned frozen: only PMA and IEM train, and the saved student never has to copy it.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(model, lora.target_modules),
        bias="none",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ModelError(f"cannot apply LoRA to {type(model).__name__}: {err}") from err


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (less memory, ~30% more compute).

    The non-reentrant variant works with a frozen embedding layer, so LoRA-only training needs
    no ``enable_input_require_grads`` hook.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(base).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # the transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def token_states(model: nn.Module, batch: dict[str, torch.Tensor], pooled_layer: int = -1) -> torch.Tensor:
    """Run the backbone and return the chosen layer's token states ``[B, T, H]``."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    output = model(**inputs, output_hidden_states=pooled_layer != -1, return_dict=True)
    if pooled_layer == -1:
        return output.last_hidden_state
    return output.hidden_states[pooled_layer]


def hidden_size(model: nn.Module) -> int:
    config = model.config
    for name in ("hidden_size", "d_model", "dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ModelError(f"cannot tell the hidden size of {type(model).__name__} from its config")
