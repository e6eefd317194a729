"""GPU check: does vLLM score a causal-LM teacher as the HF path does? Prints max abs differences.

Scores the same SICK train pairs (data/raw/sick) with the HF teacher (d2llm.teachers.causal_lm,
on CUDA, autocast off so both sides compute in the same dtype) and with the vLLM teacher
(d2llm.teachers.vllm_engine), and prints for the yes/no logits, the log-odds ``z_yes - z_no``,
the yes-probabilities and the last-hidden-state features: the largest absolute difference,
the smallest cosine between feature vectors, and the Spearman correlation of the log-odds.
Needs a GPU and an environment with vLLM (not d2llm's: see docs/distributed.md), e.g.

    python -m venv /tmp/vllm-env && /tmp/vllm-env/bin/pip install vllm pandas pyarrow peft
    /tmp/vllm-env/bin/pip install --no-deps -e .
    /tmp/vllm-env/bin/python scripts/gpu_check_vllm.py --model HuggingFaceTB/SmolLM2-135M-Instruct

The model is read from the Hugging Face hub (or a local folder). Exit status 0 when the figures
are within ``--logit-tol`` / ``--feature-tol`` (defaults fit float32), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or folder")
    p.add_argument("--pairs", type=int, default=64, help="SICK train pairs scored")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--logit-tol", type=float, default=1e-2)
    p.add_argument("--feature-tol", type=float, default=1e-2, help="on 1 - cosine of the feature vectors")
    return p.parse_args(argv)


def sick_pairs(n: int) -> list[tuple[str, str]]:
    lines = (ROOT / "data" / "raw" / "sick" / "SICK_train.txt").read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.split("\t")[1:3]) for line in lines[:n]]  # type: ignore[misc]


def hf_scores(teacher, pairs, dtype):
    """Logits and features of the HF teacher on CUDA in ``dtype``, without autocast."""
    import torch

    from d2llm.batching import map_batched

    teacher.lm.to(dtype)

    def run(batch):
        logits, feats = teacher.forward({k: v.to(teacher.device) for k, v in batch.items()})
        return logits.float(), feats.float()

    with torch.inference_mode():
        return map_batched(
            teacher.encode_pairs(pairs, "sym"),
            run,
            batch_size=16,
            pad_id=teacher.tokenizer.pad_token_id,
            side=teacher.padding_side,
        )


def compare(hf_logits, hf_feats, v_logits, v_feats) -> dict[str, float]:
    import torch

    def spearman(a, b):
        ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])

    hf_d, v_d = hf_logits[:, 0] - hf_logits[:, 1], v_logits[:, 0] - v_logits[:, 1]
    cos = torch.nn.functional.cosine_similarity(hf_feats, v_feats, dim=-1)
    return {
        "max_abs_logit_diff": float((hf_logits - v_logits).abs().max()),
        "max_abs_log_odds_diff": float((hf_d - v_d).abs().max()),
        "max_abs_yes_prob_diff": float((hf_logits.softmax(-1) - v_logits.softmax(-1)).abs().max()),
        "max_abs_feature_diff": float((hf_feats - v_feats).abs().max()),
        "max_feature_norm": float(hf_feats.norm(dim=-1).max()),
        "min_feature_cosine": float(cos.min()),
        "spearman_log_odds": spearman(hf_d, v_d),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from d2llm.config import Params, TeacherConfig
    from d2llm.teachers.factory import load_teacher
    from d2llm.teachers.vllm_engine import VLLMTeacher, engine_arguments

    if not torch.cuda.is_available():
        print("this check needs a CUDA GPU", file=sys.stderr)
        return 2
    pairs = sick_pairs(args.pairs)
    cfg = TeacherConfig(kind="causal_lm", model=args.model, max_length=args.max_length, batch_size=16)
    params = Params.model_validate(
        {"teacher": cfg.model_dump(), "labelling": {"engine": "vllm", "vllm": {
            "dtype": args.dtype, "gpu_memory_utilization": args.gpu_memory_utilization}}}
    )  # fmt: skip

    start = time.perf_counter()
    hf = load_teacher(cfg, None, "cuda")
    hf_load = time.perf_counter() - start
    hf_logits, hf_feats = hf_scores(hf, pairs, getattr(torch, args.dtype))
    hf_logits, hf_feats = hf_logits.cpu(), hf_feats.cpu()
    tokenizer = hf.tokenizer
    del hf
    torch.cuda.empty_cache()

    start = time.perf_counter()
    model = str(args.model)
    teacher = VLLMTeacher(cfg, tokenizer, params.labelling.vllm, model, model)
    v_load = time.perf_counter() - start
    start = time.perf_counter()
    out = teacher.score(pairs, "sym", with_features=True)
    v_score = time.perf_counter() - start

    report = {
        "model": args.model,
        "pairs": len(pairs),
        "dtype": args.dtype,
        "engine_arguments": engine_arguments(cfg, params.labelling.vllm, model, model)[0],
        "scoring_info": teacher.scoring_info(),
        "hf_load_s": hf_load,
        "vllm_load_s": v_load,
        "vllm_score_s": v_score,
        **compare(hf_logits, hf_feats, out.logits, out.features),
    }
    print(json.dumps(report, indent=2, default=str))
    ok = (
        report["max_abs_logit_diff"] <= args.logit_tol
        and 1 - report["min_feature_cosine"] <= args.feature_tol
    )
    print("vLLM matches the HF path" if ok else "vLLM DIFFERS from the HF path beyond the tolerances")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
