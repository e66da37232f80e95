"""The gateway process: the FastAPI app (pipelines/serving/gateway.py) wired to params.yaml,
the served model (vLLM behind `paths.routing`) and the model registry it lists on /v1/models.

It sits in the release layer because it joins serving to the registry. Run it with `sqlops
serve` (vLLM too) or `python -m pipelines.release.server` (the container command in infra/).
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from pipelines.config import Params, load_params, setup_entry_point
from pipelines.release.registry import list_versions
from pipelines.serving.gateway import create_app
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import RouteWatcher
from pipelines.serving.service import service_from_params


def app_from_params(p: Params) -> FastAPI:
    return create_app(
        service_from_params(p),
        InferenceLog(p.serving.inference_log_url, p.serving.inference_log_timeout_s),
        RouteWatcher(p.path("routing")),
        catalog=lambda: list_versions(p),
        api_key=os.environ.get("SQLOPS_API_KEY") or None,
    )


def main() -> None:
    import uvicorn

    setup_entry_point()
    p = load_params()
    uvicorn.run(app_from_params(p), host=p.serving.host, port=p.serving.gateway_port)


if __name__ == "__main__":
    main()
