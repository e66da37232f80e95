"""The Text2SQL gateway (FastAPI): question + db_id in, safe read-only SQL (and rows) out.

POST /v1/sql       {question, db_id, execute?} → prompt (the one `build_prompt`, from the
                   database's DDL) → vLLM OpenAI completions API (the routed adapter) → SQL →
                   guard → optional read-only execution → {request_id, sql, rows?, ...}
POST /v1/feedback  {request_id, verdict? | correct_sql?} attached to the logged request
GET  /v1/models    registry versions with lineage, and the adapter being served
GET  /health       200 when vLLM answers and an adapter is routed, else 503 with the reason
GET  /metrics      Prometheus: requests, latency, guard rejections, cache hits, backend errors

Every /v1/sql request and its outcome goes to the inference log. `SQLOPS_API_KEY` (env), when
set, is required as `Authorization: Bearer <key>` or `X-API-Key` on /v1/*. Run it with
`sqlops serve` (or `python -m pipelines.serving.gateway`); the vLLM endpoint is
`http://{serving.host}:{serving.vllm_port}/v1` unless `SQLOPS_VLLM_URL` says otherwise.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from pipelines.config import ServingConfig
from pipelines.model.prompt import build_prompt
from pipelines.serving.backend import BackendUnavailable, VLLMCompletions, vllm_url
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import Route, RouteWatcher
from pipelines.sql import UnsafeSQL, ddl_of, execute, extract_sql, guard

log = logging.getLogger(__name__)
_DB_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 60)


def normalise_question(question: str) -> str:
    """Case and whitespace only. Unlike the data de-duplication key, punctuation stays: "price
    > 5" and "price < 5" must not share a cached answer."""
    return " ".join(question.casefold().split())


