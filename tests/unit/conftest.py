"""Tiny random backbones with local tokenizers, shared by the unit tests of every module.

All fixtures are session-scoped and build their folder once (about a second each):

- ``tiny_bert_dir``: a 2-layer, 32-d ``BertModel`` with a WordPiece tokenizer (lower-cased);
- ``tiny_qwen2_dir``: a 2-layer, 32-d ``Qwen2ForCausalLM`` with a byte-level BPE tokenizer and a
  ChatML chat template;
- ``tiny_llama_dir``: a 2-layer, 32-d ``LlamaForCausalLM`` with the same BPE vocabulary and no
  chat template (so both teacher prompt paths can be exercised);
- ``tiny_gpt2_dir``: a 2-layer, 32-d ``GPT2LMHeadModel`` (learned absolute positions, unlike the
  rotary Llama and Qwen2) with the same BPE vocabulary and no chat template;
- ``tiny_causal_lm``: a builder of further tiny causal LMs of any family (config overrides, chat
  template), each in a new folder.

The causal models are saved with their LM head, so a causal-LM teacher can load them; "yes" and
"no" are single tokens with and without a leading space, and every tokenizer has a pad token.
Nothing is downloaded. Do not modify the folders in a test: copy them first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_models import CHAT_TEMPLATE, check_yes_no, save_tiny_bert, save_tiny_causal_lm

# Words the tiny tokenizers know: the test sentences plus the teacher prompts' wording.
WORDS = (  # noqa: SIM905 - a word list is easier to read and edit as text
    "a the an is are was on in of to and or with for by at it its this that who what which how "
    "man woman men women person people child children cat cats dog dogs bird horse car bike guitar "
    "piano ball mat grass park street kitchen beach water food table field "
    "sits sat sitting plays playing play runs running rides riding eats eating jumps jumping "
    "sleeps sleeping walks walking cooks cooking reads reading sings singing "
    "red blue green big small young old happy sad fast slow "
    "question answer passage query judge whether correct correctly absolutely about event can "
    "yes no true false not q p"
).split()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT encoder (hidden 32, 4 heads) with a WordPiece tokenizer."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "!", "#", ":", *WORDS]
    vocab += ["##s", "##ing", "##ed"]
    folder = save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), vocab, max_positions=128)
    check_yes_no(BertTokenizer.from_pretrained(folder), "tiny BERT tokenizer")
    return folder


def _save_causal_lm(
    folder: Path, config_cls: type, model_cls: type, chat_template: str | None, **config_kw: object
) -> Path:
    """A random 2-layer, 32-d ``model_cls`` with the BPE tokenizer over WORDS."""
    return save_tiny_causal_lm(folder, config_cls, model_cls, WORDS, chat_template, **config_kw)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Qwen2ForCausalLM (hidden 32) with a BPE tokenizer and a ChatML template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny_qwen2")
    return _save_causal_lm(folder, Qwen2Config, Qwen2ForCausalLM, CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer LlamaForCausalLM (hidden 32) with a BPE tokenizer and no chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_causal_lm(tmp_path_factory.mktemp("tiny_llama"), LlamaConfig, LlamaForCausalLM, None)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT2LMHeadModel (hidden 32, absolute positions) with the BPE tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return _save_causal_lm(tmp_path_factory.mktemp("tiny_gpt2"), GPT2Config, GPT2LMHeadModel, None)


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_causal_lm(config_cls, model_cls, chat_template=None, **config_kw)``: another tiny
    causal LM (2 layers, hidden 32, the BPE tokenizer), saved to a new folder."""

    def build(
        config_cls: type, model_cls: type, chat_template: str | None = None, **config_kw: object
    ) -> Path:
        folder = tmp_path_factory.mktemp(f"tiny_{config_cls.model_type}")
        return _save_causal_lm(folder, config_cls, model_cls, chat_template, **config_kw)

    return build
