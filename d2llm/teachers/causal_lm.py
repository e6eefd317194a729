"""Causal-LM teacher: the LLM reads ``template(a, b)`` and its next-token logits for yes/no are the score.

Three rules keep the score meaningful:
- the answer cue ends the input: texts are truncated to a token budget, the template never;
- batches are left-padded (with position ids counted from the first real token), so the last
  position is the real last token and a padded row scores like the row alone;
- "yes" and "no" must each be one token, checked at load time (the authors' code took the first
  sub-token of a word unchecked).
Only the two answer rows of the LM head are applied to the last hidden state: the full
vocabulary projection over every position is never computed. What the model's own causal-LM
forward does after its head is done to those two logits too (``_output_path``: Gemma 2/3
final-logit soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``), so
``[z_yes, z_no]`` are the model's own next-token logits. Chat templates with a thinking mode
(Qwen3) are rendered with it switched off (``enable_thinking=False``): the answer cue is the
non-thinking generation prompt.

Saved layout: ``adapter/`` (LoRA, safetensors) on top of the referenced base model, or
``model/`` (full weights) plus tokenizer files.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from d2llm.batching import Encoding
from d2llm.errors import ModelError
from d2llm.hub import load_pretrained, load_tokenizer
from d2llm.teachers.base import Pair, TaskKind, Teacher, WeightsKind

if TYPE_CHECKING:
    import torch

    from d2llm.config import LoraConfig, TeacherConfig

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# LoRA targets by the module names architectures use for attention projections.
_LORA_TARGET_SETS = (
    ["q_proj", "k_proj", "v_proj", "o_proj"],  # llama, qwen2, mistral, gemma
    ["query", "key", "value"],  # bert-like encoders
    ["c_attn", "c_proj"],  # gpt2
    ["query_key_value", "dense"],  # gpt-neox, falcon
    ["Wqkv", "out_proj"],
)


def is_chinese(text: str) -> bool:
    return _CJK.search(text) is not None


def lora_target_modules(model: Any) -> list[str]:
    """Attention projection names of ``model``'s architecture, found from its Linear layers."""
    import torch

    names = {
        name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
    }
    for candidates in _LORA_TARGET_SETS:
        found = [c for c in candidates if c in names]
        if found:
            return found
    raise ModelError(
        f"cannot choose LoRA target modules for {type(model).__name__}; set lora.target_modules "
        f"(linear layers: {sorted(names)[:20]})"
    )


def resolve_answer_id(tokenizer: Any, word: str, prefer_space: bool) -> int:
    """The id of ``word`` as a single token, as the tokenizer writes it right after the answer cue.

    After a chat template's generation prompt (ending in a newline) the answer starts a line, so
    the bare word comes first; after a plain prompt ("... Answer yes or no.") the answer follows
    a space. Both spellings are tried; if neither is one token, the word cannot be scored.
    """
    variants = [f" {word}", word] if prefer_space else [word, f" {word}"]
    tried = []
    for variant in variants:
        ids = tokenizer.encode(variant, add_special_tokens=False)
        # An unknown word is one token too: [UNK], which says nothing about the word.
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
            return int(ids[0])
        tried.append(f"{variant!r} -> {tokenizer.convert_ids_to_tokens(ids)}")
    raise ModelError(
        f"answer word {word!r} is not a single token of this tokenizer ({'; '.join(tried)}); "
        "choose other teacher.prompts.yes_word/no_word"
    )


