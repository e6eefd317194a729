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
from tiny_models import save_tiny_bert

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

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _training_corpus() -> list[str]:
    """Sentences that make every word (with and without a leading space) one BPE token."""
    lines = [" ".join(WORDS), " ".join(w.capitalize() for w in WORDS)]
    lines += [f"{w} {w} {w}" for w in WORDS for _ in range(4)]
    lines += ["#Q: a man plays a guitar.\n#P: a person plays music?\nAnswer yes or no. yes, no."] * 8
    return lines


def _build_bpe_tokenizer():
    """Train a deterministic byte-level BPE (Qwen2/Llama-3 style) on the tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        min_frequency=1,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    return tok


def _check_yes_no(tokenizer, where: str) -> None:
    for text in ("yes", "no", " yes", " no"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, f"{where}: {text!r} is not a single token: {ids}"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT encoder (hidden 32, 4 heads) with a WordPiece tokenizer."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "!", "#", ":", *WORDS]
    vocab += ["##s", "##ing", "##ed"]
    folder = save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), vocab, max_positions=128)
    _check_yes_no(BertTokenizer.from_pretrained(folder), "tiny BERT tokenizer")
    return folder


def _save_causal_lm(
    folder: Path, config_cls: type, model_cls: type, chat_template: str | None, **config_kw: object
) -> Path:
    """A random 2-layer, 32-d ``model_cls`` with the BPE tokenizer; ``config_kw`` overrides the config."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    bpe = _build_bpe_tokenizer()
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None}
    if config_cls.model_type == "qwen2":
        # transformers 5 always loads qwen2 folders with Qwen2Tokenizer, which rebuilds its BPE
        # from the vocabulary and merges: give it exactly those of the trained tokenizer.
        tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=_merges_of(bpe), **special)
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **special)
    if chat_template:
        tokenizer.chat_template = chat_template
    _check_yes_no(tokenizer, f"tiny {config_cls.model_type} tokenizer")
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


def _merges_of(bpe) -> list[tuple[str, str]]:
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


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
