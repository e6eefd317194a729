"""Champion/challenger promotion over the MLflow model registry (aliases, no stages).

The rule itself, ``decide_promotion``, is a pure function of two metric mappings, so it is
unit-tested without a registry. ``promote`` applies it to registered versions: it moves the
``challenger`` alias, compares against ``champion`` on the same evaluation data, and records the
decision and its numbers as version tags and in the version description (a ``Promotion:``
paragraph after the model card summary that registration wrote there, which it keeps).

Metrics are flat ``{name: value}`` mappings in *points* (x100 for AP, Spearman, nDCG...), so the
tolerance ``promotion.tolerance`` reads as "points a task may regress". ``promotion.main_metric``
names the key that must improve; every other key is a per-task metric that must not regress by
more than the tolerance.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from d2llm.config import PromotionConfig
from d2llm.errors import ArtifactError
from d2llm.tracking.runs import metric_key

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"

# Version tags (all strings in MLflow). Metrics are stored one tag each so the UI can show them.
METRIC_TAG_PREFIX = "metric."
TAG_DECISION = "d2llm.promotion.decision"  # "promoted" | "refused"
TAG_REASON = "d2llm.promotion.reason"
TAG_AGAINST = "d2llm.promotion.against_version"  # champion compared with ("" for the first model)
TAG_NUMBERS = "d2llm.promotion.numbers"  # JSON: both metric sets, deltas, tolerance
TAG_EVAL_DATA = "d2llm.eval_data"  # identifies the evaluation data the metric tags come from

Metrics = Mapping[str, float]
EvalFn = Callable[[str], Mapping[str, float]]  # model URI -> metrics
# model URI -> (its metrics on the current validation data, that data's id)
Reevaluate = Callable[[str], tuple[Mapping[str, float], str]]


@dataclass(frozen=True)
class Decision:
    """Outcome of comparing a challenger with the champion."""

    promote: bool
    reason: str
    main_metric: str
    main_delta: float | None  # challenger - champion on the main metric (None: no champion)
    # Per-task deltas (challenger - champion) and the tasks that regressed beyond tolerance.
    deltas: dict[str, float] = field(default_factory=dict)
    regressions: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "promote": self.promote,
                "reason": self.reason,
                "main_metric": self.main_metric,
                "main_delta": self.main_delta,
                "deltas": self.deltas,
                "regressions": self.regressions,
            },
            sort_keys=True,
        )


def _check_finite(metrics: Metrics, who: str) -> None:
    for name, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ArtifactError(f"{who} metric {name!r} must be a finite number, got {value!r}")


def decide_promotion(champion: Metrics | None, challenger: Metrics, cfg: PromotionConfig) -> Decision:
    """Promote only if the main metric improves and no task regresses by more than ``cfg.tolerance``.

    The first model (no champion) is always promoted. The two metric sets must name the same
    validation sets (``promote`` makes sure they were measured on the same pairs): a mean over
    other datasets is not comparable, so that is an ArtifactError, not a verdict.
    """
    main = cfg.main_metric
    _check_finite(challenger, "challenger")
    if main not in challenger:
        raise ArtifactError(f"challenger metrics lack the main metric {main!r} (have: {sorted(challenger)})")
    if champion is None:
        return Decision(True, "first model: no champion to compare with", main, None)
    _check_finite(champion, "champion")
    if main not in champion:
        raise ArtifactError(f"champion metrics lack the main metric {main!r} (have: {sorted(champion)})")

    if set(champion) != set(challenger):
        # Another set of validation datasets makes another mean: not a comparison at all.
        raise ArtifactError(
            f"champion and challenger were evaluated on different validation sets (only the champion: "
            f"{sorted(set(champion) - set(challenger))}; only the challenger: "
            f"{sorted(set(challenger) - set(champion))}); evaluate both on the same data"
        )
    main_delta = challenger[main] - champion[main]
    deltas = {k: challenger[k] - champion[k] for k in sorted(champion) if k != main}
    regressions = {k: d for k, d in deltas.items() if d < -cfg.tolerance}

    if main_delta <= 0:
        reason = f"{main} did not improve ({challenger[main]:.4g} vs champion {champion[main]:.4g})"
        return Decision(False, reason, main, main_delta, deltas, regressions)
    if regressions:
        worst = ", ".join(f"{k} {d:+.4g}" for k, d in regressions.items())
        reason = f"{main} improved by {main_delta:+.4g} but tasks regressed beyond {cfg.tolerance}: {worst}"
        return Decision(False, reason, main, main_delta, deltas, regressions)
    reason = f"{main} improved by {main_delta:+.4g}; no task regressed beyond {cfg.tolerance}"
    return Decision(True, reason, main, main_delta, deltas, regressions)


# --------------------------------------------------------------------------- registry side


EVAL_RUN_PREFIX = "eval/"  # log_student logs the version's metrics on its run under this prefix


def normalize_metrics(metrics: Metrics) -> dict[str, float]:
    """Metric names as MLflow can store them (``ndcg@10 -> ndcg_10``), so that metrics read back
    from tags compare with fresh ones under the same names."""
    return {metric_key(k): v for k, v in metrics.items()}


def metrics_to_tags(metrics: Metrics) -> dict[str, str]:
    # repr keeps every digit of a float, so a round trip through tags is exact.
    return {f"{METRIC_TAG_PREFIX}{k}": repr(float(v)) for k, v in normalize_metrics(metrics).items()}


def metrics_from_tags(tags: Mapping[str, str]) -> dict[str, float]:
    return {
        k.removeprefix(METRIC_TAG_PREFIX): float(v)
        for k, v in tags.items()
        if k.startswith(METRIC_TAG_PREFIX)
    }


def stored_metrics(client: MlflowClient, model_name: str, version: str) -> dict[str, float]:
    """A version's metrics: its ``metric.*`` tags, else the metrics of the run that logged it."""
    mv = client.get_model_version(model_name, version)
    metrics = metrics_from_tags(mv.tags)
    if not metrics and mv.run_id:
        run_metrics = client.get_run(mv.run_id).data.metrics
        metrics = {
            k.removeprefix(EVAL_RUN_PREFIX): v
            for k, v in run_metrics.items()
            if k.startswith(EVAL_RUN_PREFIX)
        }
    return metrics


