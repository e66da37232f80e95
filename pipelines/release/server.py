"""The gateway process: the FastAPI app (pipelines/serving/gateway.py) wired to params.yaml,
the served model (vLLM behind `paths.routing`) and the model registry it lists on /v1/models.

It sits in the release layer because it joins serving to the registry. Run it with `sqlops
serve` (vLLM too) or `python -m pipelines.release.server` (the container command in infra/).
"""

from __future__ import annotations

import functools
import os
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
        InferenceLog(p.serving.inference_log_url),
        RouteWatcher(p.path("routing")),
        catalog=lambda: list_versions(p),
        api_key=os.environ.get("SQLOPS_API_KEY") or None,
        challenger=challenger_route(p),
    )


def main() -> None:
    import uvicorn

    setup_entry_point()
    p = load_params()
    uvicorn.run(app_from_params(p), host=p.serving.host, port=p.serving.gateway_port)


if __name__ == "__main__":
    main()
