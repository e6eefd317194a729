"""The three systems of the paper side by side (plus BM25 for IR), on the same test data.

- ``bi-encoder``: the backbone as a plain bi-encoder (mean pooling of the last hidden state,
  cosine). This is where the student starts from: the floor.
- ``teacher``: the cross-encoder / LLM judge, score = probability of "yes". The ceiling, but
  one joint forward pass per (query, candidate). For IR it re-ranks the top
  ``teacher_rerank_depth`` documents of ``teacher_first_stage`` (BM25 or the bi-encoder) per
  query, reading each whole document at its own ``teacher.max_length``: scoring the whole
  corpus per query is exactly the cost D2LLM exists to avoid, and re-ranking a first stage is
  how a cross-encoder is deployed.
- ``student``: the D2LLM student, score = IEM logit; for IR it is the shipped search itself: an
  index built by ``d2llm.search.build_index`` and ``search`` as configured (``search.mode``,
  first stage, re-rank depth, passages, ``search.aggregation``).
- ``bm25``: lexical baseline, IR only.

IR rows read documents as the shipped search does (``PassageCorpus``): split into passages of
the student's window (``search.passage_window`` / ``passage_stride``), each passage scored on its
own, a document by ``search.aggregation`` over its passages; BM25 and the bi-encoder rank the
same passages.

``evaluate_systems`` reads test splits and IR queries/qrels; nothing else in the project reads
them. Every number lands in one JSON file together with the data it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from d2llm.biencoder import MeanPoolEncoder, pair_cosines
from d2llm.data.tables import load_pairs, table_family
from d2llm.errors import ArtifactError
from d2llm.evaluation import metrics as M
from d2llm.evaluation import significance as S
from d2llm.evaluation.dev import DevSet, dataset_metric, sample_rows
from d2llm.evaluation.parts import EvaluationParts
from d2llm.jsonfile import write_json
from d2llm.passages import PassageSpans, passage_window, split_passages
from d2llm.search import Aggregation, Bm25Ranker, encode_corpus, rank_documents, standardised, top_k_positions
from d2llm.teachers.base import probabilities
from d2llm.teachers.factory import load_teacher
from d2llm.teachers.fusion import FusedScorer

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from d2llm.config import Family, Params, ScoringKey, SearchConfig, TaskKind

log = logging.getLogger(__name__)

Ranking = list[list[tuple[int, float]]]  # per query: (corpus position, score), best first
SYSTEM_ORDER = ("bm25", "bi-encoder", "teacher", "teacher-raw", "student")
IR_TABLE_NAMES = ("corpus", "queries", "qrels")
IR_DEPTH = 100  # ranked documents kept per query: enough for R@100
BASELINE = "bi-encoder"  # what every other system's gain is measured against
RECOVERY_MIN_GAIN = 1.0  # points: the student's share of a smaller teacher gain is not reported
PAIR_UNIT = "text_a"  # a pair-level bootstrap draws first texts, each with all of its pairs


@runtime_checkable
class PairScorer(Protocol):
    """Scores text pairs: higher means "more similar / more relevant / entailed".

    ``task`` is what ``scoring_key_for`` gives the system: a task kind, or a family for the student.
    """

    name: str

    def score_pairs(self, text_a: Sequence[str], text_b: Sequence[str], task: ScoringKey) -> np.ndarray: ...


@runtime_checkable
class Retriever(Protocol):
    """Ranks a collection's documents for each query; the top ``depth`` (document position, score)."""

    name: str

    def rank(self, queries: Sequence[str], corpus: PassageCorpus, depth: int) -> Ranking: ...


@dataclass(frozen=True)
class PassageCorpus:
    """An IR collection as the shipped search reads it: each document split into passages of the
    student's window (d2llm.passages), scored passage by passage, ranked by ``aggregation``."""

    doc_ids: list[str]
    docs: list[str]
    spans: PassageSpans
    aggregation: Aggregation = "best"
    first_weight: float = 0.5
    scheme: dict[str, int] | None = None  # window and stride, in the student's tokens

    @cached_property
    def passages(self) -> list[str]:
        return self.spans.texts(self.docs)

    @classmethod
    def split(cls, doc_ids: list[str], docs: list[str], tokenizer: Any, max_length: int, cfg: SearchConfig):
        """``docs`` cut as ``d2llm.search.build_index`` cuts them (``search.passage_*``)."""
        window = passage_window(tokenizer, max_length, cfg.passage_window)
        stride = cfg.passage_stride if cfg.passage_stride is not None else max(1, window * 3 // 4)
        spans = split_passages(docs, tokenizer, window, stride)
        scheme = {"window": window, "stride": stride}
        return cls(doc_ids, docs, spans, cfg.aggregation, cfg.first_weight, scheme)

    def rank(self, passage_scores: np.ndarray, depth: int) -> list[tuple[int, float]]:
        """Documents by their passages' scores (one score per passage), best first."""
        positions = np.arange(len(self.spans))
        shown, scores = rank_documents(
            positions, np.asarray(passage_scores), self.spans, depth, self.aggregation, self.first_weight
        )
        return [(int(self.spans.doc[p]), float(v)) for p, v in zip(shown, scores, strict=True)]

    def document_scores(self, passage_scores: np.ndarray) -> np.ndarray:
        """Every document's aggregated score (document order)."""
        ranked = self.rank(passage_scores, len(self.docs))
        out = np.empty(len(self.docs), dtype=np.float64)
        for doc, score in ranked:
            out[doc] = score
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "passages": len(self.spans),
            "scheme": self.scheme,
            "aggregation": self.aggregation,
            **({"first_weight": self.first_weight} if self.aggregation == "blend" else {}),
        }


# --------------------------------------------------------------------------- systems


