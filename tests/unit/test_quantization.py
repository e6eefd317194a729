"""int8 dynamic quantisation (d2llm.quantization): the teacher and student options.

Quantised outputs are approximations: the tests check that the Linear layers really are
quantised, that the float32 originals stay untouched, and that the outputs stay close to the
float32 ones (the quality change on real data is measured by benchmarks/cpu_efficiency.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2llm.config import StudentConfig, TeacherConfig
from d2llm.errors import ModelError
from d2llm.quantization import apply_quantization, is_quantized, quantize_linear_int8
from d2llm.student.model import D2LLMStudent
from d2llm.teachers.factory import load_teacher

TEXTS = ["a man plays a guitar", "a woman is cooking in the kitchen", "the dog runs", "a cat sleeps"]


def test_int8_replaces_every_linear_and_keeps_the_original() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    x = torch.randn(16, 64)
    expected = model(x)
    quantized = quantize_linear_int8(model)
    assert is_quantized(quantized) and not is_quantized(model)
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    with torch.inference_mode():
        got = quantized(x)
    assert torch.equal(model(x), expected)  # the float32 model is untouched
    assert F.cosine_similarity(got, expected, dim=-1).min() > 0.99
    assert not torch.equal(got, expected)  # and int8 really rounds
    assert apply_quantization(model, "none") is model
    with pytest.raises(ModelError, match="unknown quantization 'int4'"):
        apply_quantization(model, "int4")  # type: ignore[arg-type]


def test_int8_student_encodes_close_to_float32(tiny_bert_dir: Path, tmp_path: Path) -> None:
    cfg = StudentConfig.model_validate(
        {"backbone": str(tiny_bert_dir), "max_length": 16, "pma": {"num_heads": 4},
         "iem": {"hidden_size": 16, "branch_size": 8}}
    )  # fmt: skip
    torch.manual_seed(0)
    out = D2LLMStudent.from_config(cfg).save_pretrained(tmp_path / "student")
    exact = D2LLMStudent.from_pretrained(out, merged=True)
    low = D2LLMStudent.from_pretrained(out, merged=True, quantization="int8")
    assert is_quantized(low.backbone) and not is_quantized(exact.backbone)
    assert low.fingerprint() == exact.fingerprint()  # the saved weights are the same
    cos = F.cosine_similarity(low.encode(TEXTS), exact.encode(TEXTS), dim=-1)
    assert cos.min() > 0.95
    with pytest.raises(ModelError, match="runs on the CPU only"):
        D2LLMStudent.from_pretrained(out, merged=True, quantization="int8", device="meta")


def test_int8_teacher_scores_close_to_float32(tiny_bert_dir: Path) -> None:
    cfg = TeacherConfig(model=str(tiny_bert_dir), max_length=32, batch_size=4)
    pairs = list(zip(TEXTS, TEXTS[1:] + TEXTS[:1], strict=True))
    torch.manual_seed(0)
    teacher = load_teacher(cfg, None, "cpu")
    expected = teacher.score(pairs, "sym", with_features=True)
    assert teacher.quantize("none") is teacher and not is_quantized(teacher.encoder)
    teacher.quantize("int8")
    assert is_quantized(teacher.encoder)
    got = teacher.score(pairs, "sym", with_features=True)
    assert F.cosine_similarity(got.features, expected.features, dim=-1).min() > 0.95
    assert (got.logits - expected.logits).abs().max() < 0.1 * expected.logits.abs().max() + 1e-3


class _WithOutlier(nn.Module):
    """Appends one constant feature 10 000 times larger than the rest, as a decoder LLM's hidden
    states carry a few huge dimensions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_full((*x.shape[:-1], 1), 1e4)], dim=-1)


def test_int8_that_changes_the_teachers_judgement_is_refused(tiny_bert_dir: Path) -> None:
    """The head reads pooled states plus an outlier feature (weighted 1e-4, so float32 scores
    barely move). int8's one activation scale per tensor then rounds the real features to zero:
    the probe's log-odds stop agreeing with float32 and quantize refuses, naming the fix."""
    from d2llm.teachers.probe import PROBE_PAIRS, agreement

    cfg = TeacherConfig(model=str(tiny_bert_dir), max_length=32, batch_size=4)
    torch.manual_seed(0)
    teacher = load_teacher(cfg, None, "cpu")
    plain = teacher.score(PROBE_PAIRS["sym"], "sym").logits
    head = nn.Linear(teacher.head.in_features + 1, 2)
    with torch.no_grad():
        head.weight[:, :-1] = teacher.head.weight
        head.weight[:, -1] = 1e-4
        head.bias.copy_(teacher.head.bias)
    teacher.head = nn.Sequential(_WithOutlier(), head)
    with_outlier = teacher.score(PROBE_PAIRS["sym"], "sym").logits
    assert agreement(plain[:, 0] - plain[:, 1], with_outlier[:, 0] - with_outlier[:, 1]) > 0.999
    with pytest.raises(ModelError, match=r"r = .*labelling.quantization and evaluation.teacher_quantization"):
        teacher.quantize("int8")


