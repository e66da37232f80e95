"""The playground: a page where a person tries the served model, and the read-only endpoints it
needs beyond /v1/sql and /v1/feedback. Mounted by `create_app` (pipelines/serving/gateway.py).

GET  /                        the page (playground.html next to this module: plain HTML and
                              vanilla JS, no build step, nothing from another origin); public,
                              its data calls carry the API key like any client
GET  /v1/databases            the prepared databases the gateway answers on, with table counts
GET  /v1/databases/{db_id}    their tables and columns (name, declared type, primary key)
POST /v1/execute {db_id, sql} SQL a person wrote or edited, through the same guard and bounded
                              read-only executor as generated SQL (`Text2SQL.execute`); nothing
                              is logged: a correction is sent with POST /v1/feedback

Open it with `make serve`, then http://127.0.0.1:8080/.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from pipelines.db_schema import columns_of
from pipelines.serving.service import Text2SQL, result_body
from pipelines.sql import UnsafeSQL, guard

# The page talks to its own origin only: no CDN, no exfiltration of keys or rows elsewhere.
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class ExecuteRequest(BaseModel):
    db_id: str
    sql: str


def playground_router(service: Text2SQL, auth: list) -> APIRouter:
    """The page and its read-only data endpoints (`auth`: the gateway's API-key check)."""
    router = APIRouter()
    page = (files("pipelines.serving") / "playground.html").read_text(encoding="utf-8")

    def known(db_id: str) -> None:
        if service.ddl(db_id) is None:  # the same db_id rule as /v1/sql
            raise HTTPException(404, f"unknown db_id {db_id!r}")

    @router.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        headers = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"}
        return HTMLResponse(page, headers=headers)

    @router.get("/v1/databases", dependencies=auth)
    async def databases() -> dict:
        def listing() -> list[dict]:
            out = []
            for path in sorted(service.databases.glob("*.sqlite")):
                if service.ddl(path.stem) is not None:
                    out.append({"db_id": path.stem, "tables": len(columns_of(path))})
            return out

        return {"databases": await run_in_threadpool(listing)}

    @router.get("/v1/databases/{db_id}", dependencies=auth)
    async def database(db_id: str) -> dict:
        known(db_id)
        tables = await run_in_threadpool(columns_of, service.databases / f"{db_id}.sqlite")
        return {"db_id": db_id, "tables": [{"name": t, "columns": c} for t, c in tables.items()]}

    @router.post("/v1/execute", dependencies=auth)
    async def execute(req: ExecuteRequest) -> JSONResponse:
        known(req.db_id)
        try:
            sql = await run_in_threadpool(guard, req.sql)  # parsing can take a while: off the loop
        except UnsafeSQL as e:
            body = {"status": "guard_rejected", "error": str(e), "sql": req.sql}
            return JSONResponse(body, status_code=422)
        res = await run_in_threadpool(service.execute, req.db_id, sql)
        if not res.ok:
            body = {"status": "exec_error", "error": res.error, "sql": sql}
            return JSONResponse(body, status_code=422)
        body = {"status": "ok", "sql": sql, **result_body(res), "seconds": round(res.seconds, 4)}
        return JSONResponse(body)

    return router
