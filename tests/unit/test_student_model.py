"""The whole student on tiny random BERT / Qwen2 / Llama backbones: LoRA, encode, scoring, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d2llm.config import StudentConfig
from d2llm.errors import ModelError
from d2llm.student import backbone as backbone_module
from d2llm.student.backbone import lora_target_modules
from d2llm.student.model import D2LLMStudent
from d2llm.student.pma import mean_pool

TEXTS = [
    "a man plays a guitar",
    "a woman is cooking in the kitchen",
    "the dog runs",
    "children are playing with a ball in the park",
    "a cat sleeps",
    "a young man rides a red bike on the street",
]
PAIRS = [(TEXTS[0], TEXTS[2]), (TEXTS[1], TEXTS[3]), (TEXTS[4], TEXTS[5]), (TEXTS[0], TEXTS[0])]


def _cfg(folder: Path, **overrides) -> StudentConfig:
    base = {
        "backbone": str(folder),
        "max_length": 16,
        "pma": {"num_heads": 4},
        "iem": {"hidden_size": 16, "branch_size": 8},
    }
    base.update(overrides)
    return StudentConfig.model_validate(base)


def _student(folder: Path, seed: int = 0, **overrides) -> D2LLMStudent:
    torch.manual_seed(seed)
    return D2LLMStudent.from_config(_cfg(folder, **overrides))


def _perturb(student: D2LLMStudent, seed: int = 7) -> None:
    """Give every trainable weight (LoRA B starts at zero) a random value, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in student.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(params=["bert", "qwen2", "llama"])
def backbone_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_dir")


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("bert", ["query", "key", "value"]),
        ("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ],
)
def test_lora_targets_per_family_and_only_lora_pma_iem_train(
    family: str, expected: list[str], request: pytest.FixtureRequest
) -> None:
    student = _student(request.getfixturevalue(f"tiny_{family}_dir"))
    base = student.backbone.get_base_model()
    assert lora_target_modules(base) == expected
    trainable = [name for name, _ in student.trainable_parameters()]
    assert all("lora_" in n or n.startswith(("pma.", "iem.")) for n in trainable), trainable
    # Every targeted projection of both layers got an A and a B matrix.
    lora_names = [n for n in trainable if "lora_" in n]
    assert len(lora_names) == 2 * len(expected) * base.config.num_hidden_layers
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in lora_names} == set(expected)
    assert any(n.startswith("pma.") for n in trainable) and any(n.startswith("iem.") for n in trainable)
    frozen = [n for n, p in student.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all("lora_" not in n for n in frozen)


def test_lora_disabled_freezes_the_backbone(tiny_bert_dir: Path) -> None:
    student = _student(tiny_bert_dir, lora={"enabled": False})
    assert {n.split(".")[0] for n, _ in student.trainable_parameters()} == {"pma", "iem"}


def test_unknown_family_needs_explicit_lora_targets() -> None:
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ModelError, match=r"no default LoRA target modules for model type 'gpt2'.*lora"):
        lora_target_modules(gpt2)
    assert lora_target_modules(gpt2, ["c_attn"]) == ["c_attn"]


def test_lora_target_that_does_not_exist_is_a_model_error(tiny_bert_dir: Path) -> None:
    with pytest.raises(ModelError, match="cannot apply LoRA"):
        _student(tiny_bert_dir, lora={"target_modules": ["no_such_projection"]})


# --------------------------------------------------------------------------- encode


def test_encode_is_independent_of_batching_and_order(backbone_dir: Path) -> None:
    student = _student(backbone_dir)
    _perturb(student)
    one_by_one = student.encode(TEXTS, batch_size=1)
    batched = student.encode(TEXTS, batch_size=4)
    reordered = student.encode(TEXTS[::-1], batch_size=3)
    assert one_by_one.shape == (len(TEXTS), student.dim) and one_by_one.dtype == torch.float32
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    assert torch.allclose(reordered.flip(0), one_by_one, atol=1e-5)
    assert student.encode([]).shape == (0, student.dim)


def test_encode_truncates_to_max_length_and_restores_training_mode(tiny_bert_dir: Path) -> None:
    student = _student(tiny_bert_dir).train()
    long_text = " ".join(["a man plays a guitar"] * 20)
    head = " ".join(student.tokenizer.tokenize(long_text)[:14])  # 16 minus [CLS] and [SEP]
    assert torch.allclose(student.encode([long_text]), student.encode([head]), atol=1e-5)
    assert student.training


