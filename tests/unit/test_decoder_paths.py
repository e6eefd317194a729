"""Decoders read as they are meant to be: a text's vector independent of its batch (encoders too),
the teacher's logits the model's own, thinking mode off. Tiny random models built locally
(conftest); every case that guards a fix fails without it (left padding of GPT-2 and BERT, each
output transform, the thinking template)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from d2llm.biencoder import MeanPoolEncoder
from d2llm.config import StudentConfig, TeacherConfig
from d2llm.student.model import D2LLMStudent
from d2llm.teachers.causal_lm import CausalLMTeacher
from d2llm.teachers.factory import load_teacher

torch.set_num_threads(1)

# One text between a much longer and a much shorter one: in a batch it is padded, and so is
# the short one; alone neither is.
LONG = "children are playing with a ball in the park and a young man rides a red bike on the street " * 4
TEXTS = [LONG, "a man plays a guitar", "a cat"]
PAIRS = [
    ("a man plays a guitar", "a person plays music"),
    ("a cat", "a dog runs in the park with a happy child and a big red ball on the grass"),
    ("the child reads", "a child is reading"),
]
# Llama and Qwen2 are rotary (attention sees only relative positions); GPT-2 and BERT learn
# absolute positions, so a shifted position changes their states.
BACKBONES = ["llama", "qwen2", "gpt2", "bert"]
LORA_TARGETS = {"llama": None, "qwen2": None, "gpt2": ["c_attn"], "bert": None}


def _alone_and_batched(encode: Callable[[list[str]], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    alone = torch.cat([encode([text]) for text in TEXTS])
    return alone, encode(TEXTS)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", BACKBONES)
def test_biencoder_vector_does_not_depend_on_batch_companions(
    request: pytest.FixtureRequest, family: str, side: str
) -> None:
    """The mining encoder, the evaluation baseline and the fusion's bi-encoder are this class."""
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    encoder = MeanPoolEncoder.from_ref(str(folder), max_length=128, batch_size=8, device="cpu")
    encoder.tokenizer.padding_side = side  # what a decoder's tokenizer often ships with
    alone, batched = _alone_and_batched(encoder.encode)
    assert not torch.isnan(batched).any()
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", BACKBONES)
def test_student_vector_does_not_depend_on_batch_companions(
    request: pytest.FixtureRequest, family: str, side: str
) -> None:
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    cfg = StudentConfig.model_validate(
        {
            "backbone": str(folder),
            "max_length": 128,
            "lora": {"target_modules": LORA_TARGETS[family]},
            "pma": {"num_heads": 4},
            "iem": {"hidden_size": 16, "branch_size": 8},
        }
    )
    torch.manual_seed(0)
    student = D2LLMStudent.from_config(cfg)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a say
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    student.tokenizer.padding_side = side
    alone, batched = _alone_and_batched(lambda texts: student.encode(texts, batch_size=8))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    with torch.no_grad():  # the training path: one padded batch through token_states and PMA
        trained = student.embed_texts(TEXTS)
    torch.testing.assert_close(trained, alone, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- teacher output path


def _teacher(folder: Path, max_length: int = 96) -> CausalLMTeacher:
    cfg = TeacherConfig(kind="causal_lm", model=str(folder), max_length=max_length, batch_size=8)
    return load_teacher(cfg, None, "cpu")  # type: ignore[return-value]


def _output_path_families() -> dict[str, tuple[str, str, dict[str, object]]]:
    # Each transform set far from the identity, so leaving it out is seen at once.
    return {
        "gemma2": (
            "Gemma2Config",
            "Gemma2ForCausalLM",
            {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 0.05},
        ),
        "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 4.0}),
        "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 0.25}),
    }


@pytest.mark.parametrize("family", sorted(_output_path_families()))
def test_teacher_logits_are_the_models_own_next_token_logits(
    tiny_causal_lm: Callable[..., Path], family: str
) -> None:
    """Gemma 2 soft-caps, Cohere scales, Granite divides: [z_yes, z_no] must match the full model."""
    import transformers

    config_name, model_name, overrides = _output_path_families()[family]
    folder = tiny_causal_lm(
        getattr(transformers, config_name), getattr(transformers, model_name), **overrides
    )
    teacher = _teacher(folder)
    answer_ids = [teacher.yes_id, teacher.no_id]
    scored = teacher.score(PAIRS, "sym").logits  # left-padded batch, two head rows
    with torch.no_grad():
        full = torch.stack(
            [
                teacher.lm(input_ids=torch.tensor([teacher.encode_pair(a, b, "sym")])).logits[
                    0, -1, answer_ids
                ]
                for a, b in PAIRS
            ]
        )
        rows = teacher.lm.get_output_embeddings().weight[answer_ids]
        last = teacher.lm.base_model(input_ids=torch.tensor([teacher.encode_pair(*PAIRS[0], "sym")]))
        head_only = last.last_hidden_state[0, -1] @ rows.T
    # The test means something: the model's logits are not the bare head rows.
    assert (head_only - full[0]).abs().max() > 1e-3
    torch.testing.assert_close(scored, full, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- thinking mode

# A minimal Qwen3-style template: ChatML, and an empty think block when thinking is switched off.
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def test_chat_template_thinking_mode_is_switched_off(tiny_causal_lm: Callable[..., Path]) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # max_length 160: the tiny BPE spells the think tags byte by byte.
    teacher = _teacher(tiny_causal_lm(Qwen2Config, Qwen2ForCausalLM, THINKING_TEMPLATE), max_length=160)
    assert teacher.use_chat
    no_think = "Answer yes or no.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert teacher.render("a man", "a person", "sym", "en").endswith(no_think)
    # The scored token ids end with it too (the template is never truncated).
    ids = teacher.encode_pair("a man plays a guitar " * 20, "a person", "sym")
    assert teacher.tokenizer.decode(ids).endswith(no_think)
    assert teacher.tokenizer.convert_ids_to_tokens([teacher.yes_id, teacher.no_id]) == ["yes", "no"]