class BiEncoderBaseline(MeanPoolEncoder):
    """The backbone as a plain bi-encoder: mean pooling over the last hidden state, cosine.

    It remembers the vector of every text it encoded: the teacher's fusion mixes in this same
    bi-encoder (``load_systems`` hands it over), so the pairs both score, and SICK's sentences
    under SICK-R's labels, are encoded once per evaluation. So it is no model of a served
    bi-encoder's cost: a query seen before costs nothing (benchmarks time ``MeanPoolEncoder``).
    """

    name = "bi-encoder"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._vectors: dict[str, torch.Tensor] = {}

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> torch.Tensor:
        import torch

        new = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if new:
            self._vectors.update(zip(new, super().encode(new, show_progress=show_progress), strict=True))
        if not texts:
            return super().encode(texts)
        return torch.stack([self._vectors[t] for t in texts])

    def score_pairs(self, text_a: Sequence[str], text_b: Sequence[str], task: ScoringKey) -> np.ndarray:
        # Cosine has no task branches: the same score serves sym and asym.
        return pair_cosines(self, list(zip(text_a, text_b, strict=True)), show_progress=True)

    def passage_cosines(self, queries: Sequence[str], corpus: PassageCorpus) -> np.ndarray:
        """``[Q, P]`` cosine of each query with each passage (unit vectors: a dot product)."""
        passages = self.encode(corpus.passages, show_progress=True)
        return (self.encode(queries) @ passages.T).numpy()

    def rank(self, queries: Sequence[str], corpus: PassageCorpus, depth: int) -> Ranking:
        return [corpus.rank(row, depth) for row in self.passage_cosines(queries, corpus)]


class StudentScorer:
    """The D2LLM student: IEM logits on PMA vectors; IR ranks the full corpus on cached passages."""

    name = "student"

    def __init__(
        self,
        student: Any,
        batch_size: int = 64,
        chunk_size: int = 4096,
        search_cfg: SearchConfig | None = None,
    ):
        from d2llm.config import SearchConfig

        self.student = student
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.search_cfg = search_cfg or SearchConfig()

    def _encode(self, texts: Sequence[str]) -> torch.Tensor:
        vectors, _ = encode_corpus(self.student, texts, self.batch_size, desc="student encode")
        return vectors

    def score_pairs(self, text_a: Sequence[str], text_b: Sequence[str], task: ScoringKey) -> np.ndarray:
        import torch

        # Each distinct text once: SICK's 9 854 sides are 5 007 sentences, a question repeats
        # for each of its candidate answers.
        texts = list(dict.fromkeys([*text_a, *text_b]))
        row = {text: i for i, text in enumerate(texts)}
        vectors = self._encode(texts)
        e_a, e_b = vectors[[row[t] for t in text_a]], vectors[[row[t] for t in text_b]]
        with torch.inference_mode():
            return self.student.score_vectors(e_a, e_b, task).reshape(-1).float().cpu().numpy()

    def rank(self, queries: Sequence[str], corpus: PassageCorpus, depth: int) -> Ranking:
        """The shipped search: an index of ``corpus`` (``build_index``, in a temporary folder) and
        ``search`` per query with the ``search.*`` settings it was built for."""
        with tempfile.TemporaryDirectory(prefix="d2llm-eval-index-") as tmp:
            return self.rank_index(self.index(corpus, tmp), queries, depth)

    def index(self, corpus: PassageCorpus, out_dir: str | Path) -> Any:
        """``corpus`` indexed as ``d2llm index`` indexes it (``search.*`` passages)."""
        import pandas as pd

        from d2llm.search import build_index

        frame = pd.DataFrame({"doc_id": corpus.doc_ids, "text": corpus.docs})
        return build_index(self.student, frame, out_dir, "evaluation", self.batch_size, self.search_cfg)

    def rank_index(
        self, index: Any, queries: Sequence[str], depth: int, cfg: SearchConfig | None = None
    ) -> Ranking:
        """``search`` per query on ``index`` with ``cfg`` (default: ``search_cfg``).

        Two-stage search returns the first stage's top ``search.rerank_depth`` documents
        re-ranked; when that is fewer than ``depth``, the first stage's next documents follow in
        its own order, as the teacher's ranking does, so that R@100 reads equally deep lists.
        """
        from tqdm.auto import tqdm

        from d2llm.search import search

        cfg = cfg or self.search_cfg
        reranked = depth if cfg.mode == "full" else min(depth, cfg.rerank_depth)
        position = {doc_id: i for i, doc_id in enumerate(index.doc_ids)}
        ranking = []
        for query in tqdm(queries, desc=f"student search ({cfg.mode})", leave=False):
            hits = search(
                self.student, index, query, reranked, cfg.mode, cfg.first_stage, cfg.rerank_depth,
                self.chunk_size, cfg.aggregation, cfg.first_weight, cfg.lexical_weight,
            )  # fmt: skip
            row = [(position[hit.doc_id], hit.score) for hit in hits]
            if len(row) < depth:
                row += self._first_stage_tail(index, query, cfg, depth, {doc for doc, _ in row})
            ranking.append(row)
        return ranking

    def _first_stage_tail(
        self, index: Any, query: str, cfg: SearchConfig, depth: int, shown: set[int]
    ) -> list[tuple[int, float]]:
        """The first stage's documents after the re-ranked ones, in its order, scored below them."""
        from d2llm.search import encode_query, first_stage_documents

        e_q = encode_query(self.student, query)
        docs = first_stage_documents(index, query, e_q, cfg.first_stage, depth)
        tail = [int(d) for d in docs if int(d) not in shown][: depth - len(shown)]
        return [(d, -1e9 - i) for i, d in enumerate(tail)]

    def protocol(self) -> str:
        cfg = self.search_cfg
        scorer = "the IEM" if not cfg.lexical_weight else f"z(IEM) + {cfg.lexical_weight:g} z(BM25)"
        if cfg.mode == "full":
            return f"the shipped search, {scorer} over every passage"
        return (
            f"the shipped search, {cfg.first_stage} first stage top {cfg.rerank_depth} documents "
            f"re-ranked by {scorer} over all their passages; the first stage's next documents follow "
            f"to depth {IR_DEPTH}"
        )


