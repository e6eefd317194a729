"""The report as a picture: each system's gain over the bi-encoder per test set, with its interval."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GAIN_SYSTEMS = ("teacher", "student")  # drawn in this order, when the report has them


def gain_figure(results: dict[str, Any], systems: tuple[str, ...] = GAIN_SYSTEMS) -> Figure | None:
    """A forest plot: per test set (rows), each system's gain over the bi-encoder on the main
    metric (points) with its paired-bootstrap 95% interval; a line at 0 (the bi-encoder).

    ``results`` is what ``evaluate_systems`` returns. None when it holds no intervals (e.g.
    ``evaluation.bootstrap_resamples: 0``, or no bi-encoder). Headless (no display needed).
    """
    from matplotlib.figure import Figure

    rows = [
        (f"{name} ({entry['main_metric']})", entry["vs_bi_encoder"])
        for name, entry in results["datasets"].items()
        if entry.get("vs_bi_encoder")
    ]
    drawn = [s for s in systems if any(s in compared for _, compared in rows)]
    if not drawn:
        return None
    figure = Figure(figsize=(7, 0.6 * len(rows) + 1.4))
    axes = figure.add_subplot()
    step = 0.6 / len(drawn)
    for k, system in enumerate(drawn):
        offset = (k - (len(drawn) - 1) / 2) * step
        points = [(i, compared[system]) for i, (_, compared) in enumerate(rows) if system in compared]
        y = [len(rows) - 1 - i + offset for i, _ in points]
        x = [c["delta"] for _, c in points]
        errors = [
            [c["delta"] - c["ci95"][0] for _, c in points],
            [c["ci95"][1] - c["delta"] for _, c in points],
        ]
        axes.errorbar(x, y, xerr=errors, fmt="o", capsize=3, label=system)
    axes.axvline(0.0, color="grey", linewidth=1)
    axes.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    axes.set_xlabel("gain over the bi-encoder (points), 95% bootstrap interval")
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure
