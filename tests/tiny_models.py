"""A tiny random BERT saved with its WordPiece tokenizer: the backbone of fast tests.

Shared by the unit, integration and serving tests (``pythonpath = ["tests"]`` in pyproject).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


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