class TeacherScorer:
    """The teacher, score = probability of yes; for IR it re-ranks the top ``rerank_depth`` of a
    first stage (``first_stage``: any system with ``rank``; BM25 when None).

    With ``fusion`` (``teacher.fusion: biencoder``) the score is the teacher fused with the
    bi-encoder, with the weights of the dataset set by :meth:`for_dataset`: the very scores the
    student was distilled from. Views of one teacher share a memo of its raw logits, so the
    fused teacher and the raw one (``teacher-raw``) cost one pass over each dataset.
    """

    name = "teacher"

    def __init__(
        self,
        teacher: Any,
        temperature: float = 1.0,
        rerank_depth: int = 100,
        fusion: FusedScorer | None = None,
        name: str = "teacher",
        first_stage: Any = None,
        ir_fusion_weight: float | None = None,
    ):
        self.teacher = teacher
        self.ir_fusion_weight = ir_fusion_weight  # evaluation.ir_fusion_weight (chosen on IR dev data)
        self.temperature = temperature
        self.rerank_depth = rerank_depth
        self.first_stage = first_stage if first_stage is not None else Bm25System()
        self.fusion = fusion
        self.name = name
        self.dataset = ""
        # Last raw scoring, shared by views: SICK and SICK-R are the same pairs under two labels.
        self._memo: dict[str, Any] = {}

    def for_dataset(self, dataset: str) -> TeacherScorer:
        view = copy.copy(self)  # shares teacher, fusion and memo
        view.dataset = dataset
        return view

    def _logits(self, pairs: list[tuple[str, str]], task: TaskKind) -> torch.Tensor:
        key = (task, tuple(pairs))
        if self._memo.get("key") != key:
            logits = self.teacher.score(pairs, task, show_progress=True).logits
            self._memo.update(key=key, logits=logits)
        return self._memo["logits"]

    def score_pairs(self, text_a: Sequence[str], text_b: Sequence[str], task: TaskKind) -> np.ndarray:
        pairs = list(zip(text_a, text_b, strict=True))
        logits = self._logits(pairs, task)
        if self.fusion is not None:
            logits = self.fusion.logits(pairs, logits, self.dataset, task)
        return probabilities(logits, self.temperature).numpy()

    def protocol(self, depth: int) -> str:
        """What :meth:`rank` does for a ranking ``depth`` deep, in words (``teacher_protocol``)."""
        first = "BM25" if self.first_stage.name == "bm25" else self.first_stage.name
        words = f"re-ranks {first} top {self.rerank_depth} per query"
        if self.rerank_depth < depth:
            words += f"; {first} ranks {self.rerank_depth + 1}-{depth} follow in its order"
        return words

    def rank(self, queries: Sequence[str], corpus: PassageCorpus, depth: int) -> Ranking:
        """The first stage's top ``rerank_depth`` documents re-ranked by the teacher, then the rest
        of the first stage's top ``depth`` in its own order (scored below every re-ranked
        document), so that deep metrics (R@100) see a ranking as deep as the other systems'.

        The teacher reads each candidate document whole, up to its own ``max_length``; fused,
        its log-odds are mixed with the bi-encoder's score of that document (its passages'
        cosines aggregated as the bi-encoder ranks them).
        """
        hits = self.first_stage.rank(queries, corpus, max(depth, self.rerank_depth))
        candidates = [[doc for doc, _ in row[: self.rerank_depth]] for row in hits]
        # One scoring call over all (query, candidate) pairs: the teacher batches them by length.
        pairs = [(q, corpus.docs[d]) for q, cand in zip(queries, candidates, strict=True) for d in cand]
        logits = self._logits(pairs, "asym")
        if self.fusion is not None:
            logits = self._fused_documents(queries, corpus, candidates, logits)
        scores = probabilities(logits, self.temperature).numpy()
        ranking, start = [], 0
        for cand, row in zip(candidates, hits, strict=True):
            s = scores[start : start + len(cand)]
            start += len(cand)
            head = [(int(cand[i]), float(s[i])) for i in top_k_positions(s, depth)]
            # Teacher scores are probabilities (>= 0): the tail keeps its order below them.
            tail = [(int(d), -1.0 - i) for i, (d, _) in enumerate(row[len(cand) : depth])]
            ranking.append(head + tail)
        return ranking

    def _fused_documents(
        self, queries: Sequence[str], corpus: PassageCorpus, candidates: list[list[int]], logits: torch.Tensor
    ) -> torch.Tensor:
        """The teacher's logits of the candidate documents fused with the bi-encoder's document
        scores, at the weights of this dataset (or, for an IR collection without its own, the
        IR weight: ``FusedScorer.for_dataset``)."""
        encoder = self.fusion.encoder  # type: ignore[union-attr]
        if not isinstance(encoder, BiEncoderBaseline):
            raise ArtifactError("the IR fusion needs the evaluation's bi-encoder (load_systems gives it)")
        weights = self.fusion.for_dataset(self.dataset, "asym")  # type: ignore[union-attr]
        if self.ir_fusion_weight is not None and self.dataset not in self.fusion.by_dataset:  # type: ignore[union-attr]
            weights = dataclasses.replace(weights, weight=self.ir_fusion_weight)
        cosines = encoder.passage_cosines(queries, corpus)
        doc_cos = np.concatenate(
            [corpus.document_scores(row)[cand] for row, cand in zip(cosines, candidates, strict=True)]
        )
        return weights.logits(logits, doc_cos)


def scoring_key_for(system: Any, task: TaskKind, family: Family) -> ScoringKey:
    """What ``system.score_pairs`` is asked to score with: for the student the IEM branch of the
    family (one per family with ``student.iem.branches: family``, else sym/asym), the task kind
    (prompt) for every other system. Scores are reused for the same pairs under the same key."""
    if isinstance(system, StudentScorer):
        iem = getattr(system.student, "iem", None)
        return iem.branch_for(family) if iem is not None else family
    return task


class Bm25System:
    name = "bm25"

    def rank(self, queries: Sequence[str], corpus: PassageCorpus, depth: int) -> Ranking:
        bm25 = Bm25Ranker.build(corpus.passages)  # the passages the other systems rank, not whole documents
        return [corpus.rank(bm25.scores(q), depth) for q in queries]


# --------------------------------------------------------------------------- loading


