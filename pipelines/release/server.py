"""The gateway process: the FastAPI app (pipelines/serving/gateway.py) wired to params.yaml,
the served model (vLLM behind `paths.routing`) and the model registry it lists on /v1/models.

The registry drives what is served: a reconcile loop (pipelines/release/controller.py) in a
background thread serves the `champion` alias every `serving.reconcile_s`, and at once when
MLflow's webhook (pipelines/release/webhook.py, `POST /webhooks/mlflow`, signed with
`SQLOPS_WEBHOOK_SECRET`) says the alias moved. Its state is part of /health and /metrics.

It sits in the release layer because it joins serving to the registry. Run it with `sqlops
serve` (vLLM too) or `python -m pipelines.release.server` (the container command in infra/).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from fastapi import FastAPI

from pipelines.config import Params, load_params, setup_entry_point
from pipelines.release.controller import ReconcileLoop
from pipelines.release.deploy import Registry
from pipelines.release.registry import CHALLENGER, CHAMPION, list_versions
from pipelines.release.webhook import webhook_router
from pipelines.serving.gateway import create_app
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import RouteWatcher
from pipelines.serving.service import service_from_params
from pipelines.serving.vllm_server import ModelServer


def registry_challenger(p: Params) -> int | None:
    from mlflow import MlflowClient
    from pipelines.release.registry import current_version
    from pipelines.tracking import configure_mlflow

    configure_mlflow(p.mlflow)
    return current_version(MlflowClient(), p.registry.model_name, CHALLENGER)


def gateway(
    p: Params,
    registry_factory: Callable[[], Registry] | None = None,
    server_factory: Callable[[], ModelServer] | None = None,
    catalog: Callable[[], list[dict]] | None = None,
    challenger: Callable[[], int | None] | None = None,
) -> tuple[FastAPI, ReconcileLoop]:
    """The app and its reconcile loop (not started: `loop.start()`); the factories, the
    catalog and the challenger default to MLflow and the configured vLLM (tests pass
    stand-ins)."""
    service = service_from_params(p)
    smoke = service_from_params(p, cache=False)
    loop = ReconcileLoop(
        p,
        smoke,
        registry_factory,
        server_factory,
        challenger=challenger or (lambda: registry_challenger(p)),
        metrics=service.metrics.registry,
    )
    hook = webhook_router(
        loop.trigger,
        p.registry.model_name,
        CHAMPION,
        p.serving.webhook_max_age_s,
        os.environ.get("SQLOPS_WEBHOOK_SECRET") or None,
    )
    app = create_app(
        service,
        InferenceLog(p.serving.inference_log_url),
        RouteWatcher(p.path("routing")),
        catalog=catalog or (lambda: list_versions(p)),
        api_key=os.environ.get("SQLOPS_API_KEY") or None,
        routers=[hook],
        health_extra=loop.health,
        shadow=lambda: loop.shadow,
    )
    return app, loop


def app_from_params(p: Params) -> FastAPI:
    return gateway(p)[0]


def main() -> None:
    import uvicorn

    setup_entry_point()
    p = load_params()
    app, loop = gateway(p)
    loop.start()
    try:
        uvicorn.run(app, host=p.serving.host, port=p.serving.gateway_port)
    finally:
        loop.stop()


if __name__ == "__main__":
    main()
