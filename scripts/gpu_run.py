"""One GPU session, one script: check vLLM against the HF path, run a paper-like preset, record its figures.

What it does, in this working copy (each step timed; the pipeline steps are the ``d2llm``
commands users run, so what it measures is what they get):

1. **vLLM check**: ``scripts/gpu_check_vllm.py`` on ``--vllm-model`` (a hub id or a folder
   holding the preset's teacher in Hugging Face format). Recorded as skipped, with the reason,
   where vLLM is not installed (it needs its own environment: docs/distributed.md) or there is
   no CUDA device.
2. **The preset** (default ``configs/llm-gpu-10min.yaml``, sized for about 10 minutes on one
   H100): ``fetch-data``, ``prepare``, ``validate``, ``mine``, ``teacher-finetune``, ``label``,
   ``train``, into ``--out-dir``; the first failing step stops the run (its log is kept).
3. **Labelling throughput**: the saved teacher, loaded as labelling loads it (engine,
   quantisation), scores ``--throughput-pairs`` of the labelled (anchor, candidate) pairs again,
   timed alone (model load excluded, CUDA synchronised): pairs/s, prompt tokens/s, and the model
   FLOPs those tokens take (2 x parameters per token, the forward pass) as a share of the card's
   dense bf16 peak (``--peak-tflops``, else looked up from the card's name; none on a CPU).
4. **Training throughput**: optimizer steps/s of the distillation (steps over its seconds, dev
   evaluations included: the train report does not split them).
5. **The dev table**: per dev set, the bi-encoder, the raw teacher and the fused teacher (the
   teacher report) and the student at its best dev step (the dev curve).

Writes ``<out-dir>/gpu_run.json`` and ``<out-dir>/gpu_run.md`` and prints the markdown. Exit
status 0 when every step that ran succeeded (a skipped vLLM check is not a failure), 1 otherwise.

    python scripts/gpu_run.py                                  # on the GPU machine
    python scripts/gpu_run.py --vllm-model /models/SmolLM2-135M-Instruct
    python scripts/gpu_run.py --params P -S device=cpu --skip-vllm   # a CPU dry run (tests: tiny model)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = "configs/llm-gpu-10min.yaml"

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; matched
# against torch.cuda.get_device_name() in this order (the first key it contains).
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
    "L4": 121.0,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=DEFAULT_PARAMS, help="the preset to run")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--out-dir", type=Path, default=Path("outputs/gpu-run"), help="artefacts and the record")
    p.add_argument("--vllm-model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or folder")
    p.add_argument("--skip-vllm", action="store_true", help="do not run the vLLM check")
    p.add_argument("--throughput-pairs", type=int, default=4096, help="labelled pairs scored again, timed")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    args = p.parse_args(argv)
    if args.throughput_pairs < 1:
        p.error("--throughput-pairs must be at least 1")
    return args


def run_step(name: str, command: list[str], log_dir: Path) -> dict[str, Any]:
    """Run one command with its output in ``<log_dir>/<name>.log``; its seconds and exit status."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    print(f"[gpu_run] {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        rc = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    print(f"[gpu_run] {name}: exit {rc} after {seconds:.1f} s (log: {log})", flush=True)
    return {"command": command, "seconds": round(seconds, 2), "returncode": rc, "log": str(log)}


def vllm_check(args: argparse.Namespace) -> dict[str, Any]:
    """The existing check script, or why it was skipped."""
    if args.skip_vllm:
        return {"status": "skipped", "reason": "--skip-vllm"}
    if importlib.util.find_spec("vllm") is None:
        return {"status": "skipped", "reason": "vllm is not installed (see docs/distributed.md)"}
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device"}
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check_vllm.py"), "--model", args.vllm_model]
    step = run_step("vllm_check", command, args.out_dir / "logs")
    step["status"] = "matches" if step["returncode"] == 0 else "differs or failed"
    return step


def pipeline_commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The preset's stages as d2llm commands writing under ``--out-dir``."""
    out = args.out_dir
    base = [sys.executable, "-m", "d2llm.cli", "--params", args.params]
    for override in args.set:
        base += ["-S", override]
    prepared = str(out / "data" / "prepared")
    negatives, teacher = str(out / "negatives.parquet"), str(out / "teacher")
    labels, student, reports = str(out / "labels"), str(out / "student"), out / "reports"
    return [
        ("fetch-data", [*base, "fetch-data"]),
        ("prepare", [*base, "prepare", "--out-dir", prepared]),
        ("validate", [*base, "validate", "--prepared-dir", prepared,
                      "--report-dir", str(reports / "validation")]),
        ("mine", [*base, "mine", "--prepared-dir", prepared, "--out", negatives]),
        ("teacher-finetune", [*base, "teacher-finetune", "--prepared-dir", prepared, "--out-dir", teacher,
                              "--metrics", str(reports / "teacher_metrics.json")]),
        ("label", [*base, "label", "--negatives", negatives, "--teacher-dir", teacher, "--out-dir", labels]),
        ("train", [*base, "train", "--labels-dir", labels, "--prepared-dir", prepared, "--out-dir", student,
                   "--metrics", str(reports / "train_metrics.json"), "--plots-dir", str(reports / "plots"),
                   "--no-resume"]),
    ]  # fmt: skip


def load_run_params(args: argparse.Namespace) -> Any:
    """The preset with its overrides, read as the d2llm command reads them (``-S key=value``)."""
    from d2llm.cli import parse_override
    from d2llm.config import load_params

    return load_params(args.params, overrides=dict(parse_override(item) for item in args.set) or None)


def peak_tflops(device_name: str | None, override: float | None) -> float | None:
    if override is not None:
        return override
    if device_name is None:
        return None
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)