def load_systems(
    params: Params, teacher_dir: str | Path | None, student_dir: str | Path | None
) -> tuple[dict[str, Any], list[str]]:
    """The systems to compare, and notes on those skipped (missing folder, or turned off)."""
    ev = params.evaluation
    notes: list[str] = []
    systems: dict[str, Any] = {"bm25": Bm25System()}
    systems["bi-encoder"] = BiEncoderBaseline.from_ref(
        params.student.backbone,
        params.student.gguf_file,
        params.student.trust_remote_code,
        max_length=params.student.max_length,
        batch_size=ev.batch_size,
        device=params.device,
        cpu_bf16=params.student.cpu_bf16,
    )
    if not ev.include_teacher:
        notes.append("teacher skipped: evaluation.include_teacher is false")
    elif teacher_dir is None or not Path(teacher_dir).is_dir():
        notes.append(f"teacher skipped: no saved teacher at {teacher_dir}")
    else:
        teacher = load_teacher(params.teacher, teacher_dir, params.device).quantize(ev.teacher_quantization)
        if ev.teacher_quantization != "none":
            notes.append(f"teacher scored in {ev.teacher_quantization} (as labelling), not float32")
        fusion = FusedScorer.load(params, teacher_dir, required=False)
        if fusion is not None:
            fusion.encoder = systems["bi-encoder"]  # the same model: share its vectors
        # teacher_first_stage names one of the systems above ("bm25" or "bi-encoder").
        first_stage = systems[ev.teacher_first_stage]
        scorer = TeacherScorer(
            teacher,
            params.teacher.temperature,
            ev.teacher_rerank_depth,
            fusion,
            first_stage=first_stage,
            ir_fusion_weight=ev.ir_fusion_weight,
        )
        systems["teacher"] = scorer
        if fusion is None and params.teacher.fusion != "none":
            notes.append(f"teacher scored alone: the teacher in {teacher_dir} has no fusion weights")
        if fusion is not None:
            # The raw teacher too, from the same forward passes: what the fusion adds is visible.
            raw = copy.copy(scorer)
            raw.fusion, raw.name = None, "teacher-raw"
            systems["teacher-raw"] = raw
            notes.append(
                "teacher = the teacher fused with the bi-encoder (weights chosen per dataset on dev)"
            )
    if student_dir is None or not Path(student_dir).is_dir():
        notes.append(f"student skipped: no saved student at {student_dir}")
    else:
        systems["student"] = load_student_scorer(params, student_dir)
    return systems, notes


def load_student_scorer(
    params: Params, student_dir: str | Path, search_cfg: SearchConfig | None = None
) -> StudentScorer:
    """The saved student (LoRA merged) as a scorer, searching with ``search_cfg`` (default:
    ``params.search``)."""
    from d2llm.hub import pick_device
    from d2llm.student.model import D2LLMStudent, inference_options

    if not Path(student_dir).is_dir():
        raise ArtifactError(f"no saved student at {student_dir}")
    student = D2LLMStudent.from_pretrained(
        student_dir, device=pick_device(params.device), merged=True, **inference_options(params.student)
    )
    search_cfg = search_cfg or params.search
    return StudentScorer(student, params.evaluation.batch_size, search_cfg.chunk_size, search_cfg)


# --------------------------------------------------------------------------- evaluation


def _read_table(path: Path, what: str) -> pd.DataFrame:
    import pandas as pd

    if not path.is_file():
        raise ArtifactError(f"{what} not found at {path}: run `d2llm prepare` first")
    return pd.read_parquet(path)


def evaluate_pair_dataset(
    name: str,
    pairs: pd.DataFrame,
    systems: dict[str, Any],
    max_pairs: int | None = None,
    seed: int = 0,
    memo: dict[Any, np.ndarray] | None = None,
    resamples: int = 0,
) -> dict[str, Any]:
    """Test-split metrics of every pair-scoring system on one dataset.

    Class datasets (a non-empty ``label_name``): AP and accuracy of ``is_positive`` (entailment
    vs the rest), the accuracy at each system's best threshold on the dataset's dev split
    (``accuracy_threshold``; with no usable dev split, the best threshold on the test pairs
    themselves, marked as an oracle); asym class datasets (answer selection, TREC-QA):
    MAP and MRR per question, and pooled AP. Score datasets: Spearman and Pearson with ``label``.
    ``memo`` (shared across datasets) reuses the scores of a system that saw the same pairs
    before: SICK and SICK-R are one set of pairs under two labels. The teacher keeps its own
    memo, since its fused score depends on the dataset. ``resamples`` > 0 adds each system's
    gain over the bi-encoder with a paired-bootstrap 95% interval (``vs_bi_encoder``).
    """
    test = sample_rows(pairs[pairs["split"] == "test"], max_pairs, seed)
    if test.empty:
        raise ArtifactError(f"dataset {name!r} has no test split to evaluate")
    tasks = test["task"].unique().tolist()
    if len(tasks) != 1:
        raise ArtifactError(f"dataset {name!r} mixes task kinds {tasks}; expected one")
    metric = dataset_metric(test)
    kind = {"ap": "pair_classification", "spearman": "sts", "map": "answer_selection"}[metric]
    entry: dict[str, Any] = {
        "kind": kind,
        "split": "test",
        "n_pairs": len(test),
        "task": tasks[0],
        "main_metric": metric,
        "metrics": {},
        "seconds": {},
    }
    family = table_family(test)
    thresholds: dict[str, float] = {}
    if kind == "pair_classification":
        entry["positive"] = "is_positive (entailment vs the rest)"
        dev = threshold_rows(pairs, max_pairs, seed)
        entry["accuracy_threshold"] = threshold_protocol(dev)
        if dev is not None:
            thresholds = dev_thresholds(name, dev, systems, tasks[0], family, memo)
    elif kind == "answer_selection":
        entry["protocol"] = "candidates ranked per question; MAP/MRR over questions with both labels"
    a, b = test["text_a"].tolist(), test["text_b"].tolist()
    scored: dict[str, np.ndarray] = {}
    for sys_name, system in _pair_scorers(systems, name):
        log.info("%s: scoring %d test pairs with %s", name, len(test), sys_name)
        start = time.perf_counter()
        scores = _scores(system, sys_name, a, b, scoring_key_for(system, tasks[0], family), memo)
        entry["seconds"][sys_name] = round(time.perf_counter() - start, 3)
        scored[sys_name] = scores
        if kind == "pair_classification":
            positive = test["is_positive"].to_numpy()
            entry["metrics"][sys_name] = M.pair_classification_metrics(
                scores, positive, thresholds.get(sys_name)
            )
        elif kind == "answer_selection":
            entry["metrics"][sys_name] = M.answer_selection_metrics(a, scores, test["is_positive"].to_numpy())
        else:
            entry["metrics"][sys_name] = M.sts_metrics(scores, test["label"].to_numpy())
    if resamples:
        entry["vs_bi_encoder"] = pair_comparisons(kind, metric, scored, test, resamples, seed)
    return entry


