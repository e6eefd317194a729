"""The model card registered with every student version: what it learnt from, under which terms.

``build_model_card`` is a pure function of the typed config (``Params``), the evaluation results
(``reports/metrics.json``), the prepared-data manifest and the data catalogue. It returns the
card's text (``README.md``, logged next to the pyfunc files of the model) and a short summary for
the registered version's description. No MLflow here: ``log_student`` writes both.

Which data count for the terms of use: every source whose data trained or selected the model
(teacher fine-tuning, distillation, dev / early stopping, validation / promotion). Test-only
sources are listed with their own terms but do not restrict the model: no weight and no choice
depends on them. A dataset maps to its source through the prepared manifest (``pairs.<name>.source``;
an IR collection is its own source); sources not in the manifest are not listed. User datasets
(``data.custom``) are not in the catalogue: their licence is not known to d2llm.

``model_card_from_files`` reads those inputs where the pipeline writes them (the flow's
``register`` task and ``d2llm register`` call it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from d2llm.config import Params
from d2llm.data.catalog import RESTRICTIONS, Catalog, most_restrictive
from d2llm.errors import ArtifactError

CARD_FILE = "README.md"
CHINESE_SOURCES = frozenset({"stsb_zh", "ocnli", "atec"})  # the rest of the catalogue is English
USER_PROVIDED = "user-provided; licence not known to d2llm"
NOT_CATALOGUED = "not in the data catalogue; licence not known to d2llm"
USE_WORDS = {
    "research-only": "research only",
    "non-commercial": "non-commercial",
    "share-alike": "share-alike",
    "licence-unstated": "licence unstated for some data",
}

# What each dataset served, in pipeline order; all but "test" shaped or selected the model.
TEACHER_FINETUNING = "teacher fine-tuning"
DISTILLATION = "distillation"
DEV = "dev / early stopping"
VALIDATION = "validation / promotion"
TEST = "test"
TRAINING_ROLES = (TEACHER_FINETUNING, DISTILLATION, DEV, VALIDATION)
TABLE_SYSTEMS = ("bi-encoder", "teacher", "student")  # the test table's columns


@dataclass(frozen=True)
class ModelCard:
    text: str  # README.md
    summary: str  # the registered version's description
    restrictions: list[str]  # catalogue terms of the training data, most restrictive first


@dataclass(frozen=True)
class SourceTerms:
    """One data source as the card lists it."""

    name: str
    title: str
    licence: str
    restrictions: tuple[str, ...] = ()
    known: bool = True  # False: user-provided or not catalogued, licence not known to d2llm
    datasets: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    citation: str = ""

    @property
    def trains(self) -> bool:
        return any(role in TRAINING_ROLES for role in self.roles)


# --------------------------------------------------------------------------- inputs -> facts


def dataset_roles(
    params: Params, results: Mapping[str, Any] | None = None, labelled: Mapping[str, int] | None = None
) -> dict[str, list[str]]:
    """``{role: [dataset, ...]}``. Distillation: the datasets actually labelled when known
    (``labelled``: groups per dataset), else the configured ``labelling.datasets``."""
    finetune = params.teacher.finetune
    return {
        TEACHER_FINETUNING: list(finetune.datasets) if finetune.enabled else [],
        DISTILLATION: list(labelled) if labelled is not None else list(params.labelling.datasets),
        DEV: list(params.training.dev_datasets),
        VALIDATION: list(params.evaluation.validation_datasets),
        TEST: test_datasets(params, results),
    }


def test_datasets(params: Params, results: Mapping[str, Any] | None) -> list[str]:
    """The test sets evaluated (the results' datasets), else the configured ones."""
    evaluated = list((results or {}).get("datasets") or {})
    return evaluated or [*params.evaluation.pair_datasets, *params.evaluation.ir_datasets]


def dataset_source(name: str, manifest: Mapping[str, Any]) -> str | None:
    """The source of a prepared dataset (None: not in the manifest)."""
    pairs = manifest.get("pairs") or {}
    if name in pairs:
        return str(pairs[name].get("source") or name)
    return name if name in (manifest.get("ir") or []) else None


def source_terms(
    params: Params,
    manifest: Mapping[str, Any],
    catalog: Catalog | None,
    roles: Mapping[str, Sequence[str]],
) -> list[SourceTerms]:
    """Every prepared source that served a role, training sources first, the most restrictive first."""
    datasets: dict[str, list[str]] = {}
    served: dict[str, list[str]] = {}
    for role, names in roles.items():
        for name in names:
            source = dataset_source(name, manifest)
            if source is None:
                continue
            datasets.setdefault(source, [])
            if name not in datasets[source]:
                datasets[source].append(name)
            if role not in served.setdefault(source, []):
                served[source].append(role)
    custom = {c.name for c in params.data.custom}
    terms = [_terms_of(s, custom, catalog, datasets[s], served[s]) for s in datasets]
    return sorted(terms, key=lambda t: (not t.trains, _strictness(t), t.name))


def _terms_of(
    source: str, custom: set[str], catalog: Catalog | None, datasets: list[str], roles: list[str]
) -> SourceTerms:
    if source in custom:
        return SourceTerms(source, source, USER_PROVIDED, (), False, datasets, roles)
    entry = catalog.sources.get(source) if catalog is not None else None
    if entry is None:
        return SourceTerms(source, source, NOT_CATALOGUED, (), False, datasets, roles)
    ordered = tuple(most_restrictive(entry.restrictions))
    return SourceTerms(source, entry.title, entry.licence, ordered, True, datasets, roles, entry.citation)


def _strictness(terms: SourceTerms) -> int:
    """Sort key: the rank of a source's most restrictive term; then unknown licences, then none."""
    if not terms.known:
        return len(RESTRICTIONS)
    return RESTRICTIONS.index(terms.restrictions[0]) if terms.restrictions else len(RESTRICTIONS) + 1


def languages(sources: Sequence[SourceTerms]) -> list[str]:
    """Languages of the catalogued training sources (user data: not known)."""
    known = [s.name for s in sources if s.trains and s.known]
    found = ["en"] if any(n not in CHINESE_SOURCES for n in known) else []
    return found + (["zh"] if any(n in CHINESE_SOURCES for n in known) else [])


# --------------------------------------------------------------------------- the terms of use


def use_terms(sources: Sequence[SourceTerms]) -> tuple[list[str], str]:
    """The training data's restrictions (most restrictive first) and the card's "Use:" sentence."""
    training = [s for s in sources if s.trains]
    restrictions = most_restrictive({r for s in training for r in s.restrictions})
    unknown = [s.name for s in training if not s.known]
    words = [USE_WORDS[r] for r in restrictions]
    if unknown:
        words.append(f"licence not known to d2llm for {', '.join(unknown)}")
    if not words:
        words = ["no restriction recorded in the data catalogue"]
    return restrictions, "Use: " + ", ".join(words)


def _why(sources: Sequence[SourceTerms]) -> str:
    """``SICK (SemEval-2014 Task 1): CC BY-NC-SA 3.0 [non-commercial, share-alike]; ...``"""
    parts = []
    for s in sources:
        if s.trains and not s.known:
            parts.append(f"{s.title}: licence not known to d2llm")
        elif s.trains and s.restrictions:
            parts.append(f"{s.title}: {s.licence} [{', '.join(s.restrictions)}]")
    return "; ".join(parts)


# --------------------------------------------------------------------------- card sections


def _front_matter(params: Params, sources: Sequence[SourceTerms], restrictions: list[str]) -> list[str]:
    meta = {
        "license": "other",
        "license_name": "training-data-terms",
        "language": languages(sources) or ["unknown"],
        "library_name": "d2llm",
        "pipeline_tag": "sentence-similarity",
        "tags": ["d2llm", "sentence-similarity", "semantic-search", "distillation", "mlflow"],
        "base_model": params.student.backbone,
        "datasets": [s.name for s in sources if s.trains],
        "use_restrictions": restrictions,
    }
    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---"]


def _data_section(sources: Sequence[SourceTerms]) -> list[str]:
    lines = [
        "## Training data and licences",
        "",
        "| source | datasets | used for | licence | restrictions |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in sources:
        restrictions = ", ".join(s.restrictions) if s.known else "unknown"
        cells = [s.title, ", ".join(s.datasets), ", ".join(s.roles), s.licence, restrictions or "none"]
        lines.append("| " + " | ".join(_cell_text(c) for c in cells) + " |")
    lines += [
        "",
        "The terms of use above come from the sources that trained or selected the model; test-only "
        "sources are listed for their own terms (no weight or choice depends on them). Licences and "
        "restrictions: the data catalogue, `data/raw/catalog.yaml`.",
    ]
    return lines


def _roles_section(
    roles: Mapping[str, Sequence[str]], manifest: Mapping[str, Any], labelled: Mapping[str, int] | None
) -> list[str]:
    def names(role: str) -> str:
        listed = [n if dataset_source(n, manifest) else f"{n} (not prepared)" for n in roles[role]]
        return ", ".join(listed) or "none"

    if labelled is not None:
        distilled = ", ".join(f"{n} ({g} groups)" for n, g in labelled.items()) or "none"
        distilled += " — the datasets labelled after the teacher gate (`data/labels`)"
    else:
        distilled = names(DISTILLATION) + " — as configured (`labelling.datasets`); the labels were not read"
    return [
        "## Which data served what",
        "",
        f"- **Teacher fine-tuning** (`teacher.finetune.datasets`): {names(TEACHER_FINETUNING)}",
        f"- **Distillation**: {distilled}",
        f"- **Dev / early stopping** (`training.dev_datasets`, dev splits): {names(DEV)}",
        f"- **Validation / promotion** (`evaluation.validation_datasets`, dev splits): {names(VALIDATION)}",
        f"- **Test** (`evaluation.pair_datasets`, `evaluation.ir_datasets`; never used to select): "
        f"{names(TEST)}",
    ]


def _model_section(params: Params, labelled: Mapping[str, int] | None) -> list[str]:
    recipe = [_teacher_line(params), *_student_lines(params), *_recipe_lines(params, labelled)]
    return ["## Model and recipe", "", *recipe]


def _teacher_line(params: Params) -> str:
    t = params.teacher
    line = f"- **Teacher**: {t.kind} `{t.model}` (max length {t.max_length})"
    ft = t.finetune
    if ft.enabled:
        cap = f", at most {ft.max_train_pairs} pairs per dataset" if ft.max_train_pairs else ""
        if ft.asym_max_train_pairs:
            cap += f" ({ft.asym_max_train_pairs} per QA dataset)"
        lora = f", LoRA r={ft.lora.r}" if ft.lora.enabled else ""
        line += f"; fine-tuned on gold labels ({ft.epochs:g} epoch(s), lr {ft.lr:g}{cap}{lora})"
        if ft.per_task:
            line += "; one teacher per task kind (sym: NLI, STS; asym: QA), each on its own datasets"
    else:
        line += "; not fine-tuned (used as loaded)"
    if t.fusion == "biencoder":
        line += "; fused with the bi-encoder per dataset (weights chosen on dev)"
    return line


def _student_lines(params: Params) -> list[str]:
    s = params.student
    lora = f"LoRA r={s.lora.r}, alpha={s.lora.alpha}" if s.lora.enabled else "LoRA off (backbone frozen)"
    iem = s.iem
    return [
        f"- **Student backbone**: `{s.backbone}` (max length {s.max_length} tokens, "
        f"hidden layer {s.pooled_layer})",
        f"- **Student heads**: {lora}; PMA {s.pma.num_heads} heads (init {s.pma.init}); IEM hidden "
        f"{iem.hidden_size}, branch {iem.branch_size}, residual {iem.residual}, branches per {iem.branches}",
    ]


def _recipe_lines(params: Params, labelled: Mapping[str, int] | None) -> list[str]:
    loss, tr, lab, mining = params.loss, params.training, params.labelling, params.mining
    groups = "labelled groups not read" if labelled is None else f"{sum(labelled.values())} labelled groups"
    gate = "off" if lab.min_teacher_gain is None else f"teacher gain >= {lab.min_teacher_gain:g} on dev"
    head_lr = "same" if tr.head_lr is None else f"{tr.head_lr:g}"
    if tr.iem_lr is not None:
        head_lr = f"PMA {head_lr}, IEM {tr.iem_lr:g}"
    if tr.iem_detach:
        head_lr += "; the IEM's MLP sends no gradient into the vectors"
    if len(tr.iem_weights) > 1:  # the kept student's IEM may sit at one of these (d2llm.training)
        head_lr += f"; IEM kept at the best of weights {'/'.join(f'{w:g}' for w in tr.iem_weights)}"
    steps = f", at most {tr.max_steps} steps" if tr.max_steps else ""
    return [
        f"- **Losses**: CI ({loss.ci_variant}, {loss.ci_hard} hard part, alpha {loss.alpha:g}), RI "
        f"(beta {loss.beta:g}, gamma {loss.gamma:g}), FI (eta {loss.eta:g}); temperatures tau_CI "
        f"{loss.tau_ci:g}, tau_RI {loss.tau_ri:g}, teacher tau_T {params.teacher.temperature:g}",
        f"- **Training**: {tr.epochs:g} epoch(s){steps}, lr {tr.lr:g} (heads: {head_lr}), warm-up "
        f"{tr.warmup_ratio:g}, {tr.group_sampling} group sampling, seed {params.seed}",
        f"- **Groups**: {groups}; {lab.group_size} anchors each with {mining.num_negatives} mined hard "
        f"negatives ({mining.method}); at most {lab.max_groups_per_dataset or 'all'} per dataset; "
        f"gate: {gate}",
    ]


def _evaluation_section(results: Mapping[str, Any] | None) -> list[str]:
    datasets = (results or {}).get("datasets") or {}
    lines = ["## Evaluation", ""]
    if not datasets:
        return [*lines, "No test results were given at registration (`d2llm register --metrics`)."]
    lines += [
        "Test splits, main metric of each set in points; the gain is the student's over the bi-encoder it "
        "starts from, with a paired-bootstrap 95% interval (`*`: the interval excludes 0).",
        "",
        "| test set | main metric | bi-encoder | teacher | student | student - bi-encoder [95% CI] |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in datasets.items():
        main = entry.get("main_metric", "")
        metrics = entry.get("metrics", {})
        values = [_number(metrics.get(s, {}).get(main)) for s in TABLE_SYSTEMS]
        gain = _gain(entry.get("vs_bi_encoder", {}).get("student"))
        lines.append(f"| {name} | {main} | {' | '.join(values)} | {gain} |")
    summary = (results or {}).get("summary") or {}
    means = [_number(summary.get(s, {}).get("mean_main")) for s in TABLE_SYSTEMS]
    lines.append(f"| mean | main | {' | '.join(means)} | |")
    return [*lines, "", _validation_line(results or {})]


def _validation_line(results: Mapping[str, Any]) -> str:
    validation = results.get("validation") or {}
    student = validation.get("student") or {}
    if not student:
        return "Validation (dev splits, what promotion compares): not in the results."
    sets = ", ".join(k for k in student if k != "mean_main")
    base = (validation.get("bi-encoder") or {}).get("mean_main")
    versus = f" vs bi-encoder {_number(base)}" if base is not None else ""
    return (
        f"Validation (dev splits of {sets}; what promotion compares): student mean "
        f"{_number(student.get('mean_main'))}{versus}."
    )


def _limits_section(
    params: Params, sources: Sequence[SourceTerms], roles: Mapping[str, Sequence[str]]
) -> list[str]:
    langs = languages(sources)
    language = {("en",): "English only", ("zh",): "Chinese only", ("en", "zh"): "English and Chinese"}
    lang_text = language.get(tuple(langs), "language not recorded")
    user = [s.name for s in sources if s.trains and not s.known]
    if user:
        lang_text += f" (plus data whose language d2llm does not know: {', '.join(user)})"
    tested = ", ".join(roles[TEST]) or "nothing"
    return [
        "## Intended use and limits",
        "",
        "- Intended use: scoring text pairs (`sym`: NLI / similarity, `asym`: query -> passage) and "
        "semantic search with an index built by this student, within the terms of use above.",
        f"- Evaluated on {tested} only: quality on other domains, text types or tasks is unknown.",
        f"- Language: {lang_text}.",
        f"- Input length: the student reads the first {params.student.max_length} tokens of a text "
        "(`student.max_length`); split longer documents into passages (`d2llm index` does).",
        "- Scores are the student's relevance logits, not calibrated probabilities.",
        "- The training data's licences restrict use (first line); the teacher and backbone models "
        "carry their own licences, not covered here.",
        "- Not evaluated for safety, bias or fairness; not for decisions about people.",
    ]


def _citations(sources: Sequence[SourceTerms]) -> list[str]:
    cited = [f"- {s.title}: {s.citation}" for s in sources if s.citation]
    return ["## Citations", "", *cited] if cited else []


# --------------------------------------------------------------------------- the card


def build_model_card(
    params: Params,
    results: Mapping[str, Any] | None,
    prepared_manifest: Mapping[str, Any],
    catalog: Catalog | None,
    *,
    model_name: str,
    version: str | int | None = None,
    labelled_datasets: Mapping[str, int] | None = None,
) -> ModelCard:
    """The card of a student trained with ``params``; ``labelled_datasets`` (groups per dataset,
    from ``data/labels``) names what was distilled, else ``labelling.datasets`` is shown."""
    roles = dataset_roles(params, results, labelled_datasets)
    sources = source_terms(params, prepared_manifest, catalog, roles)
    restrictions, use = use_terms(sources)
    why = _why(sources)
    title = f"# {model_name}" + (f" v{version}" if version is not None else "")
    sections = [
        _front_matter(params, sources, restrictions),
        [title, "", f"**{use}.**" + (f" Most restrictive first: {why}." if why else "")],
        [
            "A D2LLM student (Liao et al., ACL 2024): a bi-encoder (LoRA backbone + PMA pooling) with an "
            "Interaction Emulation Module, distilled from a cross-encoder teacher; passage vectors are "
            "computed once, so search costs about what a bi-encoder does."
        ],
        _data_section(sources),
        _roles_section(roles, prepared_manifest, labelled_datasets),
        _model_section(params, labelled_datasets),
        _evaluation_section(results),
        _limits_section(params, sources, roles),
        _citations(sources),
    ]
    text = "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"
    return ModelCard(text, _summary(params, results, sources, use), restrictions)


def _summary(
    params: Params, results: Mapping[str, Any] | None, sources: Sequence[SourceTerms], use: str
) -> str:
    training = ", ".join(s.name for s in sources if s.trains) or "none recorded"
    lines = [
        f"{use} (training data terms, most restrictive first).",
        f"Training data: {training}.",
        f"Teacher: {params.teacher.kind} {params.teacher.model}; "
        f"student backbone: {params.student.backbone}.",
        _test_summary(results),
        f"Model card: {CARD_FILE} in this version's model artifacts.",
    ]
    return "\n".join(lines)


def _test_summary(results: Mapping[str, Any] | None) -> str:
    summary = (results or {}).get("summary") or {}
    student = summary.get("student", {}).get("mean_main")
    base = summary.get("bi-encoder", {}).get("mean_main")
    if student is None or base is None:
        return "Test: no results at registration."
    n = len((results or {}).get("datasets") or {})
    versus = f"student {student:.2f} vs bi-encoder {base:.2f} ({student - base:+.2f})"
    return f"Test mean main metric ({n} sets): {versus}."


def unrecorded_card(model_name: str) -> ModelCard:
    """The card of a version registered without its training facts (a bare ``log_student`` call)."""
    use = "Use: unknown (the training data and its licences were not recorded at registration)"
    text = (
        f"# {model_name}\n\n**{use}.** Treat it as research only until the data are checked.\n\n"
        "Registered without a model card: the training data, recipe and test results were not given "
        "to `log_student`. Register through the pipeline or `d2llm register` to record them.\n"
    )
    return ModelCard(text, f"{use}.\nModel card: {CARD_FILE} in this version's model artifacts.", [])


# --------------------------------------------------------------------------- reading the inputs


def model_card_from_files(
    params: Params,
    *,
    model_name: str,
    results_file: str | Path | None,
    catalog_path: str | Path,
    labels_dir: str | Path | None = None,
) -> ModelCard:
    """Build the card from the files the pipeline writes: the evaluation results (optional), the
    prepared manifest, the catalogue (when a catalogued source was prepared) and the labels."""
    from d2llm.data import read_manifest
    from d2llm.data.catalog import load_catalog

    results = _read_results(results_file) if results_file is not None else None
    manifest = read_manifest(params.data.prepared_dir)
    names = [*(manifest.get("pairs") or {}), *(manifest.get("ir") or [])]
    catalogued = {dataset_source(n, manifest) for n in names} - {c.name for c in params.data.custom}
    catalog = load_catalog(catalog_path) if catalogued else None
    labelled = None
    if labels_dir is not None and Path(labels_dir).is_dir():
        labelled = labelled_groups(labels_dir, params.training.max_groups_per_dataset)
    return build_model_card(
        params, results, manifest, catalog, model_name=model_name, labelled_datasets=labelled
    )


def labelled_groups(labels_dir: str | Path, per_dataset: int | None = None) -> dict[str, int]:
    """Groups per dataset the student trained on: those of a complete labelling (what the teacher
    gate let through), at most ``per_dataset`` each (``training.max_groups_per_dataset``)."""
    from d2llm.labelling.shards import read_groups

    counts = read_groups(labels_dir)["dataset"].value_counts(sort=False)
    return {
        str(name): int(n) if per_dataset is None else min(int(n), per_dataset) for name, n in counts.items()
    }


def _read_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"evaluation results not found: {path} (run `d2llm evaluate` first)")
    results = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(results, dict):
        raise ArtifactError(f"{path}: evaluation results must be a JSON object")
    return results


# --------------------------------------------------------------------------- formatting


def _number(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return f"{value:.2f}"


def _gain(comparison: Mapping[str, Any] | None) -> str:
    if not comparison or comparison.get("delta") is None:
        return "-"
    low, high = (comparison.get("ci95") or [None, None])[:2]
    if low is None or high is None:
        return f"{comparison['delta']:+.2f}"
    mark = " *" if low > 0 or high < 0 else ""
    return f"{comparison['delta']:+.2f} [{low:+.2f}, {high:+.2f}]{mark}"


def _cell_text(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
