"""Scheduled retraining: serve the training flow (followed by promotion) on a weekly cron.

    export PREFECT_API_URL=http://127.0.0.1:4200/api   # a running `prefect server start`
    python -m flows.deploy                             # weekly, Mondays 03:00 UTC
    python -m flows.deploy --cron "0 2 * * 0" --timezone Europe/Paris

The process that serves the deployment also runs its flow runs, in the directory it was started
from (the project root: params.yaml, data/, models/ and mlflow/ are relative to it). A schedule
needs a real Prefect server: the temporary server Prefect starts when PREFECT_API_URL is unset
does not run the scheduler, so a schedule served against it would never fire; ``main`` refuses.

For a long-lived setup use ``prefect.yaml`` (``prefect deploy --all``) with the process work
pool ``d2llm-process`` and a worker instead; docs/orchestration.md ("Schedules") has both recipes.
"""

from __future__ import annotations

import argparse
from typing import Any

from d2llm.errors import ConfigError

WEEKLY = "0 3 * * 1"  # Mondays 03:00
DEPLOYMENT_NAME = "weekly-retraining"


def _check_timezone(timezone: str) -> None:
    # Prefect accepts any string here and only fails when the server computes the next run.
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as err:
        raise ConfigError(
            f"unknown schedule timezone {timezone!r} (use an IANA name, e.g. Europe/Paris)"
        ) from err


def build_deployment(cron: str = WEEKLY, timezone: str = "UTC", params_file: str = "params.yaml") -> Any:
    """The weekly retraining deployment (training, then promotion of the new version).

    Returns a ``prefect.deployments.runner.RunnerDeployment`` for ``prefect.serve``; a bad cron
    string or timezone raises ``ConfigError`` here rather than on the server.
    """
    from prefect.schedules import Cron

    from flows.pipeline import training_pipeline

    _check_timezone(timezone)
    try:
        schedule = Cron(cron, timezone=timezone)
    except ValueError as err:
        raise ConfigError(f"bad cron schedule {cron!r}: {err}") from err
    return training_pipeline.to_deployment(
        name=DEPLOYMENT_NAME,
        schedule=schedule,
        parameters={"params_file": params_file, "promote": True},
        concurrency_limit=1,  # two retrainings would write the same outputs and registry
        tags=["d2llm", "retraining"],
        description="Retrain the D2LLM student on the current data and promote it if it beats the champion.",
    )


def require_api_url() -> str:
    """The Prefect API a schedule can live on; ``ConfigError`` when none is configured."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()  # the environment or the active Prefect profile
    if not url:
        raise ConfigError(
            "a schedule needs a Prefect server, and PREFECT_API_URL is not set (Prefect's temporary "
            "server runs no scheduler, so the weekly run would never fire). Start one with "
            "`prefect server start --host 127.0.0.1 --port 4200`, then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` and run this again."
        )
    return url


def main(argv: list[str] | None = None) -> None:
    """Serve the deployment until interrupted; its flow runs execute in this process's directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cron", default=WEEKLY, help=f"cron expression (default {WEEKLY!r}: Mondays 03:00)")
    parser.add_argument("--timezone", default="UTC", help="IANA timezone of the cron expression")
    parser.add_argument(
        "--params", default="params.yaml", help="params file, relative to the current directory"
    )
    args = parser.parse_args(argv)

    deployment = build_deployment(args.cron, args.timezone, args.params)
    require_api_url()
    from prefect import serve

    serve(deployment)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
