"""Tiny random backbones saved with local tokenizers: the models of fast tests.

- ``save_tiny_bert``: a 2-layer, 32-d BERT with a WordPiece tokenizer;
- ``save_tiny_causal_lm``: a 2-layer, 32-d causal LM of any family (Llama, Qwen2, GPT-2, ...)
  with a byte-level BPE tokenizer trained on the given words, saved with its LM head, so it can
  be a causal-LM teacher as well as a decoder student backbone;
- ``save_tiny_student``: a whole D2LLM student on a tiny BERT;
- ``cosine_student_cfg`` / ``cosine_student``: the ``student`` section of, and the student
  whose untrained IEM logit is a scaled cosine (index and search tests);
- ``teacher_finetune_params``: params of a cross-encoder teacher on a tiny model, fused with the
  tiny model as bi-encoder, fine-tuned on ``datasets``.

Shared by the unit, integration and serving tests (``pythonpath = ["tests"]`` in pyproject).
Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def save_tiny_bert(folder: Path, vocabulary: Sequence[str], seed: int = 0, max_positions: int = 64) -> Path:
    """Save a random 2-layer, 32-d ``BertModel`` and a lower-casing tokenizer over ``vocabulary``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocabulary)}, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocabulary),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(folder)
    return folder


# ChatML, the chat template format of Qwen2 and SmolLM2.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BPE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bpe_training_corpus(words: Sequence[str]) -> list[str]:
    """Sentences that make every word (with and without a leading space) one BPE token, given room."""
    lines = [" ".join(words), " ".join(w.capitalize() for w in words)]
    lines += [f"{w} {w} {w}" for w in words for _ in range(4)]
    lines += ["#Q: a man plays a guitar.\n#P: a person plays music?\nAnswer yes or no. yes, no."] * 8
    return lines


def build_bpe_tokenizer(words: Sequence[str], vocab_size: int = 1200):
    """Train a deterministic byte-level BPE (Qwen2/Llama-3 style) on sentences of ``words``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=BPE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_bpe_training_corpus(words), trainer=trainer)
    return tok


def check_yes_no(tokenizer: Any, where: str) -> None:
    """The teacher's answer words must be single tokens, with and without a leading space."""
    for text in ("yes", "no", " yes", " no"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, f"{where}: {text!r} is not a single token: {ids}"


def _merges_of(bpe: Any) -> list[tuple[str, str]]:
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def save_tiny_causal_lm(
    folder: Path,
    config_cls: type,
    model_cls: type,
    words: Sequence[str],
    chat_template: str | None = None,
    vocab_size: int = 1200,
    **config_kw: object,
) -> Path:
    """A random 2-layer, 32-d ``model_cls`` with a BPE tokenizer over ``words`` (which must hold
    "yes" and "no"); ``config_kw`` overrides the config."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bpe = build_bpe_tokenizer(words, vocab_size)
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None}
    if config_cls.model_type == "qwen2":
        # transformers 5 always loads qwen2 folders with Qwen2Tokenizer, which rebuilds its BPE
        # from the vocabulary and merges: give it exactly those of the trained tokenizer.
        tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=_merges_of(bpe), **special)
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **special)
    if chat_template:
        tokenizer.chat_template = chat_template
    check_yes_no(tokenizer, f"tiny {config_cls.model_type} tokenizer")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    settings: dict[str, object] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    config = config_cls(**{**settings, **config_kw})
    model_cls(config).save_pretrained(folder)
    return folder


def save_tiny_student(folder: Path, words: Sequence[str], seed: int = 0, perturb_lora: bool = False) -> Path:
    """A D2LLM student (LoRA r=2, small PMA/IEM) on a tiny BERT, saved to ``folder/student``.

    ``perturb_lora``: LoRA B starts at zero; random values make the adapters change the scores,
    so a save/load round trip is really tested.
    """
    import torch

    from d2llm.config import IEMConfig, LoraConfig, PMAConfig, StudentConfig
    from d2llm.student.model import D2LLMStudent

    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", *words]
    backbone = save_tiny_bert(folder / "backbone", vocabulary, seed=seed)
    cfg = StudentConfig(
        backbone=str(backbone),
        max_length=32,
        lora=LoraConfig(r=2, alpha=2),
        pma=PMAConfig(num_heads=4),
        iem=IEMConfig(hidden_size=16, branch_size=8),
    )
    student = D2LLMStudent.from_config(cfg)
    if perturb_lora:
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return student.save_pretrained(folder / "student")


def cosine_student_cfg(backbone: Path, max_length: int) -> dict[str, Any]:
    """A student without LoRA whose IEM has the cosine residual and a zero output layer: before
    training its logit is ``scale * cos(e_q, e_b)``, so a query equal to a passage ranks it first."""
    return {
        "backbone": str(backbone),
        "max_length": max_length,
        "lora": {"enabled": False},
        "pma": {"num_heads": 4, "init": "mean"},
        "iem": {"hidden_size": 16, "branch_size": 8, "residual": "cosine"},
    }


def cosine_student(backbone: Path, max_length: int):
    """The student of ``cosine_student_cfg``, seeded (0)."""
    from d2llm.config import params_from_dict
    from d2llm.hub import seed_everything
    from d2llm.student.model import D2LLMStudent

    seed_everything(0)
    return D2LLMStudent.from_config(
        params_from_dict({"student": cosine_student_cfg(backbone, max_length)}).student
    )


def teacher_finetune_params(model: Path, datasets: Sequence[str], **finetune: Any):
    """Params of a cross-encoder teacher on ``model`` fine-tuned on ``datasets`` (``finetune``:
    more ``teacher.finetune`` keys), fused with ``model`` read as the bi-encoder."""
    from d2llm.config import params_from_dict

    return params_from_dict(
        {
            "device": "cpu",
            "teacher": {
                "model": str(model),
                "max_length": 64,
                "batch_size": 8,
                "fusion": "biencoder",
                "finetune": {"datasets": list(datasets), **finetune},
            },
            "student": {"backbone": str(model)},
        }
    )