def labelling_throughput(args: argparse.Namespace, params: Any) -> dict[str, Any]:
    """Score labelled pairs again with the labelling teacher, timed alone (see the module doc)."""
    import torch

    from d2llm.labelling.scoring import load_scoring_teacher
    from d2llm.labelling.shards import read_groups
    from d2llm.teachers.factory import load_teacher

    groups = read_groups(args.out_dir / "labels")
    by_task: dict[str, list[tuple[str, str]]] = {}
    for row in groups.itertuples():
        for i, anchor in enumerate(row.anchors):
            for candidate in [row.positives[i], *row.negatives[i]]:
                by_task.setdefault(row.task, []).append((anchor, candidate))
    total = sum(len(p) for p in by_task.values())
    share = min(1.0, args.throughput_pairs / total)
    pairs = {task: p[: max(1, round(len(p) * share))] for task, p in by_task.items()}

    # The parameter count from the HF teacher (the vLLM engine keeps its weights to itself).
    hf = load_teacher(params.teacher, args.out_dir / "teacher", params.device)
    n_params = sum(p.numel() for m in hf.modules() for p in m.parameters())
    tokens = sum(len(e["input_ids"]) for task, p in pairs.items() for e in hf.encode_pairs(p, task))
    del hf
    teacher = load_scoring_teacher(params, args.out_dir / "teacher")
    cuda = teacher.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for task, p in pairs.items():
        teacher.score(p, task, with_features=True, show_progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = sum(len(p) for p in pairs.values())
    flops = 2.0 * n_params * tokens / seconds
    device_name = torch.cuda.get_device_name() if cuda else None
    peak = peak_tflops(device_name, args.peak_tflops)
    return {
        "pairs": n,
        "tokens": tokens,
        "seconds": seconds,
        "pairs_per_second": n / seconds,
        "tokens_per_second": tokens / seconds,
        "parameters": n_params,
        "model_tflops_per_second": flops / 1e12,
        "device": device_name or str(teacher.device),
        "bf16_peak_tflops": peak,
        "share_of_bf16_peak": None if peak is None else flops / (peak * 1e12),
        "scoring": teacher.scoring_info(),
    }


def training_throughput(report: dict[str, Any]) -> dict[str, Any]:
    steps, seconds = report["steps"], report["seconds"]
    return {"steps": steps, "seconds": seconds, "steps_per_second": steps / seconds if seconds else None}


def dev_table(teacher_report: dict[str, Any], dev_curve: list[dict[str, Any]], best_step: int) -> list[dict]:
    """Rows per dev set: bi-encoder, raw teacher, fused teacher, student at its best dev step."""
    best = next((p for p in dev_curve if p["step"] == best_step), {})
    raw, fused = teacher_report.get("dev_after") or {}, teacher_report.get("dev_fused") or {}
    base = teacher_report.get("dev_baseline") or {}
    keys = [k for k in base if k != "main"]
    student_keys = [k.removeprefix("dev/") for k in best if k.startswith("dev/")]
    keys += [k for k in student_keys if k not in keys]
    return [
        {"dev set": key, "bi-encoder": base.get(key), "teacher (raw)": raw.get(key),
         "teacher (fused)": fused.get(key), "student": best.get(f"dev/{key}")}
        for key in keys
    ]  # fmt: skip


def markdown(record: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [f"# GPU run: {record['params']} on {record.get('device', '?')}", ""]
    lines += ["| step | seconds | exit |", "|---|---|---|"]
    lines += [f"| {n} | {s['seconds']:.1f} | {s['returncode']} |" for n, s in record["steps"].items()]
    check = record["vllm_check"]
    lines += ["", f"vLLM check: {check['status']}" + (f" ({check['reason']})" if "reason" in check else "")]
    lab, tr = record.get("labelling"), record.get("training")
    if lab:
        share = lab["share_of_bf16_peak"]
        lines += [
            f"Labelling: {lab['pairs_per_second']:.1f} pairs/s, {lab['tokens_per_second']:.0f} tokens/s, "
            f"{lab['model_tflops_per_second']:.2f} model TFLOP/s"
            + ("" if share is None else f" = {100 * share:.1f}% of the {lab['bf16_peak_tflops']} bf16 peak")
            + f" ({lab['pairs']} pairs, {lab['parameters'] / 1e6:.0f}M parameters)"
        ]
    if tr:
        rate = cell(tr["steps_per_second"])
        lines += [f"Distillation: {tr['steps']} steps in {tr['seconds']:.1f} s = {rate} steps/s"]
    if record.get("dev_table"):
        cols = list(record["dev_table"][0])
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in record["dev_table"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from d2llm.errors import D2LLMError

    try:
        params = load_run_params(args)  # a bad preset or override fails here, before any work
    except (D2LLMError, argparse.ArgumentTypeError) as err:
        print(f"gpu_run: {err}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"params": args.params, "overrides": args.set, "device": params.device}
    record["vllm_check"] = vllm_check(args)
    record["steps"] = {}
    ok = record["vllm_check"].get("returncode", 0) == 0
    for name, command in pipeline_commands(args):
        if name == "train" and (args.out_dir / "student").exists():
            shutil.rmtree(args.out_dir / "student")  # a fresh student: steps/s of a whole run
        step = record["steps"][name] = run_step(name, command, args.out_dir / "logs")
        if step["returncode"] != 0:
            ok = False
            break
    if ok:
        reports = args.out_dir / "reports"
        teacher_report = json.loads((reports / "teacher_metrics.json").read_text(encoding="utf-8"))
        train_report = json.loads((reports / "train_metrics.json").read_text(encoding="utf-8"))
        curve = json.loads((reports / "plots" / "dev_metric.json").read_text(encoding="utf-8"))
        record["labelling"] = labelling_throughput(args, params)
        record["device"] = record["labelling"]["device"]
        record["training"] = training_throughput(train_report)
        record["dev_table"] = dev_table(teacher_report, curve, train_report["best_step"])
    (args.out_dir / "gpu_run.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    text = markdown(record)
    (args.out_dir / "gpu_run.md").write_text(text, encoding="utf-8")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
