"""The student as an MLflow pyfunc model, for ``mlflow models serve`` and ``mlflow.pyfunc.load_model``.

The logged model's artifacts are the student folder (``save_pretrained`` output, safetensors +
JSON) and, optionally, a search index folder. The ``PythonModel`` object itself holds nothing
but settings: the torch model is rebuilt from those artifacts in ``load_context``, never pickled.

Two request kinds, told apart by their columns:

- pairs: ``text_a, text_b, task`` (``sym``/``asym``; ``nli``/``sts`` pick a per-family student's
  branch) -> one ``score`` (the IEM logit) per row;
- search (only when logged with an index): ``query`` and optional ``k`` -> rows of
  ``query, rank, doc_id, score``.

Bad input raises ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: the scoring server turns
that into an HTTP 400 carrying the message, instead of a 500 with a generic text.

Request size limit: at most ``MAX_ROWS`` rows (pairs or queries) per request and ``MAX_TEXT_CHARS``
characters per text; a larger request gets a 400 naming the limit before any text is encoded.
The student reads at most ``student.max_length`` tokens of a text anyway, so the character cap
only bounds the tokenizer's work and the request's memory. A model logged with
``search_settings={"max_rows": ..., "max_text_chars": ...}`` (its ``model_config``) uses those
values instead. ``benchmarks/serve_load.py`` measures the server under concurrent load with valid,
malformed and oversized requests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc

from d2llm.errors import clip

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.models import ModelSignature

PAIR_COLUMNS = ("text_a", "text_b", "task")
SEARCH_COLUMNS = ("query", "k")
# sym/asym are the paper's task kinds; nli/sts pick a per-family student's branch (and map to
# sym on a two-branch one): d2llm.student.iem.SCORING_KEYS.
TASKS = ("sym", "asym", "nli", "sts")
STUDENT_ARTIFACT = "student"
INDEX_ARTIFACT = "index"
BACKBONE_ARTIFACT = "backbone"  # a bundled local backbone folder (see d2llm.tracking.registry)
STUDENT_CONFIG_FILE = "student.json"  # d2llm.student.model.CONFIG_FILE
DEFAULT_K = 10
MAX_K = 1000
MAX_ROWS = 512  # pairs or queries per request
MAX_TEXT_CHARS = 10_000  # characters per text (about 2 000 words; the student reads max_length tokens)


def _invalid(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def check_size(frame: pd.DataFrame, max_rows: int = MAX_ROWS) -> None:
    """A 400 for a request without rows or with more than ``max_rows``."""
    if len(frame) == 0:
        raise _invalid("request has no rows")
    if len(frame) > max_rows:
        raise _invalid(f"request has {len(frame)} rows; the limit is {max_rows} rows per request: split it")


def _check_texts(frame: pd.DataFrame, column: str, max_chars: int = MAX_TEXT_CHARS) -> list[str]:
    """The column as a list of non-empty strings of at most ``max_chars``, or a 400 naming the
    first bad row (a quoted value is cut short, so a huge text is never echoed whole)."""
    values = frame[column].tolist()
    for row, value in enumerate(values):
        if not isinstance(value, str):
            kind = type(value).__name__
            raise _invalid(f"column {column!r} row {row}: expected a string, got {kind} {clip(repr(value))}")
        if not value.strip():
            raise _invalid(f"column {column!r} row {row}: text is empty")
        if len(value) > max_chars:
            raise _invalid(
                f"column {column!r} row {row}: text has {len(value)} characters; "
                f"the limit is {max_chars} characters per text"
            )
    return values


def validate_pairs(
    frame: pd.DataFrame, max_rows: int = MAX_ROWS, max_chars: int = MAX_TEXT_CHARS
) -> tuple[list[str], list[str], list[str]]:
    """``(text_a, text_b, task)`` lists from a pair request, or a clear error."""
    missing = [c for c in PAIR_COLUMNS if c not in frame.columns]
    if missing:
        raise _invalid(
            f"pair request is missing column(s) {missing}; send columns {list(PAIR_COLUMNS)}"
            f" (got {clip(repr(list(frame.columns)))})"
        )
    check_size(frame, max_rows)
    text_a, text_b = _check_texts(frame, "text_a", max_chars), _check_texts(frame, "text_b", max_chars)
    tasks = frame["task"].tolist()
    for row, task in enumerate(tasks):
        if task not in TASKS:
            raise _invalid(f"column 'task' row {row}: {clip(repr(task))} is not one of {list(TASKS)}")
    return text_a, text_b, tasks


def validate_queries(
    frame: pd.DataFrame, default_k: int, max_rows: int = MAX_ROWS, max_chars: int = MAX_TEXT_CHARS
) -> tuple[list[str], list[int]]:
    """``(queries, ks)`` from a search request, or a clear error."""
    check_size(frame, max_rows)
    queries = _check_texts(frame, "query", max_chars)
    if "k" not in frame.columns:
        return queries, [default_k] * len(queries)
    ks = []
    for row, k in enumerate(frame["k"].tolist()):
        if isinstance(k, float) and k.is_integer():
            k = int(k)  # JSON numbers may arrive as floats
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            bad = "missing" if isinstance(k, float) and math.isnan(k) else clip(repr(k))
            raise _invalid(f"column 'k' row {row}: expected an integer in [1, {MAX_K}], got {bad}")
        ks.append(k)
    return queries, ks


class StudentPyfunc(mlflow.pyfunc.PythonModel):
    """Scores pairs with the D2LLM student and, with an index, searches its corpus."""

    def load_context(self, context: Any) -> None:

        from d2llm.student.model import D2LLMStudent

        student_dir = context.artifacts[STUDENT_ARTIFACT]
        if BACKBONE_ARTIFACT in context.artifacts:
            student_dir = self._point_at_bundled_backbone(student_dir, context.artifacts[BACKBONE_ARTIFACT])
        self.settings: Mapping[str, Any] = dict(context.model_config or {})
        # LoRA merged into the backbone: inference runs the plain backbone (same scores, faster);
        # the IEM's branch layer in the dtype logged with the model (default: the saved config's).
        self.student = D2LLMStudent.from_pretrained(
            student_dir,
            merged=True,
            iem_dtype=self.settings.get("iem_dtype"),
            quantization=self.settings.get("quantization"),
        )
        self.index = None
        if INDEX_ARTIFACT in context.artifacts:
            from d2llm.search import load_index

            # load_index checks the index was built by this very student (weights fingerprint).
            self.index = load_index(
                context.artifacts[INDEX_ARTIFACT],
                self.student,
                ef_search=int(self.settings.get("hnsw_ef_search", 128)),
                nprobe=int(self.settings.get("ivf_nprobe", 32)),
            )

    def _point_at_bundled_backbone(self, student_dir: str, backbone_dir: str) -> str:
        """A copy of the student folder whose config names the backbone shipped with the model.

        The student folder holds LoRA adapters and heads, not the backbone; a backbone given as a
        local folder at training time is bundled so the model does not depend on that path.
        """
        import json
        import shutil
        import tempfile

        self._workdir = tempfile.TemporaryDirectory(prefix="d2llm-student-")  # lives with the model
        copy = Path(shutil.copytree(student_dir, Path(self._workdir.name) / "student"))
        meta = json.loads((copy / STUDENT_CONFIG_FILE).read_text(encoding="utf-8"))
        meta["student"]["backbone"] = str(Path(backbone_dir).resolve())
        (copy / STUDENT_CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return str(copy)

    # No type hints here on purpose: MLflow 3 would derive a schema from them and bypass ours.
    def predict(self, context, model_input, params=None):
        import torch

        # A local no-grad scope: the model may be loaded in a training process (the registration
        # smoke test), whose autograd must stay on.
        with torch.inference_mode():
            return self._predict(model_input)

    def _predict(self, model_input):
        import pandas as pd

        if not isinstance(model_input, pd.DataFrame):
            raise _invalid(
                f"expected a DataFrame (dataframe_split/dataframe_records), got {type(model_input).__name__}"
            )
        frame = model_input.reset_index(drop=True)
        has_pairs = any(c in frame.columns and frame[c].notna().any() for c in PAIR_COLUMNS)
        has_query = "query" in frame.columns and frame["query"].notna().any()
        if has_pairs and has_query:
            raise _invalid(
                "send either pair columns (text_a, text_b, task) or search columns (query, k), not both"
            )
        if has_query:
            return self._search(frame)
        return self._score_pairs(frame)

    def _limits(self) -> tuple[int, int]:
        """(rows per request, characters per text): the logged settings, else the defaults."""
        settings = getattr(self, "settings", {})
        return int(settings.get("max_rows", MAX_ROWS)), int(settings.get("max_text_chars", MAX_TEXT_CHARS))

    def _score_pairs(self, frame: pd.DataFrame) -> pd.DataFrame:
        import numpy as np
        import pandas as pd
        import torch

        text_a, text_b, tasks = validate_pairs(frame, *self._limits())
        scores = np.zeros(len(frame), dtype=np.float64)
        for task in TASKS:  # one IEM branch per key: score each key's rows in one call
            rows = [i for i, t in enumerate(tasks) if t == task]
            if rows:
                z = self.student.score([(text_a[i], text_b[i]) for i in rows], task)
                scores[rows] = torch.as_tensor(z).detach().float().cpu().reshape(-1).numpy()
        return pd.DataFrame({"score": scores})

    def _search(self, frame: pd.DataFrame) -> pd.DataFrame:
        import pandas as pd

        from d2llm.config import DEFAULT_SEARCH_MODE
        from d2llm.search import search

        if self.index is None:
            raise _invalid(
                "this model was logged without a search index: send pair columns (text_a, text_b, task)"
            )
        queries, ks = validate_queries(frame, int(self.settings.get("default_k", DEFAULT_K)), *self._limits())
        rows = []
        for query, k in zip(queries, ks, strict=True):
            hits = search(
                self.student,
                self.index,
                query,
                k=k,
                mode=self.settings.get("mode", DEFAULT_SEARCH_MODE),
                first_stage=self.settings.get("first_stage", "cosine"),
                rerank_depth=int(self.settings.get("rerank_depth", 100)),
                chunk_size=int(self.settings.get("chunk_size", 4096)),
                aggregation=self.settings.get("aggregation", "best"),
                first_weight=float(self.settings.get("first_weight", 0.5)),
                lexical_weight=float(self.settings.get("lexical_weight", 0.0)),
            )
            rows += [
                {"query": query, "rank": rank, "doc_id": hit.doc_id, "score": hit.score}
                for rank, hit in enumerate(hits, start=1)
            ]
        return pd.DataFrame(rows, columns=["query", "rank", "doc_id", "score"])


# The "models from code" file logged with the model: MLflow runs it at load time instead of
# unpickling an object, so nothing in the logged model is a pickle.
MODEL_CODE = """\
import mlflow.models

