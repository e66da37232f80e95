"""The Text2SQL gateway (FastAPI): question + db_id in, safe read-only SQL (and rows) out.

POST /v1/sql       {question, db_id, execute?} → prompt (the one `build_prompt`, from the
                   database's DDL) → vLLM OpenAI completions API (the routed adapter) → SQL →
                   guard → optional read-only execution → {request_id, sql, rows?, ...}
POST /v1/feedback  {request_id, verdict? | correct_sql?} attached to the logged request
GET  /v1/models    registry versions with lineage, and the adapter being served
GET  /health       200 when vLLM answers and an adapter is routed, else 503 with the reason
GET  /metrics      Prometheus: requests, latency, guard rejections, cache hits, backend errors
GET  /             the playground page, with /v1/databases[/{db_id}] and /v1/execute
                   (pipelines/serving/playground.py)

Hooks for the layer above (pipelines/release/server.py): `routers` adds endpoints (the MLflow
webhook), `health_extra` a block of /health (served vs registry champion), and `shadow` names
the challenger's route: `serving.shadow_share` of the requests are then answered by it as well,
in a background task after the response, both answers executed and logged as shadow rows.

Every /v1/sql request and its outcome goes to the inference log. `SQLOPS_API_KEY` (env), when
set, is required as `Authorization: Bearer <key>` or `X-API-Key` on /v1/*. The process that
serves it (params.yaml, MLflow, vLLM) is pipelines/release/server.py: run it with `sqlops serve`.
"""

from __future__ import annotations

import hmac
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.playground import playground_router
from pipelines.serving.routing import Route, RouteWatcher
from pipelines.serving.service import Text2SQL
from pipelines.sql import UnsafeSQL, guard

log = logging.getLogger(__name__)


class SQLRequest(BaseModel):
    question: str
    db_id: str
    execute: bool = False
    # "challenger": the registry's challenger answers instead of the served champion (the
    # playground's side-by-side view); 404 when there is none
    version: Literal["champion", "challenger"] = "champion"


class FeedbackRequest(BaseModel):
    request_id: str
    verdict: str | None = None  # "correct" | "wrong"
    correct_sql: str | None = None


def _api_key_check(expected: str | None) -> Callable:
    def check(
        authorization: str | None = Header(default=None), x_api_key: str | None = Header(None)
    ) -> None:
        if expected is None:
            return
        given = x_api_key or (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong API key")

    return check


def create_app(
    service: Text2SQL,
    inference_log: InferenceLog,
    routes: RouteWatcher,
    catalog: Callable[[], list[dict]] | None = None,
    api_key: str | None = None,
    routers: Sequence[APIRouter] = (),
    health_extra: Callable[[], dict] | None = None,
    shadow: Callable[[], Route | None] | None = None,
    challenger: Callable[[], Route | None] | None = None,
) -> FastAPI:
    """The HTTP app around a `Text2SQL` service; `catalog` lists registry versions,
    `challenger` gives the route to the challenger version (None when there is none)."""
    app = FastAPI(title="sqlops gateway", version="1")
    auth = [Depends(_api_key_check(api_key))]
    m = service.metrics
    for router in routers:
        app.include_router(router)

    async def shadow_answers(question: str, db_id: str, routes_: tuple[Route, ...]) -> None:
        """The champion's answer (from the cache) and the challenger's, both executed: the
        live comparison the gate reads. Never affects the user's request."""
        for route in routes_:
            try:
                start = time.perf_counter()
                a = await service.answer(question, db_id, True, route)
                a.row |= {"shadow": True, "latency_ms": (time.perf_counter() - start) * 1000}
                await run_in_threadpool(inference_log.record, **a.row)
            except Exception:
                log.exception("shadow request to %s failed", route.model)

    def shadow_task(req: SQLRequest, route: Route | None, status: str) -> BackgroundTask | None:
        asked = req.version != "champion"  # the caller chose the challenger: nothing to shadow
        challenger = (
            shadow() if shadow and route and not asked and status != "bad_request" else None
        )
        if challenger is None or random.random() >= service.cfg.shadow_share:
            return None
        return BackgroundTask(shadow_answers, req.question, req.db_id, (route, challenger))

    @app.post("/v1/sql", dependencies=auth)
    async def sql(req: SQLRequest) -> JSONResponse:
        start = time.perf_counter()
        route = routes.current()
        if req.version == "challenger":
            try:
                route = await run_in_threadpool(challenger) if challenger else None
            except Exception as e:  # the registry being away is the caller's 503, not a 500
                raise HTTPException(503, f"registry: {e}") from e
            if route is None:
                raise HTTPException(404, "no challenger version to answer with")
        a = await service.answer(req.question, req.db_id, req.execute, route)
        elapsed = time.perf_counter() - start
        a.row["latency_ms"] = elapsed * 1000
        try:
            request_id = await run_in_threadpool(inference_log.record, **a.row)
        except Exception:  # the answer still goes out; the log's failure is reported
            log.exception("inference log write failed")
            request_id = None
        m.requests.labels(a.row["status"]).inc()
        m.latency.observe(elapsed)
        body = {"request_id": request_id, **a.body, "latency_ms": round(elapsed * 1000, 2)}
        background = shadow_task(req, route, a.row["status"])
        return JSONResponse(body, status_code=a.http_status, background=background)

    @app.post("/v1/feedback", dependencies=auth)
    async def feedback(req: FeedbackRequest) -> dict:
        if req.verdict is None and req.correct_sql is None:
            raise HTTPException(400, "give a verdict or a correct_sql")
        if req.verdict is not None and req.verdict not in ("correct", "wrong"):
            raise HTTPException(400, "verdict must be 'correct' or 'wrong'")
        correct_sql = req.correct_sql
        if correct_sql is not None:
            try:
                correct_sql = guard(correct_sql)
            except UnsafeSQL as e:
                raise HTTPException(400, f"correct_sql is not a read-only query: {e}") from e
        found = await run_in_threadpool(
            inference_log.add_feedback, req.request_id, req.verdict, correct_sql
        )
        if not found:
            raise HTTPException(404, f"unknown request_id {req.request_id!r}")
        return {"request_id": req.request_id, "status": "recorded"}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        route = routes.current()
        served = None if route is None else {"name": route.model, "version": route.version}
        try:
            versions = await run_in_threadpool(catalog) if catalog else []
        except Exception as e:  # the registry being away must not take the endpoint down
            return {"served": served, "versions": [], "error": f"registry: {e}"}
        return {"served": served, "versions": versions}

    @app.get("/health")
    async def health() -> JSONResponse:
        route = routes.current()
        reason = await service.backend.health()
        if reason is None and route is None:
            reason = "no model is deployed (run `sqlops deploy`)"
        body = {"status": "ok" if reason is None else "unavailable", "reason": reason}
        body["model"] = route.model if route else None
        if health_extra is not None:
            body["registry"] = health_extra()
        return JSONResponse(body, status_code=200 if reason is None else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(playground_router(service, auth))
    return app