def _pair_scorers(systems: dict[str, Any], dataset: str) -> list[tuple[str, Any]]:
    """The systems that score pairs, in order; the teacher as its view for ``dataset``."""
    return [
        (name, system.for_dataset(dataset) if isinstance(system, TeacherScorer) else system)
        for name, system in systems.items()
        if isinstance(system, PairScorer)
    ]


def _scores(
    system: Any,
    sys_name: str,
    a: list[str],
    b: list[str],
    key: ScoringKey,
    memo: dict[Any, np.ndarray] | None,
) -> np.ndarray:
    """``system``'s scores of the pairs (a, b) under ``key``, from ``memo`` when it has them. Not
    the teacher's: its fused scores depend on the dataset (it keeps its own memo of raw logits)."""
    memo_key = (sys_name, key, tuple(a), tuple(b))
    if memo is not None and not isinstance(system, TeacherScorer) and memo_key in memo:
        return memo[memo_key]
    scores = system.score_pairs(a, b, key)
    if memo is not None:
        memo[memo_key] = scores
    return scores


def threshold_rows(pairs: pd.DataFrame, max_pairs: int | None, seed: int) -> pd.DataFrame | None:
    """The dev pairs an accuracy threshold is chosen on (sampled like the test pairs), or None
    when the dataset has no dev split with both classes: its accuracy is then an oracle."""
    dev = sample_rows(pairs[pairs["split"] == "dev"], max_pairs, seed)
    if dev.empty or dev["is_positive"].all() or not dev["is_positive"].any():
        return None
    return dev


def threshold_protocol(dev: pd.DataFrame | None) -> dict[str, Any]:
    """Where the accuracy thresholds come from (``accuracy_threshold`` in the JSON)."""
    if dev is None:
        return {"split": "test", "oracle": True, "why": "no dev split with both classes"}
    return {"split": "dev", "oracle": False, "n_pairs": len(dev)}


def dev_thresholds(
    name: str,
    dev: pd.DataFrame,
    systems: dict[str, Any],
    task: TaskKind,
    family: Family,
    memo: dict[Any, np.ndarray] | None,
) -> dict[str, float]:
    """Each pair scorer's accuracy threshold: its best one on the dev pairs ``dev``.

    Every system scores the dev pairs before any scores the test pairs: the teacher's memo keeps
    one scoring, shared by the fused and the raw teacher, so it ends on the test pairs, which
    SICK-R reuses after SICK.
    """
    a, b, positive = dev["text_a"].tolist(), dev["text_b"].tolist(), dev["is_positive"].to_numpy()
    out = {}
    for sys_name, system in _pair_scorers(systems, name):
        log.info("%s: scoring %d dev pairs with %s (accuracy threshold)", name, len(dev), sys_name)
        scores = _scores(system, sys_name, a, b, scoring_key_for(system, task, family), memo)
        out[sys_name] = M.best_threshold_accuracy(scores, positive)[1]
    return out