def _alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None  # alias not set


def _recorded_decision(client: MlflowClient, model_name: str, version: str, main: str) -> Decision | None:
    tags = client.get_model_version(model_name, version).tags
    if TAG_DECISION not in tags:
        return None
    numbers = json.loads(tags.get(TAG_NUMBERS, "{}"))
    return Decision(
        promote=tags[TAG_DECISION] == "promoted",
        reason=tags.get(TAG_REASON, ""),
        main_metric=numbers.get("main_metric", main),
        main_delta=numbers.get("main_delta"),
        deltas=numbers.get("deltas", {}),
        regressions=numbers.get("regressions", {}),
    )


@dataclass(frozen=True)
class Compared:
    """The two metric sets ``promote`` decides on, and whether the champion had to be measured again."""

    champion: dict[str, float] | None
    challenger: dict[str, float]
    champion_reevaluated: bool = False


def _gather_metrics(
    client: MlflowClient,
    model_name: str,
    challenger_version: str,
    champion_version: str | None,
    eval_fn_or_metrics: EvalFn | Metrics,
    eval_data_id: str | None,
    reevaluate: Reevaluate | None,
) -> Compared:
    """Both metric sets, on the same evaluation data.

    With an evaluation function both versions are (re-)evaluated now, so the data is the same by
    construction. With a metrics mapping the champion's stored metrics are used when they were
    measured on the challenger's data (same ``d2llm.eval_data`` id, or neither recording one:
    metrics from reports older than the id, compared on the caller's word); otherwise
    ``reevaluate`` measures the champion again on the challenger's data (the seed, the sample
    sizes, the validation datasets or the prepared data may all have changed since it was
    registered).
    """
    if callable(eval_fn_or_metrics):
        challenger = normalize_metrics(eval_fn_or_metrics(f"models:/{model_name}/{challenger_version}"))
        champion = None
        if champion_version:
            champion = normalize_metrics(eval_fn_or_metrics(f"models:/{model_name}/{champion_version}"))
        return Compared(champion, challenger)
    challenger = normalize_metrics(eval_fn_or_metrics)
    if champion_version is None:
        return Compared(None, challenger)
    champion = stored_metrics(client, model_name, champion_version)
    champion_data = client.get_model_version(model_name, champion_version).tags.get(TAG_EVAL_DATA)
    if champion and champion_data == eval_data_id:
        return Compared(champion, challenger)
    if reevaluate is None:
        raise ArtifactError(
            f"champion v{champion_version} was evaluated on {champion_data!r}, the challenger on "
            f"{eval_data_id!r}; pass an evaluation function to evaluate both on the same data"
        )
    metrics, data_id = reevaluate(f"models:/{model_name}/{champion_version}")
    if eval_data_id and data_id != eval_data_id:
        raise ArtifactError(
            f"champion v{champion_version} was re-evaluated on {data_id!r}, not on the challenger's "
            f"validation data {eval_data_id!r}: the prepared data or the validation settings changed "
            "after the challenger was evaluated; evaluate it again (`d2llm evaluate`) and register it"
        )
    return Compared(normalize_metrics(metrics), challenger, champion_reevaluated=True)


