"""vLLM as the scoring engine of a causal-LM teacher (``labelling.engine: vllm``; GPU).

The prompts, their token ids and the answer tokens are the HF teacher's (CausalLMTeacher, whose
prompt code this class inherits); only the forward pass moves to vLLM, in two engines:
- the yes/no logits: one generated token with ``SamplingParams(max_tokens=1,
  logprob_token_ids=[yes, no])`` on an engine made with ``logprobs_mode="raw_logits"``, so the
  two values are the raw next-token logits ``[z_yes, z_no]`` (not log-softmax over the vocabulary);
- the features (the last hidden state at the last prompt token, for the FI loss): a pooling run
  (``runner="pooling"``, ``convert="embed"``) with LAST pooling and no normalisation.
Prompts go in as token ids (``TokensPrompt``): vLLM never re-tokenises them.

vLLM cannot share d2llm's environment (it pins its own torch and fastapi); run labelling with
it as a Ray job (d2llm.labelling.ray_job, docs/distributed.md). It is imported here only, lazily.
Whether its numbers equal the HF path's is checked on a GPU by scripts/gpu_check_vllm.py.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm.errors import ModelError
from d2llm.teachers.base import Pair, TaskKind, Teacher, TeacherOutput, WeightsKind, saved_config
from d2llm.teachers.causal_lm import ADAPTER_DIR, MODEL_DIR, CausalLMTeacher

if TYPE_CHECKING:
    import torch

    from d2llm.config import Params, TeacherConfig, VLLMEngineConfig

log = logging.getLogger(__name__)

# Room above teacher.max_length: encode_pair may keep a few tokens more rather than cut the template.
_LENGTH_SLACK = 8


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise ModelError(
            "labelling.engine is 'vllm' but vLLM is not installed in this environment. It cannot share "
            "d2llm's environment: run the labelling as a Ray job in an environment that has it "
            "(labelling.job.enabled: true, labelling.job.pip: ['vllm==...']; docs/distributed.md)"
        ) from None
    return vllm


def model_folders(
    cfg: TeacherConfig, teacher_dir: str | Path, weights: WeightsKind, scratch: Path
) -> tuple[str, str]:
    """The model and tokenizer folders (or hub id) vLLM loads for a saved causal-LM teacher.

    Full weights are read where they are saved; a LoRA teacher is merged into its base model
    once, into ``scratch`` (vLLM's pooling runner takes no adapters); a reference teacher is its
    base model.
    """
    from d2llm.hub import resolve_model_ref

    if cfg.kind != "causal_lm":
        raise ModelError(f"the vLLM engine scores causal-LM teachers only; this teacher is {cfg.kind!r}")
    if cfg.gguf_file:
        raise ModelError("the vLLM engine does not read GGUF teachers: use labelling.engine: hf")
    teacher_dir = Path(teacher_dir)
    if weights == "full":
        return str(teacher_dir / MODEL_DIR), str(teacher_dir)
    base = resolve_model_ref(cfg.model)
    if weights == "reference":
        return base, base
    from peft import PeftModel

    from d2llm.hub import load_pretrained, load_tokenizer

    log.info("merging the teacher's LoRA adapter into its base model for vLLM (%s)", scratch)
    lm = load_pretrained("AutoModelForCausalLM", cfg.model, None, cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(lm, str(teacher_dir / ADAPTER_DIR)).merge_and_unload()
    merged.save_pretrained(scratch)
    load_tokenizer(cfg.model, None, cfg.trust_remote_code).save_pretrained(scratch)
    return str(scratch), str(scratch)


def engine_arguments(
    cfg: TeacherConfig, engine: VLLMEngineConfig, model: str, tokenizer: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments of ``vllm.LLM`` for the logits engine and for the hidden-state engine."""
    common = {
        "model": model,
        "tokenizer": tokenizer,
        "dtype": engine.dtype,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "max_model_len": engine.max_model_len or cfg.max_length + _LENGTH_SLACK,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "enforce_eager": engine.enforce_eager,
        "trust_remote_code": cfg.trust_remote_code,
        "seed": 0,
    }
    logits = {**common, "logprobs_mode": "raw_logits"}
    pooling = {
        **common,
        "runner": "pooling",
        "convert": "embed",
        "pooler_config": {"pooling_type": "LAST", "normalize": False},
    }
    return logits, pooling


class VLLMTeacher(CausalLMTeacher):
    """A causal-LM teacher whose forward passes run in vLLM; prompts as in CausalLMTeacher."""

    def __init__(
        self, cfg: TeacherConfig, tokenizer: Any, engine: VLLMEngineConfig, model: str, tokenizer_dir: str
    ) -> None:
        import torch

        vllm = import_vllm()
        Teacher.__init__(self, cfg, tokenizer, torch.device("cuda"))
        self.lm = None
        self.peft_model = None
        self._set_up_prompts()
        self.engine_cfg = engine
        self.vllm_version = vllm.__version__
        logits_args, pooling_args = engine_arguments(cfg, engine, model, tokenizer_dir)
        from vllm.config import PoolerConfig

        pooling_args["pooler_config"] = PoolerConfig(**pooling_args["pooler_config"])
        self.generator = vllm.LLM(**logits_args)
        self.pooler = vllm.LLM(**pooling_args)
        try:
            self.sampling = vllm.SamplingParams(
                max_tokens=1, temperature=0.0, logprob_token_ids=[self.yes_id, self.no_id]
            )
        except TypeError:
            raise ModelError(
                f"vLLM {vllm.__version__} has no SamplingParams.logprob_token_ids: install a newer vLLM"
            ) from None

    def modules(self) -> list[torch.nn.Module]:
        return []  # the weights live in the vLLM engines

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise ModelError("the vLLM teacher scores through score(); it has no differentiable forward")

    def _save_weights(self, out_dir: Path) -> WeightsKind:
        raise ModelError("a vLLM-scored teacher is saved by the HF teacher it was loaded from")

    def score(
        self,
        pairs: Sequence[Pair],
        task: TaskKind,
        with_features: bool = False,
        show_progress: bool | None = None,
    ) -> TeacherOutput:
        import torch
        from vllm.inputs import TokensPrompt

        if task not in ("sym", "asym"):
            raise ValueError(f"task must be 'sym' or 'asym', got {task!r}")
        if not pairs:
            return TeacherOutput(torch.empty((0, 2)), torch.empty((0, 0)) if with_features else None)
        prompts = [TokensPrompt(prompt_token_ids=e["input_ids"]) for e in self.encode_pairs(pairs, task)]
        outputs = self.generator.generate(prompts, self.sampling, use_tqdm=bool(show_progress))
        logits = torch.tensor([self._answer_logits(o) for o in outputs], dtype=torch.float32)
        features = None
        if with_features:
            pooled = self.pooler.embed(prompts, use_tqdm=bool(show_progress))
            features = torch.tensor([o.outputs.embedding for o in pooled], dtype=torch.float32)
        return TeacherOutput(logits, features)

    def _answer_logits(self, output: Any) -> list[float]:
        step = output.outputs[0].logprobs[0]  # token id -> Logprob of the one generated position
        missing = [t for t in (self.yes_id, self.no_id) if t not in step]
        if missing:
            raise ModelError(f"vLLM returned no logit for answer token(s) {missing}: {sorted(step)[:10]}")
        return [step[self.yes_id].logprob, step[self.no_id].logprob]

    def scoring_info(self) -> dict[str, str]:
        return {"engine": "vllm", "version": f"vllm {self.vllm_version}", "dtype": self.engine_cfg.dtype}


def load_vllm_teacher(params: Params, teacher_dir: str | Path) -> VLLMTeacher:
    """The saved causal-LM teacher at ``teacher_dir`` on vLLM (``labelling.vllm`` settings)."""
    from d2llm.hub import load_tokenizer

    import_vllm()  # fail before any merging when vLLM is missing
    cfg, weights = saved_config(params.teacher, teacher_dir)
    scratch = Path(tempfile.mkdtemp(prefix="d2llm-vllm-teacher-"))
    model, tokenizer_dir = model_folders(cfg, teacher_dir, weights, scratch)
    tokenizer = load_tokenizer(tokenizer_dir, None, cfg.trust_remote_code)
    return VLLMTeacher(cfg, tokenizer, params.labelling.vllm, model, tokenizer_dir)