def test_agreement_of_constant_scores() -> None:
    from d2llm.teachers.probe import agreement

    assert agreement([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert agreement([1.0, 1.0], [0.0, 2.0]) == 0.0
    assert agreement([0.0, 1.0, 2.0], [0.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert agreement([0.0, 1.0, 2.0], [2.0, 1.0, 0.0]) == pytest.approx(-1.0)


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_int8_causal_lm_teacher_scores_close_to_float32(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    """labelling.quantization: int8 on a causal-LM teacher: its LM head is quantised too, and the
    yes/no rows are read from the packed int8 weights (a float head has them as a tensor)."""
    cfg = TeacherConfig(kind="causal_lm", model=str(request.getfixturevalue(model_fixture)), max_length=128)
    pairs = list(zip(TEXTS, TEXTS[1:] + TEXTS[:1], strict=True))
    torch.manual_seed(0)
    teacher = load_teacher(cfg, None, "cpu")
    expected = teacher.score(pairs, "asym", with_features=True)
    teacher.quantize("int8")
    assert is_quantized(teacher.lm) and teacher.scoring_info()["quantization"].startswith("int8")
    got = teacher.score(pairs, "asym", with_features=True)
    assert not torch.equal(got.logits, expected.logits)  # int8 really rounds
    assert F.cosine_similarity(got.features, expected.features, dim=-1).min() > 0.95
    d_got, d_exp = got.logits[:, 0] - got.logits[:, 1], expected.logits[:, 0] - expected.logits[:, 1]
    assert (d_got - d_exp).abs().max() < 0.1 * d_exp.abs().max() + 1e-3


def test_labels_written_before_the_quantization_key_count_as_float32(tmp_path: Path) -> None:
    from d2llm.labelling.shards import MANIFEST_FILE, prepare_out_dir

    old = {"format": 1, "groups_sha256": "abc", "complete": True}  # no teacher_quantization
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(old), encoding="utf-8")
    now = {"format": 1, "groups_sha256": "abc", "teacher_quantization": "none", "complete": False}
    assert prepare_out_dir(tmp_path, now, overwrite=False) == old  # reused, not relabelled
    int8 = {**now, "teacher_quantization": "int8"}
    with pytest.raises(Exception, match="holds other labels"):
        prepare_out_dir(tmp_path, int8, overwrite=False)


@pytest.mark.usefixtures("cpu_bf16_on")
def test_cpu_bf16_encodes_close_to_float32_and_changes_nothing_on_other_devices(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """student.cpu_bf16: the bi-encoder and the student encode under bf16 autocast on a CPU."""
    from d2llm.biencoder import MeanPoolEncoder
    from d2llm.hub import cpu_bf16_autocast

    exact = MeanPoolEncoder.from_ref(str(tiny_bert_dir), device="cpu")
    low = MeanPoolEncoder.from_ref(str(tiny_bert_dir), device="cpu", cpu_bf16=True)
    e, b = exact.encode(TEXTS), low.encode(TEXTS)
    assert b.dtype == torch.float32 and not torch.equal(b, e)  # bf16 really computes
    assert F.cosine_similarity(b, e, dim=-1).min() > 0.99

    raw = {"backbone": str(tiny_bert_dir), "max_length": 16, "pma": {"num_heads": 4},
           "iem": {"hidden_size": 16, "branch_size": 8}}  # fmt: skip
    torch.manual_seed(0)
    out = D2LLMStudent.from_config(StudentConfig.model_validate(raw)).save_pretrained(tmp_path / "s")
    exact_student = D2LLMStudent.from_pretrained(out, merged=True)
    meta = json.loads((out / "student.json").read_text(encoding="utf-8"))
    meta["student"]["cpu_bf16"] = True  # as a student trained with the option saves it
    (out / "student.json").write_text(json.dumps(meta), encoding="utf-8")
    bf16_student = D2LLMStudent.from_pretrained(out, merged=True)
    assert bf16_student.cfg.cpu_bf16 and bf16_student.fingerprint() == exact_student.fingerprint()
    s_exact, s_low = exact_student.encode(TEXTS), bf16_student.encode(TEXTS)
    assert not torch.equal(s_low, s_exact)
    assert F.cosine_similarity(s_low, s_exact, dim=-1).min() > 0.99

    # With an int8 backbone (inference_quantization) bf16 autocast is left off: int8 kernels
    # take float32 inputs. Both encode, and as the int8 model alone does.
    int8_student = D2LLMStudent.from_pretrained(out, merged=True, quantization="int8")
    assert int8_student.cfg.cpu_bf16 and is_quantized(int8_student.backbone)
    int8_plain = D2LLMStudent.from_pretrained(out, merged=True, quantization="int8")
    int8_plain.cfg = int8_plain.cfg.model_copy(update={"cpu_bf16": False})
    assert torch.equal(int8_student.encode(TEXTS), int8_plain.encode(TEXTS))
    int8_encoder = MeanPoolEncoder(quantize_linear_int8(low.model), low.tokenizer, cpu_bf16=True)
    assert F.cosine_similarity(int8_encoder.encode(TEXTS), e, dim=-1).min() > 0.95

    assert not isinstance(cpu_bf16_autocast(torch.device("meta"), True), torch.autocast)
    assert not isinstance(cpu_bf16_autocast(torch.device("cpu"), False), torch.autocast)


@pytest.mark.parametrize("model_fixture", ["tiny_bert_dir", "tiny_llama_dir"])
@pytest.mark.usefixtures("cpu_bf16_on")
def test_bf16_teacher_scores_close_to_float32_and_keeps_its_weights(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    """labelling.quantization: bf16 autocasts the forward passes on a CPU: the weights stay
    float32 and unquantised, the logits move by bf16's rounding only, labels.json says bf16."""
    kind = "causal_lm" if "llama" in model_fixture else "cross_encoder"
    cfg = TeacherConfig(kind=kind, model=str(request.getfixturevalue(model_fixture)), max_length=64)
    pairs = list(zip(TEXTS, TEXTS[1:] + TEXTS[:1], strict=True))
    torch.manual_seed(0)
    teacher = load_teacher(cfg, None, "cpu")
    expected = teacher.score(pairs, "asym").logits
    assert teacher.scoring_info()["dtype"] == "float32"
    teacher.quantize("bf16")
    assert teacher.scoring_info()["dtype"] == "bfloat16 (autocast)"
    assert all(p.dtype == torch.float32 for m in teacher.modules() for p in m.parameters())
    assert not any(is_quantized(m) for m in teacher.modules())
    got = teacher.score(pairs, "asym").logits
    assert got.dtype == torch.float32 and not torch.equal(got, expected)  # bf16 really rounds
    d_got, d_exp = got[:, 0] - got[:, 1], expected[:, 0] - expected[:, 1]
    assert (d_got - d_exp).abs().max() < 0.1 * d_exp.abs().max() + 1e-2


def test_unknown_teacher_quantization_is_refused(tiny_bert_dir: Path) -> None:
    teacher = load_teacher(TeacherConfig(model=str(tiny_bert_dir), max_length=32), None, "cpu")
    with pytest.raises(ModelError, match="unknown teacher quantization 'fp8'"):
        teacher.quantize("fp8")


def test_cpu_bf16_only_where_the_cpu_has_it_unless_told(monkeypatch, caplog):
    """bf16 options on a CPU without bf16 arithmetic run in float32 (emulated bf16 is several
    times slower there) and warn once; ``$D2LLM_CPU_BF16`` forces it on or off either way."""
    from d2llm import hub
    from d2llm.config import Params
    from d2llm.training import Distiller

    cpu = torch.device("cpu")
    params = Params.model_validate({"student": {"cpu_bf16": True}})
    monkeypatch.delenv(hub.CPU_BF16_ENV, raising=False)
    for has_bf16 in (False, True):
        monkeypatch.setattr(hub, "cpu_has_bf16", lambda has=has_bf16: has)
        hub._warn_no_cpu_bf16.cache_clear()
        caplog.clear()
        with caplog.at_level("WARNING", logger="d2llm.hub"):
            on = isinstance(hub.cpu_bf16_autocast(cpu, True), torch.autocast)
            assert Distiller.uses_bf16(params, cpu) is has_bf16
        assert on is has_bf16
        assert ("running in float32 instead" in caplog.text) is not has_bf16
        assert caplog.text.count("running in float32 instead") <= 1  # once, not per batch
    for choice, expected in (("on", True), ("off", False), ("OFF", False)):
        monkeypatch.setenv(hub.CPU_BF16_ENV, choice)
        for has_bf16 in (False, True):
            monkeypatch.setattr(hub, "cpu_has_bf16", lambda has=has_bf16: has)
            assert isinstance(hub.cpu_bf16_autocast(cpu, True), torch.autocast) is expected
    assert not isinstance(hub.cpu_bf16_autocast(cpu, False), torch.autocast)  # never asked: never
    monkeypatch.setenv(hub.CPU_BF16_ENV, "sometimes")
    with pytest.raises(ValueError, match="auto, on or off"):
        hub.cpu_bf16_allowed()


def test_cpu_has_bf16_reads_the_hardware():
    """A plain bool from torch's CPU probes (x86) or /proc/cpuinfo (Arm); cached."""
    from d2llm.hub import cpu_has_bf16

    assert cpu_has_bf16() in (True, False)
    assert cpu_has_bf16() is cpu_has_bf16()
