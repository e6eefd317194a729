"""Champion/challenger promotion as a Prefect flow.

The registered version becomes ``challenger``; it is compared with ``champion`` on the same
validation pairs (the validate parts of the dev splits of ``evaluation.validation_datasets``;
never the test sets: the champion is re-evaluated when its stored metrics come from other
pairs) and
promoted only if the main metric improves and no task regresses by more than
``promotion.tolerance`` points. The decision and the numbers are written on the model version.
Running it twice changes nothing the second time; the first model ever becomes champion.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from d2llm.config import Params, load_params


@task(name="promote-challenger", retries=2, retry_delay_seconds=5)
def decide_and_promote(params: Params, version: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    from d2llm.tracking.promotion import describe_registry
    from d2llm.tracking.registry import promote_version

    _, decision = promote_version(params, version)
    registry = describe_registry(MlflowClient(), params.tracking.registered_model)
    return {
        "verdict": "promoted" if decision.promote else "refused",
        "reason": decision.reason,
        "aliases": registry.get("aliases", {}),
    }


@flow(name="d2llm-promotion")
def promotion_flow(
    params_file: str = "params.yaml",
    version: str | None = None,
    overrides: dict[str, Any] | None = None,
    params: Params | None = None,
) -> dict[str, Any]:
    """Promote ``version`` (default: the newest registered version) if it beats the champion."""
    from mlflow import MlflowClient

    from d2llm.tracking import configure
    from d2llm.tracking.registry import newest_version

    params = params or load_params(params_file, overrides)
    configure(params.tracking)
    client = MlflowClient()
    name = params.tracking.registered_model
    if version is None:
        version = newest_version(name, client=client)
        if version is None:
            raise RuntimeError(f"no registered versions of {name!r} to promote")
    result = decide_and_promote(params, version)
    get_run_logger().info("%s v%s %s: %s", name, version, result["verdict"], result["reason"])
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=promotion_flow.__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--version")
    args = parser.parse_args()
    print(promotion_flow(params_file=args.params, version=args.version))
