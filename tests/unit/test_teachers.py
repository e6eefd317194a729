"""Batching, both teacher kinds, save/load and fine-tuning, on tiny random models (conftest)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from toy_tasks import pair_table, rule_pairs

from d2llm.batching import bucket_batches, collate, iter_batches, map_batched
from d2llm.config import PromptConfig, TeacherConfig, params_from_dict
from d2llm.errors import DataError, ModelError
from d2llm.evaluation.dev import load_dev_set
from d2llm.evaluation.metrics import average_precision
from d2llm.teachers.base import probabilities
from d2llm.teachers.causal_lm import CausalLMTeacher, is_chinese
from d2llm.teachers.factory import load_teacher
from d2llm.teachers.finetune import finetune_teacher

torch.set_num_threads(1)

PAIRS = [
    ("a man plays a guitar", "a person plays music"),
    ("a cat sits on the mat", "a dog runs in the park"),
    ("the child reads", "a child is reading a book in the park with a happy dog"),
    ("a woman cooks food in the kitchen", "a woman is cooking"),
    ("a bird", "a big red car on the street"),
]


# --------------------------------------------------------------------------- batching


def test_bucket_batches_groups_similar_lengths_longest_first():
    lengths = [3, 10, 1, 7, 10, 2]
    assert bucket_batches(lengths, 2) == [[1, 4], [3, 0], [5, 2]]
    shuffled = bucket_batches(lengths, 2, shuffle=True, seed=1)
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, [[1, 4], [3, 0], [5, 2]]))


def test_collate_pads_to_longest_on_the_requested_side():
    enc = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}]
    left = collate(enc, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    right = collate(enc, pad_id=9, side="right", pad_to=5)
    assert right["input_ids"].tolist() == [[5, 6, 7, 9, 9], [8, 9, 9, 9, 9]]
    with pytest.raises(ValueError, match="more than pad_to"):
        collate(enc, pad_id=0, pad_to=2)


def test_map_batched_restores_input_order_and_pads_only_to_batch_longest():
    enc = [{"input_ids": list(range(n))} for n in [4, 1, 6, 2, 5]]
    widths = []

    def fn(batch):
        widths.append(batch["input_ids"].shape[1])
        return (batch["attention_mask"].sum(1),)

    (lengths,) = map_batched(enc, fn, batch_size=2, pad_id=0)
    assert lengths.tolist() == [4, 1, 6, 2, 5]
    assert widths == [6, 4, 1]  # (6, 5), (4, 2), (1,)
    fixed = [b.tensors["input_ids"].shape[1] for b in iter_batches(enc, 2, 0, padding="fixed", max_length=8)]
    assert fixed == [8, 8, 8]


# --------------------------------------------------------------------------- causal LM teacher


def _causal(model_dir, **kw) -> CausalLMTeacher:
    prompt_kw = {k: kw.pop(k) for k in list(kw) if k in PromptConfig.model_fields}
    cfg = TeacherConfig(kind="causal_lm", model=str(model_dir), prompts=PromptConfig(**prompt_kw), **kw)
    return load_teacher(cfg, None, "cpu")  # type: ignore[return-value]


def test_causal_uses_chat_template_and_single_token_answers(tiny_qwen2_dir):
    teacher = _causal(tiny_qwen2_dir, max_length=96, batch_size=2)
    assert teacher.use_chat
    text = teacher.render("a man", "a person", "sym", "en")
    assert text.startswith("<|im_start|>user\n#Q: a man\n#P: a person\n")
    assert text.endswith("Answer yes or no.<|im_end|>\n<|im_start|>assistant\n")
    # After the generation prompt the answer starts a line: the bare word, one token.
    assert teacher.tokenizer.convert_ids_to_tokens([teacher.yes_id, teacher.no_id]) == ["yes", "no"]


def test_causal_without_chat_template_prefers_the_spaced_answer(tiny_llama_dir):
    teacher = _causal(tiny_llama_dir, max_length=96)
    assert not teacher.use_chat
    assert teacher.render("a", "b", "asym", "en").endswith("in #Q. Answer yes or no.")
    assert teacher.tokenizer.decode([teacher.yes_id]) == " yes"


def test_answer_word_that_is_not_one_token_raises_model_error(tiny_qwen2_dir):
    with pytest.raises(
        ModelError, match=r"answer word 'affirmative' is not a single token.*'affirmative' ->"
    ):
        _causal(tiny_qwen2_dir, yes_word="affirmative")


def test_long_texts_are_truncated_never_the_template(tiny_qwen2_dir):
    teacher = _causal(tiny_qwen2_dir, max_length=128)
    long_a = "a man plays a guitar in the park " * 40
    long_b = "the dog runs " * 40
    ids = teacher.encode_pair(long_a, long_b, "sym")
    assert len(ids) <= 128
    text = teacher.tokenizer.decode(ids)
    assert text.endswith("Answer yes or no.<|im_end|>\n<|im_start|>assistant\n")
    assert "#Q: a man plays" in text and "#P: the dog runs" in text
    short = teacher.encode_pair("a cat", long_b, "sym")  # the short text is kept whole
    assert "#Q: a cat\n#P: the dog" in teacher.tokenizer.decode(short)
    with pytest.raises(ModelError, match="leaves no room for the texts"):
        _causal(tiny_qwen2_dir, max_length=40).encode_pair("a", "b", "sym")


def test_left_padded_batch_scores_like_each_pair_alone(tiny_qwen2_dir):
    teacher = _causal(tiny_qwen2_dir, max_length=96, batch_size=8)
    batched = teacher.score(PAIRS, "sym", with_features=True)
    assert batched.logits.shape == (5, 2) and batched.features.shape == (5, 32)
    alone = [teacher.score([p], "sym", with_features=True) for p in PAIRS]
    torch.testing.assert_close(batched.logits, torch.cat([o.logits for o in alone]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.features, torch.cat([o.features for o in alone]), atol=1e-5, rtol=1e-4)
    # The scores are the LM's own next-token logits at the last position, restricted to yes/no.
    ids = teacher.encode_pair(*PAIRS[0], "sym")
    with torch.no_grad():
        full = teacher.lm(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(batched.logits[0], full[[teacher.yes_id, teacher.no_id]], atol=1e-5, rtol=1e-4)


def test_chinese_pairs_get_the_chinese_template(tiny_qwen2_dir):
    teacher = _causal(tiny_qwen2_dir, max_length=128)
    assert is_chinese("一个男人在弹吉他") and not is_chinese("a man")
    assert teacher.language_of("一个男人", "a man") == "zh"
    assert "请回答yes或no" in teacher.render(
        "一个男人", "一个人", "sym", teacher.language_of("一个男人", "x")
    )
    assert _causal(tiny_qwen2_dir, language="en").language_of("一个男人", "x") == "en"


def test_probabilities_is_softmax_yes_column():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(
        probabilities(logits), torch.tensor([1 / (1 + torch.exp(torch.tensor(-2.0))), 0.5])
    )
    torch.testing.assert_close(probabilities(logits, 2.0)[0], 1 / (1 + torch.exp(torch.tensor(-1.0))))


# --------------------------------------------------------------------------- cross-encoder teacher


def test_cross_encoder_shapes_and_save_load_round_trip(tiny_bert_dir, tmp_path):
    cfg = TeacherConfig(
        kind="cross_encoder", model=str(tiny_bert_dir), pooling="cls", max_length=32, batch_size=2
    )
    teacher = load_teacher(cfg, None, "cpu")
    out = teacher.score(PAIRS, "sym", with_features=True)
    assert out.logits.shape == (5, 2) and out.features.shape == (5, 32)
    assert teacher.score(PAIRS, "asym").features is None
    teacher.save_pretrained(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t" / "encoder").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    # teacher.json decides what the weights mean: a different pooling in cfg is overridden.
    restored = load_teacher(cfg.model_copy(update={"pooling": "mean"}), tmp_path / "t", "cpu")
    assert restored.cfg.pooling == "cls"
    torch.testing.assert_close(restored.score(PAIRS, "sym").logits, out.logits)


def test_load_teacher_from_a_folder_without_teacher_json_fails(tmp_path):
    with pytest.raises(ModelError, match=r"teacher\.json is missing"):
        load_teacher(TeacherConfig(), tmp_path, "cpu")


# --------------------------------------------------------------------------- fine-tuning


def _gold_tables(prepared, n_train=24):
    rows = []
    for i in range(n_train):
        pos = i % 2 == 0
        a, b = PAIRS[i % len(PAIRS)]
        rows.append(
            (
                a,
                b if pos else "a bird on the grass",
                float(0 if pos else 2),
                "entailment" if pos else "contradiction",
                "train",
                pos,
            )
        )
    for i in range(8):
        pos = i % 2 == 0
        a, b = PAIRS[i % len(PAIRS)]
        rows.append(
            (
                a,
                b if pos else "a bird on the grass",
                0.0,
                "entailment" if pos else "contradiction",
                "dev",
                pos,
            )
        )
    df = pd.DataFrame(rows, columns=["text_a", "text_b", "label", "label_name", "split", "is_positive"])
    df["task"], df["source"] = "sym", "test"
    (prepared / "pairs").mkdir(parents=True)
    df.to_parquet(prepared / "pairs" / "nli.parquet")
    sts = df.assign(label=[5.0 if p else 1.0 for p in df["is_positive"]], label_name="")
    sts.to_parquet(prepared / "pairs" / "sts.parquet")


def _params(model_dir, kind, **ft):
    return params_from_dict(
        {
            "device": "cpu",
            "teacher": {
                "kind": kind,
                "model": str(model_dir),
                "max_length": 128,
                "batch_size": 8,
                "finetune": {
                    "datasets": ["nli", "sts"],
                    "batch_size": 8,
                    "lr": 1e-3,
                    "warmup_ratio": 0.0,
                    **ft,
                },
            },
        }
    )


def test_cross_encoder_finetune_learns_a_toy_rule_and_restores(tiny_bert_dir, tmp_path):
    """Fine-tuning on the shared-noun rule (tests/toy_tasks.py) raises dev AP by >= 30 points.

    The dev pairs are texts never trained on, and their negatives share more words with the
    anchor than the positives do: only a teacher that learned the rule ranks them right. The
    untrained teacher is at chance (AP 0.50 here); 300 steps reach about 0.98 (about 3 s).
    """
    prepared = tmp_path / "prepared"
    (prepared / "pairs").mkdir(parents=True)
    train, dev = pair_table(rule_pairs(480, seed=3), "train"), pair_table(rule_pairs(48, seed=4), "dev")
    pd.concat([train, dev]).to_parquet(prepared / "pairs" / "rule.parquet")
    params = _params(tiny_bert_dir, "cross_encoder", datasets=["rule"], epochs=10.0, batch_size=16, lr=3e-3)
    result = finetune_teacher(params, prepared, tmp_path / "teacher")

    assert result["steps"] == 10 * 30  # 480 train pairs / 16, ten epochs
    assert set(result["history"][0]) == {"epoch", "step", "rule/ap", "main"}
    assert result["dev_after"]["rule/ap"] >= result["dev_before"]["rule/ap"] + 30  # points
    assert result["loss_last"] < result["loss_first"]
    # The saved teacher is the best epoch's: it scores the dev pairs (the select part, which
    # chose the epoch) as the run measured them.
    restored = load_teacher(params.teacher, tmp_path / "teacher", "cpu")
    select = load_dev_set(prepared, "rule", None, params.seed, "select", params.selection.validate_fraction)
    scores = probabilities(restored.score(select.pairs, "sym").logits)
    assert 100 * average_precision(scores.tolist(), select.gold.tolist()) == pytest.approx(
        result["dev_after"]["rule/ap"], abs=1e-3
    )
    # The validate part, which chose nothing, is reported next to it, with the bi-encoder's.
    assert set(result["validate_after"]) == set(result["validate_baseline"]) == {"rule/ap", "main"}
    assert len(select.pairs) < len(dev)


@pytest.mark.usefixtures("cpu_bf16_on")
def test_cross_encoder_finetune_under_cpu_bf16_still_learns_and_saves_float32(tiny_bert_dir, tmp_path):
    """``teacher.finetune.cpu_bf16``: the steps run under bf16 autocast (so the weights differ
    from a float32 run's), the teacher still learns the toy rule, and its weights stay float32."""
    prepared = tmp_path / "prepared"
    (prepared / "pairs").mkdir(parents=True)
    train, dev = pair_table(rule_pairs(480, seed=3), "train"), pair_table(rule_pairs(48, seed=4), "dev")
    pd.concat([train, dev]).to_parquet(prepared / "pairs" / "rule.parquet")
    results, weights = {}, {}
    for bf16 in (False, True):
        params = _params(
            tiny_bert_dir,
            "cross_encoder",
            datasets=["rule"],
            epochs=10.0,
            batch_size=16,
            lr=3e-3,
            cpu_bf16=bf16,
        )
        results[bf16] = finetune_teacher(params, prepared, tmp_path / f"teacher-{bf16}")
        teacher = load_teacher(params.teacher, tmp_path / f"teacher-{bf16}", "cpu")
        params_of = [
            (f"{i}.{n}", p) for i, m in enumerate(teacher.modules()) for n, p in m.named_parameters()
        ]
        weights[bf16] = {n: p.detach().clone() for n, p in params_of}
    assert results[True]["dev_after"]["rule/ap"] >= results[True]["dev_before"]["rule/ap"] + 30
    assert all(w.dtype == torch.float32 for w in weights[True].values())
    assert any(not torch.equal(weights[True][n], weights[False][n]) for n in weights[False])


def test_the_validate_report_covers_zero_shot_dev_sets_too(tiny_bert_dir, tmp_path):
    """A dev set the teacher is not trained on (``dev_datasets`` beyond ``datasets``) gets its
    validate-part row next to its select-part one, as the trained sets do."""
    prepared = tmp_path / "prepared"
    (prepared / "pairs").mkdir(parents=True)
    train, dev = pair_table(rule_pairs(64, seed=3), "train"), pair_table(rule_pairs(48, seed=4), "dev")
    pd.concat([train, dev]).to_parquet(prepared / "pairs" / "rule.parquet")
    pair_table(rule_pairs(48, seed=5), "dev").to_parquet(prepared / "pairs" / "held.parquet")
    params = _params(
        tiny_bert_dir, "cross_encoder", datasets=["rule"], dev_datasets=["rule", "held"], max_steps=2
    )
    result = finetune_teacher(params, prepared, tmp_path / "teacher")

    assert set(result["dev_after"]) == {"rule/ap", "held/ap", "main"}
    assert set(result["validate_after"]) == set(result["validate_baseline"]) == {"rule/ap", "held/ap", "main"}


def test_finetune_without_the_before_evaluation_keeps_its_first_epoch(tiny_bert_dir, tmp_path):
    """``eval_before: false`` skips the chance-level scoring of a fresh head; epoch 1 is kept."""
    prepared = tmp_path / "prepared"
    (prepared / "pairs").mkdir(parents=True)
    train, dev = pair_table(rule_pairs(64, seed=3), "train"), pair_table(rule_pairs(16, seed=4), "dev")
    pd.concat([train, dev]).to_parquet(prepared / "pairs" / "rule.parquet")
    params = _params(tiny_bert_dir, "cross_encoder", datasets=["rule"], epochs=1.0, eval_before=False)
    result = finetune_teacher(params, prepared, tmp_path / "teacher")

    assert result["dev_before"] is None and result["history"][0] == {"epoch": 0, "step": 0}
    assert result["best_epoch"] == 1 and set(result["dev_after"]) == {"rule/ap", "main"}
    restored = load_teacher(params.teacher, tmp_path / "teacher", "cpu")
    select = load_dev_set(prepared, "rule", None, params.seed, "select", params.selection.validate_fraction)
    scores = probabilities(restored.score(select.pairs, "sym").logits)
    assert 100 * average_precision(scores.tolist(), select.gold.tolist()) == pytest.approx(
        result["dev_after"]["rule/ap"], abs=1e-3
    )


def test_causal_lora_finetune_saves_adapter_only(tiny_qwen2_dir, tmp_path):
    _gold_tables(tmp_path / "prepared", n_train=16)
    params = _params(tiny_qwen2_dir, "causal_lm", epochs=3.0, lora={"enabled": True, "r": 4, "alpha": 8})
    teacher = load_teacher(params.teacher, None, "cpu")
    before = teacher.score(PAIRS, "sym").logits
    result = finetune_teacher(params, tmp_path / "prepared", tmp_path / "teacher", teacher=teacher)
    assert result["loss_last"] < result["loss_first"]
    saved = tmp_path / "teacher"
    assert (saved / "adapter" / "adapter_model.safetensors").is_file() and not (saved / "model").exists()
    restored = load_teacher(params.teacher, saved, "cpu")  # base + merged adapter
    expected = teacher.score(PAIRS, "sym").logits
    torch.testing.assert_close(restored.score(PAIRS, "sym").logits, expected, atol=1e-4, rtol=1e-3)
    if result["best_epoch"] > 0:
        assert not torch.allclose(expected, before)


def test_finetune_disabled_saves_reference_only(tiny_bert_dir, tmp_path):
    params = _params(tiny_bert_dir, "cross_encoder", enabled=False)
    assert finetune_teacher(params, tmp_path / "none", tmp_path / "t")["enabled"] is False
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["teacher.json"]


def test_finetune_missing_dataset_is_a_data_error(tiny_bert_dir, tmp_path):
    with pytest.raises(DataError, match="prepared pairs for dataset 'nli' not found"):
        finetune_teacher(_params(tiny_bert_dir, "cross_encoder"), tmp_path, tmp_path / "t")
