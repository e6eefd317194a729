"""Scheduled retraining: serve the training flow (followed by promotion) on a weekly cron.

    python -m flows.deploy                 # serve from this process (no worker needed)
    python -m flows.deploy --cron "0 3 * * 1" --timezone Europe/Paris

For a long-lived setup use ``prefect.yaml`` (``prefect deploy --all``) with a process work pool
and a worker instead; README.md has both recipes.
"""

from __future__ import annotations

import argparse

from flows.pipeline import training_pipeline

WEEKLY = "0 3 * * 1"  # Mondays 03:00


def build_deployment(cron: str = WEEKLY, timezone: str = "UTC", params_file: str = "params.yaml"):
    """The weekly retraining deployment (training, then promotion of the new version)."""
    from prefect.schedules import Cron

    return training_pipeline.to_deployment(
        name="weekly-retraining",
        schedule=Cron(cron, timezone=timezone),
        parameters={"params_file": params_file, "promote": True},
        tags=["d2llm", "retraining"],
        description="Retrain the D2LLM student on the current data and promote it if it beats the champion.",
    )


if __name__ == "__main__":
    from prefect import serve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cron", default=WEEKLY)
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    serve(build_deployment(args.cron, args.timezone, args.params))