def _describe(version: str, decision: Decision, against: str | None, reevaluated: bool = False) -> str:
    verdict = "PROMOTED to champion" if decision.promote else "NOT promoted"
    versus = f" against champion v{against}" if against else ""
    again = (
        f" The champion's stored metrics were measured on other validation pairs, so v{against} was "
        "re-evaluated on this version's validation data first."
        if reevaluated
        else ""
    )
    return f"v{version} {verdict}{versus}: {decision.reason}.{again}"


PROMOTION_HEADING = "Promotion: "  # starts the decision's paragraph in a version's description
_DECISION_PARAGRAPH = re.compile(r"(?m)^(Promotion: |v\d+ (PROMOTED|NOT promoted))")


def with_decision(description: str | None, decision_text: str) -> str:
    """A version's description with its promotion paragraph (re)written after what was there:
    the model card summary ``log_student`` registered stays first; an earlier decision is replaced."""
    kept = _DECISION_PARAGRAPH.split(description or "", maxsplit=1)[0].rstrip()
    paragraph = PROMOTION_HEADING + decision_text
    return f"{kept}\n\n{paragraph}" if kept else paragraph


def promote(
    client: MlflowClient,
    model_name: str,
    challenger_version: str | int,
    eval_fn_or_metrics: EvalFn | Metrics,
    promotion_cfg: PromotionConfig,
    eval_data_id: str | None = None,
    reevaluate: Reevaluate | None = None,
) -> Decision:
    """Make ``challenger_version`` the challenger and promote it to champion if it wins.

    ``eval_fn_or_metrics``: the challenger's metrics (measured on ``eval_data_id``), or a function
    that evaluates any version now. ``reevaluate`` measures the champion on the current validation
    data when its stored metrics come from other pairs (see ``_gather_metrics``); the version's
    description then says so.

    Idempotent: the decision depends only on the two metric sets, the tags it writes carry no
    timestamps, and a version that already holds ``champion`` is left alone (its recorded decision
    is returned), so running this twice never promotes twice or rewrites history.
    """
    version = str(challenger_version)
    registered = client.get_model_version(model_name, version)  # fails clearly if it does not exist
    # Compare under stored names: the main metric is looked up the way the tags spell it.
    promotion_cfg = promotion_cfg.model_copy(update={"main_metric": metric_key(promotion_cfg.main_metric)})
    main = promotion_cfg.main_metric
    champion_version = _alias_version(client, model_name, CHAMPION)

    if champion_version == version:
        recorded = _recorded_decision(client, model_name, version, main)
        return recorded or Decision(True, "already champion", main, None)

    client.set_registered_model_alias(model_name, CHALLENGER, version)
    compared = _gather_metrics(
        client, model_name, version, champion_version, eval_fn_or_metrics, eval_data_id, reevaluate
    )
    champion, challenger = compared.champion, compared.challenger
    decision = decide_promotion(champion, challenger, promotion_cfg)

    numbers = json.loads(decision.to_json())
    numbers.update(
        challenger=challenger,
        champion=champion,
        tolerance=promotion_cfg.tolerance,
        champion_reevaluated=compared.champion_reevaluated,
    )
    tags = {
        **metrics_to_tags(challenger),
        TAG_DECISION: "promoted" if decision.promote else "refused",
        TAG_REASON: decision.reason,
        TAG_AGAINST: champion_version or "",
        TAG_NUMBERS: json.dumps(numbers, sort_keys=True),
    }
    if eval_data_id:
        tags[TAG_EVAL_DATA] = eval_data_id
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    decision_text = _describe(version, decision, champion_version, compared.champion_reevaluated)
    client.update_model_version(
        model_name, version, description=with_decision(registered.description, decision_text)
    )

    if decision.promote:
        if champion_version:
            # Keep a one-step rollback target: `models:/NAME@previous-champion`.
            client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, champion_version)
        client.set_registered_model_alias(model_name, CHAMPION, version)
    return decision


def describe_registry(client: MlflowClient, model_name: str) -> dict[str, Any]:
    """Aliases and per-version decisions, for printing by the CLI."""
    model = client.get_registered_model(model_name)
    versions = client.search_model_versions(f"name='{model_name}'")
    return {
        "aliases": dict(model.aliases),
        "versions": {
            str(v.version): {"decision": v.tags.get(TAG_DECISION, ""), "reason": v.tags.get(TAG_REASON, "")}
            for v in sorted(versions, key=lambda v: int(v.version))
        },
    }
