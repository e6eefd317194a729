"""MLflow tracking, the registered pyfunc student and champion/challenger promotion.

- ``runs``: ``configure``, ``pipeline_run`` (parent run), ``stage_run`` (nested), logging helpers;
- ``registry``: ``log_student`` (log the pyfunc model, then register it: all or nothing);
- ``promotion``: ``decide_promotion`` (the pure rule) and ``promote`` (aliases and tags).

MLflow itself is imported inside the functions, so importing this package stays cheap.
"""

from d2llm.tracking.promotion import CHALLENGER, CHAMPION, Decision, decide_promotion, promote
from d2llm.tracking.registry import log_student
from d2llm.tracking.runs import (
    configure,
    log_figure,
    log_metrics_dict,
    log_plots,
    log_table,
    log_training_curve,
    pipeline_run,
    plot_training_curve,
    resolve_tracking_uri,
    stage_run,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "Decision",
    "configure",
    "decide_promotion",
    "log_figure",
    "log_metrics_dict",
    "log_plots",
    "log_student",
    "log_table",
    "log_training_curve",
    "pipeline_run",
    "plot_training_curve",
    "promote",
    "resolve_tracking_uri",
    "stage_run",
]