from d2llm.serving import StudentPyfunc

mlflow.models.set_model(StudentPyfunc())
"""


def write_model_code(folder: str | Path) -> Path:
    path = Path(folder) / "d2llm_student_model.py"
    path.write_text(MODEL_CODE, encoding="utf-8")
    return path


def model_signature(with_index: bool) -> ModelSignature:
    """Pair columns are required for a pair-only model; with an index every column is optional,
    and ``predict`` checks that a request holds one complete kind."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    required = not with_index
    inputs = [ColSpec("string", name, required=required) for name in PAIR_COLUMNS]
    outputs = [ColSpec("double", "score")]
    if with_index:
        inputs += [ColSpec("string", "query", required=False), ColSpec("long", "k", required=False)]
        outputs = [
            ColSpec("string", "query", required=False),
            ColSpec("long", "rank", required=False),
            ColSpec("string", "doc_id", required=False),
            ColSpec("double", "score"),
        ]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def input_example() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        {
            "text_a": ["A man is playing a guitar.", "what is the boiling point of water"],
            "text_b": ["A person plays music.", "Water boils at 100 degrees Celsius at sea level."],
            "task": ["sym", "asym"],
        }
    )


def pip_requirements() -> list[str]:
    """Pinned to what is installed: given explicitly, MLflow does not resolve them (works offline)."""
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for package in ("mlflow", "torch", "transformers", "peft", "safetensors", "pandas", "numpy", "d2llm"):
        try:
            requirements.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements
