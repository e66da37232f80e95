"""The gateway process: the FastAPI app (pipelines/serving/gateway.py) wired to params.yaml,
the served model (vLLM behind `paths.routing`) and the model registry it lists on /v1/models.

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
from pipelines.release.deploy import MlflowRegistry
from pipelines.release.registry import CHALLENGER, current_version, list_versions
from pipelines.serving.gateway import create_app
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import Route, RouteWatcher, adapter_name
from pipelines.serving.service import service_from_params


def challenger_route(p: Params) -> Callable[[], Route | None]:
    """The registry's `challenger` as a route, for requests that ask for it (the playground's
    side by side). Its adapter is copied out of MLflow once; the gateway loads it into vLLM on
    first use, as it reloads any routed adapter vLLM lacks. None without a challenger, and with
    merged serving (vLLM then holds the champion's merged weights only)."""

    @functools.cache  # made on first use: no MLflow work when the gateway starts
    def registry() -> MlflowRegistry:
        return MlflowRegistry(p)

    def current() -> Route | None:
        if p.serving.merged:
            return None
        name = p.registry.model_name
        version = current_version(registry().client, name, CHALLENGER)
        if version is None:
            return None
        path = registry().adapter_path(version)
        return Route(adapter_name(name, version), version, adapter_path=str(path))

    return current


def app_from_params(p: Params) -> FastAPI:
    return create_app(
        service_from_params(p),
        InferenceLog(p.serving.inference_log_url, p.serving.inference_log_timeout_s),
        RouteWatcher(p.path("routing")),
        catalog=lambda: list_versions(p),
        api_key=os.environ.get("SQLOPS_API_KEY") or None,
        challenger=challenger_route(p),
    )


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
    uvicorn.run(app_from_params(p), host=p.serving.host, port=p.serving.gateway_port)


if __name__ == "__main__":
    main()