class CausalLMTeacher(Teacher):
    kind = "causal_lm"
    padding_side = "left"

    def __init__(self, cfg: TeacherConfig, tokenizer: Any, lm: Any, device: Any) -> None:
        super().__init__(cfg, tokenizer, device)
        self.lm = lm.to(device)
        self.peft_model: Any = None
        self._set_up_prompts()

    def _set_up_prompts(self) -> None:
        """Chat template or plain prompt, and the single-token ids of the two answers."""
        cfg, tokenizer = self.cfg, self.tokenizer
        self.use_chat = bool(cfg.prompts.use_chat_template and getattr(tokenizer, "chat_template", None))
        prefer_space = not self.use_chat
        self.yes_id = resolve_answer_id(tokenizer, cfg.prompts.yes_word, prefer_space)
        self.no_id = resolve_answer_id(tokenizer, cfg.prompts.no_word, prefer_space)
        if self.yes_id == self.no_id:
            raise ModelError(f"yes word and no word map to the same token id {self.yes_id}")
        self._overhead: dict[tuple[str, str], int] = {}

    @classmethod
    def load(
        cls,
        cfg: TeacherConfig,
        device: torch.device,
        weights_dir: Path | None = None,
        weights: WeightsKind = "reference",
    ) -> CausalLMTeacher:
        if weights == "full" and weights_dir is not None:
            tokenizer = load_tokenizer(str(weights_dir), None, cfg.trust_remote_code)
            lm = load_pretrained(
                "AutoModelForCausalLM", str(weights_dir / MODEL_DIR), None, cfg.trust_remote_code
            )
        else:
            tokenizer = load_tokenizer(cfg.model, cfg.gguf_file, cfg.trust_remote_code)
            lm = load_pretrained("AutoModelForCausalLM", cfg.model, cfg.gguf_file, cfg.trust_remote_code)
            if weights == "lora" and weights_dir is not None:
                from peft import PeftModel

                # Merged once at load: inference then costs what the base model costs.
                lm = PeftModel.from_pretrained(lm, str(weights_dir / ADAPTER_DIR)).merge_and_unload()
        return cls(cfg, tokenizer, lm, device)

    def modules(self) -> list[torch.nn.Module]:
        return [self.lm]

    def enable_lora(self, lora: LoraConfig) -> None:
        """Wrap the LM with LoRA adapters (base weights frozen) for fine-tuning."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        targets = lora.target_modules or lora_target_modules(self.lm)
        peft_cfg = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets
        )
        # The adapters are injected into self.lm in place; the wrapper is kept for saving them.
        self.peft_model = get_peft_model(self.lm, peft_cfg)

    # ---- prompts

    def language_of(self, a: str, b: str) -> Literal["en", "zh"]:
        lang = self.cfg.prompts.language
        if lang != "auto":
            return lang
        return "zh" if is_chinese(a) or is_chinese(b) else "en"

    def template(self, task: TaskKind, language: str) -> str:
        p = self.cfg.prompts
        return {
            ("sym", "en"): p.sym,
            ("asym", "en"): p.asym,
            ("sym", "zh"): p.sym_zh,
            ("asym", "zh"): p.asym_zh,
        }[(task, language)]

    def render(self, a: str, b: str, task: TaskKind, language: str) -> str:
        """The full model input as text: the filled template, inside the chat template if any."""
        prompt = self.template(task, language).format(a=a, b=b)
        if not self.use_chat:
            return prompt
        # enable_thinking=False: a thinking template (Qwen3) closes an empty think block, so the
        # next token is the answer; templates that never read the variable ignore it.
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )

    def _ids(self, text: str) -> list[int]:
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS).
        return self.tokenizer(text, add_special_tokens=not self.use_chat)["input_ids"]

    def _template_tokens(self, task: TaskKind, language: str) -> int:
        key = (task, language)
        if key not in self._overhead:
            self._overhead[key] = len(self._ids(self.render("", "", task, language)))
        return self._overhead[key]

    def encode_pairs(self, pairs: Sequence[Pair], task: TaskKind) -> list[Encoding]:
        return [{"input_ids": self.encode_pair(a, b, task)} for a, b in pairs]

    def encode_pair(self, a: str, b: str, task: TaskKind) -> list[int]:
        """Token ids of one prompt, within max_length, texts shortened and the template intact."""
        language = self.language_of(a, b)
        budget = self.cfg.max_length - self._template_tokens(task, language)
        if budget < 2:
            raise ModelError(
                f"teacher.max_length={self.cfg.max_length} leaves no room for the texts: "
                f"the {task}/{language} template alone takes {self._template_tokens(task, language)} tokens"
            )
        ta = self.tokenizer(a, add_special_tokens=False)["input_ids"]
        tb = self.tokenizer(b, add_special_tokens=False)["input_ids"]
        na, nb = _split_budget(len(ta), len(tb), budget)
        for _ in range(8):
            text_a = a if na >= len(ta) else self.tokenizer.decode(ta[:na])
            text_b = b if nb >= len(tb) else self.tokenizer.decode(tb[:nb])
            ids = self._ids(self.render(text_a, text_b, task, language))
            excess = len(ids) - self.cfg.max_length
            if excess <= 0:
                return ids
            # Tokens can merge across the text/template boundary: shave the longer text and retry.
            if na >= nb:
                na = max(1, na - excess)
            else:
                nb = max(1, nb - excess)
        return ids  # a few tokens over max_length beats cutting the template

    # ---- scoring

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["attention_mask"]
        # Left padding: count positions from each row's first real token, as if unpadded.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm.base_model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions)
        last = out.last_hidden_state[:, -1]
        weight, bias = _head_parameters(self.lm.get_output_embeddings())
        rows = weight[[self.yes_id, self.no_id]]
        logits = last @ rows.T.to(last.dtype)
        if bias is not None:
            logits = logits + bias[[self.yes_id, self.no_id]].to(logits.dtype)
        return _output_path(self.lm.config, logits), last

    def _save_weights(self, out_dir: Path) -> WeightsKind:
        if self.peft_model is not None:
            self.peft_model.save_pretrained(str(out_dir / ADAPTER_DIR))  # adapter_model.safetensors
            return "lora"
        self.lm.save_pretrained(out_dir / MODEL_DIR)
        self.tokenizer.save_pretrained(out_dir)
        return "full"


def _head_parameters(head: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight and bias as float tensors. An int8-quantised head (``quantize("int8")``
    for labelling) holds them packed, behind methods: unpack and dequantise those."""
    weight = head.weight() if callable(head.weight) else head.weight
    bias = getattr(head, "bias", None)
    bias = bias() if callable(bias) else bias
    if weight.is_quantized:
        weight = weight.dequantize()
    return weight, bias


def _output_path(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """What the model's causal-LM forward does to the LM head's output, applied to ``logits``.

    Read from the (text) config as the modelling code reads it: Cohere multiplies by
    ``logit_scale``, Granite divides by ``logits_scaling``, Gemma 2/3 soft-cap with
    ``cap * tanh(logits / cap)`` (``final_logit_softcapping``), in that code's order.
    """
    import torch

    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", "")
    if model_type.startswith("cohere") and getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if model_type.startswith("granite") and getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _split_budget(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Token counts kept of each text: half the budget each, a short text's spare going to the other."""
    if len_a + len_b <= budget:
        return len_a, len_b
    half = budget // 2
    if len_a <= half:
        return len_a, budget - len_a
    if len_b <= budget - half:
        return budget - len_b, len_b
    return half, budget - half
