"""The gateway process: the FastAPI app (pipelines/serving/gateway.py) wired to params.yaml,
the served model (vLLM behind `paths.routing`) and the model registry it lists on /v1/models.

The registry drives what is served: a reconcile loop (pipelines/release/controller.py) in a
background thread serves the `champion` alias every `serving.reconcile_s`, and at once when
MLflow's webhook (pipelines/release/webhook.py, `POST /webhooks/mlflow`, signed with
`SQLOPS_WEBHOOK_SECRET`) says the alias moved. Its state is part of /health and /metrics.

It sits in the release layer because it joins serving to the registry. Run it with `sqlops
serve` (vLLM too) or `python -m pipelines.release.server` (the container command in infra/).
Bound to anything but loopback it refuses to start without `SQLOPS_API_KEY`, unless told
explicitly that an open gateway is meant: `--insecure` or `SQLOPS_ALLOW_INSECURE=1`.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import sys
from collections.abc import Callable

from fastapi import FastAPI

from pipelines.config import Params, load_params, setup_entry_point
from pipelines.release.controller import ReconcileLoop
from pipelines.release.deploy import MlflowRegistry, Registry, served_route
from pipelines.release.registry import CHALLENGER, CHAMPION, current_version, list_versions
from pipelines.release.webhook import webhook_router
from pipelines.serving.gateway import create_app
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import Route, RouteWatcher, adapter_name, read_route, shares_base
from pipelines.serving.service import service_from_params
from pipelines.serving.vllm_server import ModelServer, serves_merged


def challenger_route(p: Params) -> Callable[[], Route | None]:
    """The registry's `challenger` as a route, for requests that ask for it (the playground's
    side by side). Its adapter is copied out of MLflow once; the gateway loads it into vLLM on
    first use, as it reloads any routed adapter vLLM lacks. None without a challenger, with
    merged serving (vLLM then holds the champion's merged weights only), and for a challenger
    on another base model than the served one (vLLM serves one base)."""

    @functools.cache  # made on first use: no MLflow work when the gateway starts
    def registry() -> MlflowRegistry:
        return MlflowRegistry(p)

    def current() -> Route | None:
        if serves_merged(p):
            return None
        name = p.registry.model_name
        version = current_version(registry().client, name, CHALLENGER)
        if version is None:
            return None
        base = registry().base_path(version)
        if not shares_base(read_route(p.path("routing")), base):
            return None
        path = registry().adapter_path(version)
        return served_route(p, adapter_name(name, version), version, path, base)

    return current


def registry_challenger(p: Params) -> int | None:
    """The challenger's version (shadow traffic), read afresh on every reconcile."""
    return current_version(MlflowRegistry(p).client, p.registry.model_name, CHALLENGER)


def gateway(
    p: Params,
    registry_factory: Callable[[], Registry] | None = None,
    server_factory: Callable[[], ModelServer] | None = None,
    catalog: Callable[[], list[dict]] | None = None,
    challenger_version: Callable[[], int | None] | None = None,
) -> tuple[FastAPI, ReconcileLoop]:
    """The app and its reconcile loop (not started: `loop.start()`); the factories, the
    catalog and the challenger's version default to MLflow and the configured vLLM (tests pass
    stand-ins)."""
    service = service_from_params(p)
    smoke = service_from_params(p, cache=False)
    loop = ReconcileLoop(
        p,
        smoke,
        registry_factory,
        server_factory,
        challenger=challenger_version or (lambda: registry_challenger(p)),
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
        InferenceLog(p.serving.inference_log_url, p.serving.inference_log_timeout_s),
        RouteWatcher(p.path("routing")),
        catalog=catalog or (lambda: list_versions(p)),
        api_key=os.environ.get("SQLOPS_API_KEY") or None,
        challenger=challenger_route(p),
        routers=[hook],
        health_extra=loop.health,
        shadow=lambda: loop.shadow,
    )
    return app, loop


def app_from_params(p: Params) -> FastAPI:
    """The app alone (its reconcile loop not running: `main` starts both)."""
    return gateway(p)[0]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_problem(host: str, api_key: str | None, insecure: bool) -> str | None:
    """Why the gateway must not start on `host`, or None: off loopback it needs an API key,
    unless the operator opted in to an open gateway."""
    if is_loopback(host) or api_key or insecure:
        return None
    return (
        f"refusing to serve on {host} without SQLOPS_API_KEY: anyone who reaches it could run "
        "queries and write feedback. Set SQLOPS_API_KEY, bind 127.0.0.1 (serving.host), or "
        "pass --insecure / SQLOPS_ALLOW_INSECURE=1 if an open gateway is really meant."
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="the sqlops gateway process")
    parser.add_argument(
        "--insecure", action="store_true", help="serve off loopback without SQLOPS_API_KEY"
    )
    args = parser.parse_args(argv)
    setup_entry_point()
    p = load_params()
    insecure = args.insecure or os.environ.get("SQLOPS_ALLOW_INSECURE") == "1"
    problem = exposure_problem(p.serving.host, os.environ.get("SQLOPS_API_KEY"), insecure)
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)
    app, loop = gateway(p)
    loop.start()
    try:
        uvicorn.run(app, host=p.serving.host, port=p.serving.gateway_port)
    finally:
        loop.stop()


if __name__ == "__main__":
    main()