class ResponseCache:
    """Exact-match LRU of generated SQL keyed by (model version, db_id, normalised question)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> str | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple, sql: str) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = sql
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class GatewayMetrics:
    """Per-app Prometheus registry (several apps in one process, e.g. tests, do not clash)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sqlops_gateway_requests", "SQL requests by outcome", ["status"], registry=r
        )
        self.latency = Histogram(
            "sqlops_gateway_request_seconds",
            "End-to-end latency of /v1/sql",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.guard_rejections = Counter(
            "sqlops_gateway_guard_rejections", "Generated SQL refused by the guard", registry=r
        )
        self.cache_hits = Counter("sqlops_gateway_cache_hits", "Response cache hits", registry=r)
        self.backend_errors = Counter(
            "sqlops_gateway_backend_errors", "vLLM unavailable or failing", registry=r
        )


@dataclass
class Answer:
    """The outcome of one question: HTTP status + body, and the inference-log row."""

    http_status: int
    body: dict[str, Any]
    row: dict[str, Any]


class Text2SQL:
    """The request path without HTTP: shared by the app and the deployment smoke test."""

    def __init__(self, cfg: ServingConfig, databases: Path, tokenizer: Any, backend: Any):
        self.cfg, self.databases, self.tok, self.backend = cfg, databases, tokenizer, backend
        self.cache = ResponseCache(cfg.cache_size)
        self.metrics = GatewayMetrics()
        self._ddl: dict[str, str] = {}

    def ddl(self, db_id: str) -> str | None:
        if db_id not in self._ddl:
            path = self.databases / f"{db_id}.sqlite"
            if not _DB_ID.match(db_id) or not path.is_file():
                return None
            self._ddl[db_id] = ddl_of(path)
        return self._ddl[db_id]

    def _bad(self, row: dict, status: int, reason: str) -> Answer:
        row.update(status="bad_request", error=reason)
        return Answer(status, {"status": "bad_request", "error": reason}, row)

    async def answer(
        self, question: str, db_id: str, run_sql: bool, route: Route | None, use_cache: bool = True
    ) -> Answer:
        row: dict[str, Any] = {"db_id": db_id[:128], "question": question[:10_000]}
        if not question.strip():
            return self._bad(row, 400, "question is empty")
        if len(question) > self.cfg.max_question_chars:
            limit = self.cfg.max_question_chars
            return self._bad(row, 400, f"question is longer than {limit} characters")
        ddl = self.ddl(db_id)
        if ddl is None:
            return self._bad(row, 404, f"unknown db_id {db_id!r}")
        if route is None:
            reason = "no model is deployed (run `sqlops deploy`)"
            row.update(status="backend_error", error=reason)
            return Answer(503, {"status": "backend_error", "error": reason}, row)
        row["model_version"] = route.model
        key = (route.model, db_id, normalise_question(question))
        sql = self.cache.get(key) if use_cache else None
        row["cache_hit"] = sql is not None
        upstream_s = 0.0
        if sql is None:
            try:
                prompt = build_prompt(ddl, question, self.tok)
                start = time.perf_counter()
                text = await self.backend.complete(route.model, prompt, route.adapter_path)
                upstream_s = time.perf_counter() - start
            except BackendUnavailable as e:
                self.metrics.backend_errors.inc()
                row.update(status="backend_error", error=str(e))
                return Answer(503, {"status": "backend_error", "error": str(e)}, row)
            sql = extract_sql(text)
        else:
            self.metrics.cache_hits.inc()
        row["sql"] = sql
        body: dict[str, Any] = {
            "sql": sql,
            "model_version": route.model,
            "cached": row["cache_hit"],
            "upstream_ms": round(upstream_s * 1000, 2),  # time spent waiting on vLLM
        }
        try:
            sql = guard(sql)
        except UnsafeSQL as e:
            # Never executed, never cached: the reason goes back to the caller and the log.
            self.metrics.guard_rejections.inc()
            row.update(status="guard_rejected", error=str(e))
            return Answer(422, body | {"status": "guard_rejected", "error": str(e)}, row)
        if use_cache:
            self.cache.put(key, sql)
        body |= {"sql": sql, "status": "ok"}
        row["status"] = "ok"
        if run_sql:
            res = await run_in_threadpool(
                execute,
                self.databases / f"{db_id}.sqlite",
                sql,
                self.cfg.sql_timeout_s,
                self.cfg.max_rows,
            )
            row["executed"] = True
            if res.ok:
                row["n_rows"] = len(res.rows)
                body |= {"columns": res.columns, "rows": res.rows, "truncated": res.truncated}
            else:
                row.update(status="exec_error", error=res.error)
                body |= {"status": "exec_error", "error": res.error}
        return Answer(200 if row["status"] == "ok" else 422, body, row)


class SQLRequest(BaseModel):
    question: str
    db_id: str
    execute: bool = False


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
) -> FastAPI:
    """The HTTP app around a `Text2SQL` service; `catalog` lists registry versions."""
    app = FastAPI(title="sqlops gateway", version="1")
    auth = [Depends(_api_key_check(api_key))]
    m = service.metrics

    @app.post("/v1/sql", dependencies=auth)
    async def sql(req: SQLRequest) -> JSONResponse:
        start = time.perf_counter()
        a = await service.answer(req.question, req.db_id, req.execute, routes.current())
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
        return JSONResponse(body, status_code=a.http_status)

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
        return JSONResponse(body, status_code=200 if reason is None else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_params() -> FastAPI:
    """The production wiring: params.yaml, the base model's tokenizer, MLflow, vLLM."""
    from transformers import AutoTokenizer

    from pipelines.config import ROOT, load_params
    from pipelines.release.registry import list_versions

    p = load_params()
    cfg = p.serving
    tok = AutoTokenizer.from_pretrained(p.path("base_model"))
    backend = VLLMCompletions(vllm_url(cfg), cfg.request_timeout_s, cfg.max_new_tokens)
    service = Text2SQL(cfg, p.path("prepared") / "databases", tok, backend)
    return create_app(
        service,
        InferenceLog(cfg.inference_log_url),
        RouteWatcher(ROOT / cfg.routing_file),
        catalog=lambda: list_versions(p),
        api_key=os.environ.get("SQLOPS_API_KEY") or None,
    )


def main() -> None:
    import uvicorn

    from pipelines.config import load_params, setup_entry_point

    setup_entry_point()
    cfg = load_params().serving
    uvicorn.run(app_from_params(), host=cfg.host, port=cfg.gateway_port, log_level="info")


if __name__ == "__main__":
    main()