def pair_comparisons(
    kind: str, metric: str, scored: dict[str, np.ndarray], test: pd.DataFrame, resamples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Each system's gain over the bi-encoder on the main metric, with its bootstrap interval.

    Answer selection resamples questions (MAP is a mean over them); AP and Spearman are
    recomputed on each resample of the pairs' first texts (``text_a``: SICK's premises), each
    drawn with all of its pairs, which are not independent of each other (a cluster bootstrap,
    d2llm.evaluation.significance).
    """
    if BASELINE not in scored:
        return {}
    others = {name: scores for name, scores in scored.items() if name != BASELINE}
    if kind == "answer_selection":
        # MAP is a mean over questions: resample questions, comparing each one's AP.
        questions, positive = test["text_a"].tolist(), test["is_positive"].to_numpy()

        def question_ap(scores: np.ndarray) -> dict[str, float]:
            per_question, _ = M.answer_selection_per_question(questions, scores, positive)
            return {q: ap for q, (ap, _) in per_question.items()}

        base = question_ap(scored[BASELINE])
        return {
            name: S.bootstrap_unit_gain(question_ap(scores), base, "question", resamples, seed)
            for name, scores in others.items()
        }
    labels = test["is_positive" if kind == "pair_classification" else "label"].to_numpy()
    premises = test["text_a"].tolist()
    return {
        name: S.bootstrap_pair_metric_difference(
            S.pair_metric(metric), scores, scored[BASELINE], labels, resamples, seed, premises, PAIR_UNIT
        )
        for name, scores in others.items()
    }


def evaluate_ir_dataset(
    name: str,
    corpus: pd.DataFrame,
    queries: pd.DataFrame,
    qrels: pd.DataFrame,
    systems: dict[str, Any],
    max_queries: int | None = None,
    seed: int = 0,
    resamples: int = 0,
    passages: Any = None,
) -> dict[str, Any]:
    """nDCG@10, MRR@10 and R@100 of every retrieval system on one IR collection.

    Only queries with at least one relevant document are evaluated (the others are counted);
    each system ranks the whole corpus per query except the teacher (see the module docstring).
    ``passages(doc_ids, docs) -> PassageCorpus`` cuts the documents as the shipped search does
    (``ir_passages``); None reads each document as one passage.
    ``resamples`` > 0 adds each system's nDCG@10 gain over the bi-encoder with a paired-bootstrap
    95% interval over the queries (``vs_bi_encoder``).
    """
    all_queries = set(queries["query_id"].astype(str))
    judged = set(qrels.loc[qrels["relevance"] > 0, "query_id"].astype(str)) & all_queries
    eval_queries = sample_rows(queries[queries["query_id"].astype(str).isin(judged)], max_queries, seed)
    if eval_queries.empty:
        raise ArtifactError(f"IR dataset {name!r} has no query with a relevant document")
    qids = eval_queries["query_id"].astype(str).tolist()
    qtexts = eval_queries["text"].astype(str).tolist()
    doc_ids = corpus["doc_id"].astype(str).tolist()
    docs = corpus["text"].astype(str).tolist()
    collection = (
        passages(doc_ids, docs)
        if passages
        else PassageCorpus(doc_ids, docs, PassageSpans.one_per_document(docs))
    )
    wanted = set(qids)
    qrels_dict: dict[str, dict[str, int]] = {}
    for q, d, r in qrels[["query_id", "doc_id", "relevance"]].itertuples(index=False):
        if str(q) in wanted:
            qrels_dict.setdefault(str(q), {})[str(d)] = int(r)
    entry: dict[str, Any] = {
        "kind": "retrieval",
        "split": "test",
        "n_queries": len(qids),
        "n_queries_without_relevant": len(all_queries - judged),
        "n_docs": len(doc_ids),
        "documents": collection.describe(),
        "main_metric": "ndcg@10",
        "metrics": {},
        "seconds": {},
    }
    per_query: dict[str, dict[str, dict[str, float]]] = {}
    rankings: dict[str, Ranking] = {}
    for sys_name, system in systems.items():
        if not isinstance(system, Retriever):
            continue
        if isinstance(system, TeacherScorer):
            system = system.for_dataset(name)
        log.info("%s: ranking %d docs for %d queries with %s", name, len(docs), len(qids), sys_name)
        start = time.perf_counter()
        ranking = rankings[sys_name] = system.rank(qtexts, collection, IR_DEPTH)
        entry["seconds"][sys_name] = round(time.perf_counter() - start, 3)
        run = M.ranking_to_run(qids, doc_ids, ranking)
        per_query[sys_name], no_relevant = M.ir_per_query(qrels_dict, run)
        entry["metrics"][sys_name] = M.ir_summary(per_query[sys_name], no_relevant, run)
        if isinstance(system, TeacherScorer):
            entry["teacher_protocol"] = system.protocol(IR_DEPTH)
        if isinstance(system, StudentScorer):
            entry["student_protocol"] = system.protocol()
    if resamples and BASELINE in per_query:
        main = entry["main_metric"]
        base = {q: values[main] for q, values in per_query[BASELINE].items()}
        entry["vs_bi_encoder"] = {
            name: S.bootstrap_unit_gain(
                {q: v[main] for q, v in by_query.items()}, base, "query", resamples, seed
            )
            for name, by_query in per_query.items()
            if name != BASELINE
        }
    student, encoder = systems.get("student"), systems.get(BASELINE)
    if isinstance(student, StudentScorer) and isinstance(encoder, BiEncoderBaseline):
        entry["same_candidates"] = _same_candidates(
            student.search_cfg, encoder, collection, qids, qtexts, qrels_dict, rankings["student"],
            per_query["student"], entry["main_metric"], resamples, seed,
        )  # fmt: skip
    return entry


def _same_candidates(
    cfg: SearchConfig,
    encoder: BiEncoderBaseline,
    collection: PassageCorpus,
    qids: list[str],
    qtexts: list[str],
    qrels: dict[str, dict[str, int]],
    student_ranking: Ranking,
    student_per_query: dict[str, dict[str, float]],
    main: str,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """The bi-encoder re-ranking the documents the student's first stage kept (full search: every
    document), fused with BM25 as the student's search fuses (``search.lexical_weight``): what the
    student adds, apart from what the first stage and the fusion add (each lifts a dense ranker
    on its own)."""
    cosines = encoder.passage_cosines(qtexts, collection)
    lexical = lexical_document_scores(qtexts, collection) if cfg.lexical_weight else [None] * len(qtexts)
    if cfg.mode == "full":  # the student scored (and fused over) every document
        depth = len(collection.docs)
        student_ranking = [[(d, 0.0) for d in range(depth)]] * len(qtexts)
    else:
        depth = min(IR_DEPTH, cfg.rerank_depth)
    ranking = [
        reorder_head(row, depth, collection.document_scores(cos), lex, cfg.lexical_weight)[:IR_DEPTH]
        for row, cos, lex in zip(student_ranking, cosines, lexical, strict=True)
    ]
    candidates = (
        "ranking every document, as full search does"
        if cfg.mode == "full"
        else f"re-ranking the student's first stage ({cfg.first_stage} top {depth} documents)"
    )
    run = M.ranking_to_run(qids, collection.doc_ids, ranking)
    by_query, no_relevant = M.ir_per_query(qrels, run)
    out: dict[str, Any] = {
        "protocol": (
            f"the bi-encoder {candidates}"
            + (
                f", fused as the student is: z(cosine) + {cfg.lexical_weight:g} z(BM25)"
                if cfg.lexical_weight
                else ""
            )
        ),
        "metrics": M.ir_summary(by_query, no_relevant, run),
    }
    if resamples:
        out["student_vs"] = S.bootstrap_unit_gain(
            {q: v[main] for q, v in student_per_query.items()},
            {q: v[main] for q, v in by_query.items()},
            "query",
            resamples,
            seed,
        )
    return out


def lexical_document_scores(queries: Sequence[str], collection: PassageCorpus) -> list[np.ndarray]:
    """Per query, each document's best-passage BM25 score (the lexical part of hybrid search)."""
    bm25 = Bm25Ranker.build(collection.passages)
    return [collection.spans.best_per_document(bm25.scores(q), len(collection.docs)) for q in queries]


def reorder_head(
    row: list[tuple[int, float]],
    depth: int,
    doc_scores: np.ndarray,
    lexical: np.ndarray | None = None,
    lexical_weight: float = 0.0,
) -> list[tuple[int, float]]:
    """A ranking's top ``depth`` documents re-ordered by ``doc_scores`` (fused with ``lexical`` as
    ``d2llm.search.fuse_lexical`` fuses, when ``lexical_weight`` > 0); the rest follow as they were."""
    head = np.array([doc for doc, _ in row[:depth]], dtype=np.int64)
    scores = doc_scores[head]
    if lexical_weight:
        scores = standardised(scores) + lexical_weight * standardised(lexical[head])
    order = top_k_positions(scores, len(head))
    reranked = [(int(head[i]), float(scores[i])) for i in order]
    return reranked + [(doc, -1e9 - i) for i, (doc, _) in enumerate(row[depth:])]