def test_embed_keeps_gradients_for_training(tiny_qwen2_dir: Path) -> None:
    student = _student(tiny_qwen2_dir).train()
    _perturb(student)
    vectors = student.embed_texts(TEXTS[:3])
    assert torch.allclose(vectors.detach(), student.encode(TEXTS[:3]), atol=1e-5)
    student.train()
    student.score_vectors(vectors[:2], vectors[1:], "asym").sum().backward()
    lora_grads = [p.grad for n, p in student.trainable_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert student.pma.seed.grad is not None


def test_pma_mean_init_with_cosine_residual_is_the_bi_encoder(tiny_llama_dir: Path) -> None:
    student = _student(tiny_llama_dir, pma={"num_heads": 4, "init": "mean"}, iem={"residual": "cosine"})
    base = student.backbone.get_base_model()
    batch = student.tokenize(TEXTS)
    with torch.no_grad():
        pooled = mean_pool(base(**batch).last_hidden_state, batch["attention_mask"])
    assert torch.allclose(student.encode(TEXTS), pooled, atol=1e-5)
    z = student.score(PAIRS, "sym")
    index = {t: i for i, t in enumerate(TEXTS)}
    cos = torch.nn.functional.cosine_similarity(
        pooled[[index[a] for a, _ in PAIRS]], pooled[[index[b] for _, b in PAIRS]]
    )
    assert torch.allclose(z, student.cfg.iem.cosine_scale * cos, atol=1e-4)


def test_pooled_layer_selects_a_hidden_state_and_is_range_checked(tiny_bert_dir: Path) -> None:
    last = _student(tiny_bert_dir, pma={"num_heads": 4, "init": "mean"})
    first = _student(tiny_bert_dir, pma={"num_heads": 4, "init": "mean"}, pooled_layer=1)
    assert first.backbone.get_base_model().config.output_hidden_states
    base = first.backbone.get_base_model()
    batch = first.tokenize(TEXTS[:2])
    with torch.no_grad():
        layer1 = base(**batch, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(first.encode(TEXTS[:2]), mean_pool(layer1, batch["attention_mask"]), atol=1e-5)
    assert not torch.allclose(first.encode(TEXTS[:2]), last.encode(TEXTS[:2]), atol=1e-3)
    with pytest.raises(ModelError, match=r"pooled_layer=5 is out of range .* 2 layers"):
        _student(tiny_bert_dir, pooled_layer=5)


# --------------------------------------------------------------------------- scoring


def test_score_paths_agree(tiny_bert_dir: Path) -> None:
    student = _student(tiny_bert_dir, iem={"hidden_size": 16, "branch_size": 8, "residual": "cosine"})
    _perturb(student)
    vectors = student.encode(TEXTS)
    with torch.no_grad():
        cache = student.passage_cache(vectors)
        matrix = student.score_matrix(vectors[:3], cache, "asym", chunk_size=4)
        rows = torch.stack(
            [student.score_vectors(vectors[q].expand(len(TEXTS), -1), vectors, "asym") for q in range(3)]
        )
        z, u = student.iem_features(vectors[:2], vectors[2:4], "sym")
    assert matrix.shape == (3, len(TEXTS))
    assert torch.allclose(matrix, rows, atol=1e-5)
    assert u.shape == (2, 8) and torch.allclose(z, student.score_vectors(vectors[:2], vectors[2:4], "sym"))
    pairs = [(TEXTS[0], TEXTS[4]), (TEXTS[2], TEXTS[1])]
    expected = torch.stack([matrix[0, 4], matrix[2, 1]])
    assert torch.allclose(student.score(pairs, "asym"), expected, atol=1e-5)


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_gives_identical_scores_and_no_pickles(
    backbone_dir: Path, tmp_path: Path
) -> None:
    student = _student(backbone_dir, pma={"num_heads": 4, "init": "random"})
    _perturb(student)
    before = student.score(PAIRS, "sym")
    out = student.save_pretrained(tmp_path / "student")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"student.json", "heads.safetensors", "adapter/adapter_model.safetensors"} <= set(files)
    for name in files:
        assert name.endswith((".safetensors", ".json", ".md")), name
        head = (out / name).read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{name} looks like a pickle / torch.save file"
    meta = json.loads((out / "student.json").read_text())
    assert meta["format_version"] == 1 and meta["dim"] == student.dim
    assert meta["student"]["backbone"] == str(backbone_dir)

    loaded = D2LLMStudent.from_pretrained(out)
    assert torch.equal(loaded.score(PAIRS, "sym"), before)
    assert torch.equal(loaded.encode(TEXTS), student.encode(TEXTS))
    # The adapter matters: a fresh student with the same seed scores differently.
    assert not torch.allclose(_student(backbone_dir, pma={"num_heads": 4}).score(PAIRS, "sym"), before)


def test_load_never_enables_remote_code_unless_saved(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _student(tiny_bert_dir).save_pretrained(tmp_path / "s")
    seen: list[bool] = []
    real = backbone_module.load_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone_module, "load_pretrained", recording)
    D2LLMStudent.from_pretrained(out)
    assert seen == [False]


def test_load_errors_are_model_errors(tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        D2LLMStudent.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"not a saved D2LLM student: student\.json is missing"):
        D2LLMStudent.from_pretrained(tmp_path / "empty")

    out = _student(tiny_bert_dir).save_pretrained(tmp_path / "s")
    heads = out / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:40])
    with pytest.raises(ModelError, match=r"heads\.safetensors is corrupt"):
        D2LLMStudent.from_pretrained(out)
    (out / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"incomplete: .*adapter_model\.safetensors is missing"):
        D2LLMStudent.from_pretrained(out)
    (out / "student.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        D2LLMStudent.from_pretrained(out)


def test_load_rejects_heads_that_do_not_fit_the_config(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = _student(tiny_bert_dir).save_pretrained(tmp_path / "s")
    meta = json.loads((out / "student.json").read_text())
    meta["student"]["iem"]["hidden_size"] = 24
    (out / "student.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="iem weights do not fit the saved config"):
        D2LLMStudent.from_pretrained(out)


def test_gradient_checkpointing_trains(tiny_bert_dir: Path) -> None:
    torch.manual_seed(0)
    student = D2LLMStudent.from_config(_cfg(tiny_bert_dir), gradient_checkpointing=True).train()
    base = student.backbone.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    plain = _student(tiny_bert_dir)
    assert not (getattr(plain.backbone.get_base_model(), "is_activation_checkpointing", False))
    plain.enable_gradient_checkpointing()
    assert plain.backbone.get_base_model().is_activation_checkpointing
    _perturb(student)
    student.embed(student.tokenize(TEXTS[:2])).sum().backward()
    assert all(p.grad is not None for n, p in student.trainable_parameters() if "lora_A" in n)


# --------------------------------------------------------------------------- LoRA merged for inference


def test_merged_student_gives_the_unmerged_vectors_and_scores(backbone_dir: Path, tmp_path: Path) -> None:
    student = _student(backbone_dir, pma={"num_heads": 4, "init": "random"})
    _perturb(student)  # non-zero LoRA B: merging really changes the backbone weights
    out = student.save_pretrained(tmp_path / "student")
    unmerged = D2LLMStudent.from_pretrained(out)
    merged = D2LLMStudent.from_pretrained(out, merged=True)

    assert merged.merged and not unmerged.merged
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert not any(p.requires_grad for p in merged.parameters())
    base = unmerged.backbone.get_base_model()
    lora_names = [n for n, _ in base.named_modules() if n.endswith(("query", "q_proj"))]
    assert lora_names  # the merged weights differ from the base weights the adapters sat on
    merged_weight = dict(merged.backbone.named_modules())[lora_names[0]].weight
    assert not torch.allclose(merged_weight, dict(base.named_modules())[lora_names[0]].base_layer.weight)

    vectors = unmerged.encode(TEXTS)
    torch.testing.assert_close(merged.encode(TEXTS), vectors, atol=1e-5, rtol=1e-5)
    for task in ("sym", "asym"):
        torch.testing.assert_close(
            merged.score(PAIRS, task), unmerged.score(PAIRS, task), atol=1e-5, rtol=1e-5
        )
    with torch.no_grad():
        cache = unmerged.passage_cache(vectors)
        expected = unmerged.score_matrix(vectors[:2], cache, "asym")
        got = merged.score_matrix(
            merged.encode(TEXTS[:2]), merged.passage_cache(merged.encode(TEXTS)), "asym"
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # An index records the fingerprint of the saved weights: both forms answer with it.
    assert merged.fingerprint() == unmerged.fingerprint()


def test_merged_student_cannot_train_or_be_saved(tiny_bert_dir: Path, tmp_path: Path) -> None:
    merged = _student(tiny_bert_dir).for_inference()
    with pytest.raises(ModelError, match="merged for inference and cannot train"):
        merged.train()
    with pytest.raises(ModelError, match="cannot save a student whose LoRA is merged"):
        merged.save_pretrained(tmp_path / "merged")
    assert merged.merge_lora() is merged  # idempotent


def test_training_after_loading_still_works_unmerged(tiny_bert_dir: Path, tmp_path: Path) -> None:
    student = _student(tiny_bert_dir)
    _perturb(student)
    loaded = D2LLMStudent.from_pretrained(student.save_pretrained(tmp_path / "student")).train()
    inference = loaded.for_inference()  # a merged copy: the loaded student keeps its adapters
    assert inference.merged and not loaded.merged and loaded.training
    before = inference.encode(TEXTS)

    lora = {n: p for n, p in loaded.trainable_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    start = {n: p.detach().clone() for n, p in lora.items()}
    optimizer = torch.optim.SGD([p for _, p in loaded.trainable_parameters()], lr=0.5)
    loaded.embed_texts(TEXTS[:3]).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    optimizer.step()
    assert any(not torch.equal(p, start[n]) for n, p in lora.items())

    # The copy did not move with the training, and the trained student still saves its adapter.
    torch.testing.assert_close(inference.encode(TEXTS), before)
    assert not torch.allclose(loaded.encode(TEXTS), before, atol=1e-5)
    retrained = D2LLMStudent.from_pretrained(loaded.save_pretrained(tmp_path / "retrained"), merged=True)
    torch.testing.assert_close(retrained.encode(TEXTS), loaded.encode(TEXTS), atol=1e-5, rtol=1e-5)


def test_an_index_built_merged_loads_for_the_unmerged_student(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import pandas as pd

    from d2llm.search import build_index, load_index, search

    student = _student(tiny_bert_dir)
    _perturb(student)
    out = student.save_pretrained(tmp_path / "student")
    corpus = pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(TEXTS))], "text": TEXTS})
    merged = D2LLMStudent.from_pretrained(out, merged=True)
    build_index(merged, corpus, tmp_path / "index", model_version="test")
    unmerged = D2LLMStudent.from_pretrained(out)
    index = load_index(tmp_path / "index", unmerged)
    hits = search(unmerged, index, TEXTS[0], k=3, mode="full")
    merged_hits = search(merged, load_index(tmp_path / "index", merged), TEXTS[0], k=3, mode="full")
    assert [h.doc_id for h in hits] == [h.doc_id for h in merged_hits]
    assert [h.score for h in hits] == pytest.approx([h.score for h in merged_hits], abs=1e-5)


def test_merged_student_takes_the_configured_iem_dtype(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """float32 by default (the exact path above); bfloat16 from the saved config or the caller."""
    student = _student(tiny_bert_dir)
    _perturb(student)
    out = student.save_pretrained(tmp_path / "student")
    exact = D2LLMStudent.from_pretrained(out, merged=True)
    low = D2LLMStudent.from_pretrained(out, merged=True, iem_dtype="bfloat16")
    assert exact.iem.branch_format == "float32" and low.iem.branch_format == "bfloat16"
    assert student.iem.branch_format == "float32"  # training never sees the bf16 branch
    assert low.fingerprint() == exact.fingerprint()  # same weights, same index
    configured = _student(
        tiny_bert_dir, iem={"hidden_size": 16, "branch_size": 8, "inference_dtype": "bfloat16"}
    )
    assert configured.for_inference().iem.branch_format == "bfloat16"
    assert configured.for_inference("float32").iem.branch_format == "float32"
    assert configured.for_inference("int8").iem.branch_format == "int8"

    with torch.no_grad():
        vectors = exact.encode(TEXTS)
        cache = exact.passage_cache(vectors)
        expected = exact.score_matrix(vectors, cache, "asym")
        got = low.score_matrix(low.encode(TEXTS), low.passage_cache(low.encode(TEXTS)), "asym")
    assert got.dtype == torch.float32
    # A few bf16 roundings of 8 branch units: within 3% of the largest logit (float32: 1e-5).
    torch.testing.assert_close(got, expected, atol=0.03 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ({}, (1e-4, 1e-4, 1e-4)),  # the paper: one rate
        ({"head_lr": 3e-4}, (3e-4, 3e-4, 1e-4)),
        ({"iem_lr": 1e-3}, (1e-4, 1e-3, 1e-4)),
        ({"head_lr": 3e-4, "iem_lr": 1e-3}, (3e-4, 1e-3, 1e-4)),
    ],
)
def test_optimiser_rates_per_part(tiny_bert_dir: Path, rates: dict, expected: tuple) -> None:
    from d2llm.config import TrainingConfig

    student = _student(tiny_bert_dir)
    optimiser = student.configure_optimizers(TrainingConfig(lr=1e-4, **rates))
    rate_of = {id(p): group["lr"] for group in optimiser.param_groups for p in group["params"]}
    by_part = {"pma": set(), "iem": set(), "lora": set()}
    for name, param in student.trainable_parameters():
        part = name.split(".")[0] if name.startswith(("pma.", "iem.")) else "lora"
        by_part[part].add(rate_of[id(param)])
    assert (by_part["pma"], by_part["iem"], by_part["lora"]) == tuple({rate} for rate in expected)
    assert sum(len(g["params"]) for g in optimiser.param_groups) == len(student.trainable_parameters())