def ir_passages(params: Params) -> Any:
    """``(doc_ids, docs) -> PassageCorpus``: documents cut into passages by the student's
    tokenizer and window, as ``d2llm index`` cuts them (``search.*``)."""
    from d2llm.hub import load_tokenizer

    st = params.student
    tokenizer = load_tokenizer(st.backbone, st.gguf_file, st.trust_remote_code)

    def split(doc_ids: list[str], docs: list[str]) -> PassageCorpus:
        return PassageCorpus.split(doc_ids, docs, tokenizer, st.max_length, params.search)

    return split


def _add_gain(entry: dict[str, Any]) -> None:
    """Fraction of the teacher's gain over the bi-encoder that the student recovers (main metric),
    where the teacher wins by more than ``RECOVERY_MIN_GAIN`` points."""
    main = entry["main_metric"]
    metrics = entry["metrics"]
    base, teacher, student = (metrics.get(s, {}).get(main) for s in ("bi-encoder", "teacher", "student"))
    entry["student_gain_recovered"] = M.gain_recovered(base, teacher, student, RECOVERY_MIN_GAIN)


def summarize(datasets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``mean_main`` per system: the mean of every dataset's main metric.

    Only a system with a number on every dataset gets a mean (``None`` otherwise, e.g. BM25,
    which scores no pair dataset): means over different dataset sets are not comparable.
    """
    per_system: dict[str, list[float]] = {}
    for entry in datasets.values():
        for sys_name, values in entry["metrics"].items():
            v = values.get(entry["main_metric"])
            if v is not None and not math.isnan(v):
                per_system.setdefault(sys_name, []).append(v)
    return {
        s: {"mean_main": float(np.mean(v)) if len(v) == len(datasets) else None, "n_datasets": len(v)}
        for s, v in per_system.items()
    }


def flat_metrics(
    datasets: dict[str, dict[str, Any]], summary: dict[str, dict[str, float]], system: str = "student"
) -> dict[str, float]:
    """One system's numbers as the flat mapping promotion and MLflow read.

    ``{"mean_main": ..., "<dataset>/<main metric>": ...}`` in points; empty when the system did
    not run (promotion then refuses clearly: the main metric is missing).
    """
    flat: dict[str, float] = {}
    for name, entry in datasets.items():
        value = entry["metrics"].get(system, {}).get(entry["main_metric"])
        if value is not None and math.isfinite(value):
            flat[f"{name}/{entry['main_metric']}"] = float(value)
    if summary.get(system, {}).get("mean_main") is not None:
        flat["mean_main"] = summary[system]["mean_main"]
    return flat


def validation_sets(params: Params, prepared_dir: str | Path) -> list[DevSet]:
    """The *validate* parts of ``evaluation.validation_datasets``' dev splits: what promotion
    compares and the report calls validation (no tuning step reads them)."""
    from d2llm.evaluation.dev import load_dev_sets

    ev = params.evaluation
    return load_dev_sets(
        prepared_dir,
        ev.validation_datasets,
        ev.max_validation_pairs,
        params.seed,
        "validate",
        params.selection.validate_fraction,
    )


def evaluate_validation(dev_sets: list[DevSet], systems: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Validation metrics of the bi-encoder and the student on ``dev_sets`` (``validation_sets``).

    These, not the test sets, decide promotion: ``{system: {"<dataset>/<metric>": .., "mean_main": ..}}``.
    """
    from d2llm.evaluation.dev import dev_score, mean_metric

    out: dict[str, dict[str, float]] = {}
    for sys_name in ("bi-encoder", "student"):
        system = systems.get(sys_name)
        if system is None or not isinstance(system, PairScorer):
            continue
        values = {}
        for dev in dev_sets:
            a, b = [p[0] for p in dev.pairs], [p[1] for p in dev.pairs]
            scores = system.score_pairs(a, b, scoring_key_for(system, dev.task, dev.family))
            values[dev.name] = dev_score(dev, scores)
        out[sys_name] = {**values, "mean_main": mean_metric(values)}
    return out


def validation_data(dev_sets: list[DevSet]) -> dict[str, Any]:
    """What the validation figures were measured on: ``id`` fingerprints the exact pairs and gold
    labels (promotion compares two versions only on the same id), with a readable summary."""
    from d2llm.evaluation.dev import dev_sets_id

    return {
        "id": dev_sets_id(dev_sets),
        "part": "validate",
        "sets": {dev.name: len(dev.pairs) for dev in dev_sets},
    }


def student_validation_metrics(
    params: Params, prepared_dir: str | Path, student_dir: str | Path
) -> tuple[dict[str, float], str]:
    """The flat validation metrics promotion compares, for one saved student, and the id of the
    validation data they were measured on (``validation_data``)."""
    from d2llm.hub import pick_device
    from d2llm.student.model import D2LLMStudent, inference_options

    student = D2LLMStudent.from_pretrained(
        student_dir,
        device=pick_device(params.device),
        merged=True,
        **inference_options(params.student),
    )
    scorer = StudentScorer(student, params.evaluation.batch_size, params.search.chunk_size)
    sets = validation_sets(params, prepared_dir)
    return evaluate_validation(sets, {"student": scorer}).get("student", {}), validation_data(sets)["id"]


def _json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: write them as null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def evaluate_systems(
    params: Params,
    prepared_dir: str | Path,
    teacher_dir: str | Path | None = None,
    student_dir: str | Path | None = None,
    output: str | Path | None = None,
    systems: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare the systems on the test data named in ``params.evaluation``; write JSON to ``output``.

    ``systems`` overrides loading (tests, or callers that already hold the models); by default
    they are built from params, ``teacher_dir`` and ``student_dir`` (a missing one is skipped
    with a note in the results). Then, with an ``output``, each finished dataset is kept in
    ``<output>.parts/`` until the report is written, and a run that stopped part-way scores only
    the datasets it had not finished (``d2llm.evaluation.parts``).
    """
    ev = params.evaluation
    prepared_dir = Path(prepared_dir)
    notes: list[str] = []
    parts = None
    if systems is None:
        systems, notes = load_systems(params, teacher_dir, student_dir)
        if output is not None:
            parts = EvaluationParts.beside(output, params, teacher_dir, student_dir)
    datasets: dict[str, dict[str, Any]] = {}
    memo: dict[Any, np.ndarray] = {}
    for name in ev.pair_datasets:
        data = prepared_dir / "pairs" / f"{name}.parquet"
        if (entry := parts.get(name, data) if parts else None) is None:
            pairs = load_pairs(prepared_dir, name)
            entry = evaluate_pair_dataset(
                name, pairs, systems, ev.max_pairs, params.seed, memo, ev.bootstrap_resamples
            )
            if parts:
                parts.put(name, data, entry)
        datasets[name] = entry
    for name in ev.ir_datasets:
        base = prepared_dir / "ir" / name
        if (entry := parts.get(name, base) if parts else None) is None:
            tables = {t: _read_table(base / f"{t}.parquet", f"IR table {name}/{t}") for t in IR_TABLE_NAMES}
            entry = evaluate_ir_dataset(
                name,
                **tables,
                systems=systems,
                max_queries=ev.max_queries,
                seed=params.seed,
                resamples=ev.bootstrap_resamples,
                passages=ir_passages(params),
            )
            if parts:
                parts.put(name, base, entry)
        datasets[name] = entry
    for entry in datasets.values():
        _add_gain(entry)
    summary = summarize(datasets)
    sets = validation_sets(params, prepared_dir)
    validation = evaluate_validation(sets, systems)
    ordered = [s for s in SYSTEM_ORDER if s in systems] + [s for s in systems if s not in SYSTEM_ORDER]
    sources = {"prepared_dir": str(prepared_dir), "teacher_dir": _str(teacher_dir)}
    sources["student_dir"] = _str(student_dir)
    results = _json_safe(
        {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "systems": ordered,
            "notes": notes,
            "sources": sources,
            "datasets": datasets,
            "summary": summary,
            "validation": validation,
            "validation_data": validation_data(sets),
            # Promotion and the registry read the dev-split numbers only: a model is never
            # chosen on the test sets this report shows.
            "flat": validation.get("student", {}),
            "test_flat": flat_metrics(datasets, summary),
        }
    )
    if output is not None:
        write_json(output, results)
    if parts:
        parts.clear()  # the report holds every dataset now
    return results


def _str(path: str | Path | None) -> str | None:
    return None if path is None else str(path)


# --------------------------------------------------------------------------- table

_METRIC_LABELS = {
    "ap": "AP",
    "accuracy": "Acc",
    "spearman": "Spearman",
    "pearson": "Pearson",
    "ndcg@10": "nDCG@10",
    "mrr@10": "MRR@10",
    "recall@100": "R@100",
    "map": "MAP",
    "mrr": "MRR",
}
_KIND_METRICS = {
    "pair_classification": ("ap", "accuracy"),
    "sts": ("spearman", "pearson"),
    "answer_selection": ("map", "mrr", "ap"),
    "retrieval": ("ndcg@10", "mrr@10", "recall@100"),
}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _gain_cell(comparison: dict[str, Any] | None) -> str:
    """``+4.40 [+3.12, +5.70]``: a gain over the bi-encoder and its 95% interval; ``*`` when the
    interval excludes zero."""
    if comparison is None:
        return "-"
    low, high = comparison["ci95"]
    mark = " *" if low > 0 or high < 0 else ""
    return f"{comparison['delta']:+.2f} [{low:+.2f}, {high:+.2f}]{mark}"


def _oracle_accuracy(entry: dict[str, Any]) -> bool:
    """Whether a class dataset's accuracy threshold was chosen on its test pairs; so were all of
    them before the report recorded ``accuracy_threshold``."""
    return entry.get("accuracy_threshold", {}).get("oracle", True)


def format_table(results: dict[str, Any]) -> str:
    """A markdown table: one row per (dataset, metric), one column per system, points (x100).

    On each dataset's main metric (marked *): the fraction of the teacher's gain over the
    bi-encoder recovered by the student and, when the report has them, the student's gain over
    the bi-encoder with its paired-bootstrap 95% interval (``*`` = the interval excludes 0).
    An accuracy whose threshold was not chosen on a dev split is labelled ``Acc (oracle)``.
    """
    systems = results["systems"]
    with_intervals = any(
        "student" in entry.get("vs_bi_encoder", {}) for entry in results["datasets"].values()
    )
    header = ["dataset", "metric", *systems, "recovered"]
    if with_intervals:
        header.append("student vs bi-encoder [95% CI]")
    rows = [header, ["---"] * len(header)]
    for name, entry in results["datasets"].items():
        for metric in _KIND_METRICS[entry["kind"]]:
            is_main = metric == entry["main_metric"]
            label = _METRIC_LABELS[metric] + (" *" if is_main else "")
            if metric == "accuracy" and _oracle_accuracy(entry):
                label += " (oracle)"
            cells = [_cell(entry["metrics"].get(s, {}).get(metric)) for s in systems]
            gain = entry.get("student_gain_recovered")
            recovered = "" if not is_main else ("-" if gain is None else f"{gain:.0%}")
            row = [name, label, *cells, recovered]
            if with_intervals:
                row.append(_gain_cell(entry.get("vs_bi_encoder", {}).get("student")) if is_main else "")
            rows.append(row)
    summary = results.get("summary", {})
    mean_row = ["mean", "main *", *[_cell(summary.get(s, {}).get("mean_main")) for s in systems], ""]
    rows.append(mean_row + ([""] if with_intervals else []))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines += [f"note: {n}" for n in results.get("notes", [])]
    for name, entry in results["datasets"].items():
        if "same_candidates" in entry:
            same = entry["same_candidates"]
            value = _cell(same["metrics"].get(entry["main_metric"]))
            versus = f"; student - it {_gain_cell(same['student_vs'])}" if "student_vs" in same else ""
            lines.append(
                f"note: {name}: {same['protocol']}: {_METRIC_LABELS[entry['main_metric']]} {value}{versus}"
            )
    if any(e["kind"] == "pair_classification" and _oracle_accuracy(e) for e in results["datasets"].values()):
        lines.append(
            "note: Acc (oracle) = accuracy at the best threshold on the test pairs themselves "
            "(no dev split to choose it on): optimistic"
        )
    if "teacher" in systems and "student" in systems:
        lines.append(
            "note: recovered = (student - bi-encoder) / (teacher - bi-encoder) on the main metric, "
            f"where the teacher wins by more than {RECOVERY_MIN_GAIN:g} point"
        )
    return "\n".join(lines)
