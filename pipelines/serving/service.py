"""The request path without HTTP: question + db_id → prompt → model server (the decoding's
candidates, pipelines/model/decoding.py: grammar, n, choice by execution) → SQL → guard →
optional bounded read-only execution, with an exact-match response cache and Prometheus metrics.

`Text2SQL.answer(...)` returns an `Answer` (HTTP status, body, inference-log row); the gateway
(pipelines/serving/gateway.py) wraps it in FastAPI, and the deployment smoke test
(pipelines/release/deploy.py) calls it directly, so both judge a version the same way.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.concurrency import run_in_threadpool

from pipelines.config import DecodingConfig, Params, ServingConfig
from pipelines.data.records import valid_db_id
from pipelines.data.schema_fit import prompt_ddl
from pipelines.db_schema import ddl_of
from pipelines.model.decoding import GREEDY, choose, engine_requests, grammar_for
from pipelines.model.prompt import build_prompt
from pipelines.serving.backend import BackendUnavailable, VLLMCompletions, vllm_url
from pipelines.serving.guardrails import Guardrails, guardrails_from_params
from pipelines.serving.routing import Route
from pipelines.sql import ExecResult, UnsafeSQL, execute, guard, json_rows

log = logging.getLogger(__name__)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 60)


def loggable(text: str) -> str:
    """Text the log (UTF-8) can store: lone surrogates, which JSON can carry but UTF-8 cannot,
    become backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def has_lone_surrogate(text: str) -> bool:
    # JSON's "\ud83d\ude00" pairs decode to one code point: any surrogate left is a lone one.
    return any("\ud800" <= c <= "\udfff" for c in text)


class DatabaseUnavailable(RuntimeError):
    """A database file exists but cannot be read right now (empty, truncated, being replaced)."""


def casefold_question(question: str) -> str:
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
        # Guardrails (pipelines/serving/guardrails.py): what was masked before storage, what was
        # refused before the model, and the semantic cache's hits and refused neighbours.
        self.pii_masked = Counter(
            "sqlops_gateway_pii_masked", "Personal data masked in stored questions", ["type"],
            registry=r,
        )  # fmt: skip
        self.off_topic = Counter(
            "sqlops_gateway_off_topic", "Questions refused before the model", ["kind"], registry=r
        )
        self.semantic_hits = Counter(
            "sqlops_gateway_semantic_cache_hits", "Semantic cache hits", registry=r
        )
        self.semantic_refused = Counter(
            "sqlops_gateway_semantic_cache_refused",
            "Close cached questions refused by the literal checks", ["why"], registry=r,
        )  # fmt: skip


def result_body(res: ExecResult) -> dict[str, Any]:
    """The rows of an executed query as the API returns them (/v1/sql and /v1/execute): inf/nan
    and blobs, which JSON cannot carry, as "inf"/"nan" and hex text."""
    return {"columns": res.columns, "rows": json_rows(res.rows), "truncated": res.truncated}


@dataclass
class Answer:
    """The outcome of one question: HTTP status + body, and the inference-log row."""

    http_status: int
    body: dict[str, Any]
    row: dict[str, Any]


class Text2SQL:
    """The request path without HTTP: shared by the app and the deployment smoke test."""

    def __init__(
        self,
        cfg: ServingConfig,
        databases: Path,
        tokenizer: Any,
        backend: Any,
        decoding: DecodingConfig = GREEDY,
        guardrails: Guardrails | None = None,
    ):
        # `tokenizer`: the configured base model's, for routes that name no base of their own
        self.cfg, self.databases, self.tok, self.backend = cfg, databases, tokenizer, backend
        self._toks: dict[str, Any] = {}  # base-model folder -> its tokenizer (one per base)
        self.decoding = decoding  # params.yaml `decoding:`, as evaluation decodes
        self.cache = ResponseCache(cfg.cache_size)
        self.metrics = GatewayMetrics()
        self.guardrails = guardrails  # masking, refusals, semantic cache (None: none of them)
        # db_id → (file identity when read, DDL): a database replaced on disk (a new `prepare`)
        # is read again; an empty or unreadable one is never cached.
        self._ddl: dict[str, tuple[tuple, str]] = {}

    def ddl(self, db_id: str) -> str | None:
        """The prompt DDL of a database; None for an unknown db_id. Raises
        `DatabaseUnavailable` for a file that is empty or unreadable (being rebuilt)."""
        if not valid_db_id(db_id):
            return None
        path = self.databases / f"{db_id}.sqlite"
        try:
            st = os.stat(path)
        except OSError:
            return None
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._ddl.get(db_id)
        if cached and cached[0] == identity:
            return cached[1]
        try:
            ddl = ddl_of(path, self.cfg.sample_values)
        except (OSError, sqlite3.Error) as e:
            raise DatabaseUnavailable(f"database {db_id} cannot be read right now: {e}") from e
        if not ddl:
            raise DatabaseUnavailable(f"database {db_id} has no tables right now (being rebuilt?)")
        self._ddl[db_id] = (identity, ddl)
        return ddl

    async def tokenizer(self, route: Route) -> Any:
        """The tokenizer of the routed version's base model (read once per base)."""
        if route.base_path is None:
            return self.tok
        if route.base_path not in self._toks:
            from transformers import AutoTokenizer

            try:
                tok = await run_in_threadpool(AutoTokenizer.from_pretrained, route.base_path)
            except OSError as e:
                raise BackendUnavailable(f"base model of {route.model} unreadable: {e}") from e
            self._toks[route.base_path] = tok
        return self._toks[route.base_path]

    def execute(self, db_id: str, sql: str) -> ExecResult:
        """Guarded, bounded, read-only execution on a known database: generated SQL and SQL a
        person edited in the playground go through this one path."""
        path = self.databases / f"{db_id}.sqlite"
        return execute(path, sql, self.cfg.sql_timeout_s, self.cfg.max_rows)

    def _bad(self, row: dict, status: int, reason: str) -> Answer:
        row.update(status="bad_request", error=reason)
        return Answer(status, {"status": "bad_request", "error": reason}, row)

    async def answer(
        self, question: str, db_id: str, run_sql: bool, route: Route | None, use_cache: bool = True
    ) -> Answer:
        """The answer to one question; with guardrails, its log row carries no personal data
        (the prompt and the executed SQL keep it)."""
        a = await self._answer(question, db_id, run_sql, route, use_cache)
        if self.guardrails is not None:
            for kind, n in self.guardrails.mask_row(a.row, question).items():
                self.metrics.pii_masked.labels(kind).inc(n)
        return a

    async def _answer(
        self, question: str, db_id: str, run_sql: bool, route: Route | None, use_cache: bool
    ) -> Answer:
        row: dict[str, Any] = {
            "db_id": loggable(db_id)[:128],
            "question": loggable(question)[:10_000],
        }
        if not question.strip():
            return self._bad(row, 400, "question is empty")
        if len(question) > self.cfg.max_question_chars:
            limit = self.cfg.max_question_chars
            return self._bad(row, 400, f"question is longer than {limit} characters")
        if has_lone_surrogate(question):
            return self._bad(row, 400, "question is not valid Unicode text (a lone surrogate)")
        try:
            ddl = self.ddl(db_id)
        except DatabaseUnavailable as e:
            row.update(status="backend_error", error=str(e))
            return Answer(503, {"status": "backend_error", "error": str(e)}, row)
        if ddl is None:
            return self._bad(row, 404, f"unknown db_id {row['db_id']!r}")
        if route is None:
            reason = "no model is deployed (run `sqlops deploy`)"
            row.update(status="backend_error", error=reason)
            return Answer(503, {"status": "backend_error", "error": reason}, row)
        row["model_version"] = route.model
        key = (route.model, db_id, casefold_question(question))
        sql = self.cache.get(key) if use_cache else None
        row["cache_hit"] = sql is not None
        upstream_s, chosen = 0.0, {}
        screen = None
        if sql is None and self.guardrails is not None:
            screen = await run_in_threadpool(
                self.guardrails.screen, question, db_id, self.databases / f"{db_id}.sqlite", ddl,
                route.model, use_cache,
            )  # fmt: skip
            if screen.refusal:
                self.metrics.off_topic.labels(screen.kind).inc()
                row.update(status="off_topic", error=screen.refusal)
                body = {"status": "off_topic", "error": screen.refusal}
                body |= {"model_version": route.model, "relevance": screen.relevance}
                return Answer(422, body, row)
            if screen.miss_reason:
                self.metrics.semantic_refused.labels(screen.miss_reason).inc()
            if screen.hit is not None:
                sql, row["cache_hit"] = screen.hit.sql, True
                chosen = {"cache": "semantic", "similarity": round(screen.hit.similarity, 4)}
        if sql is None:
            db_path = self.databases / f"{db_id}.sqlite"
            try:
                tok = await self.tokenizer(route)
                schema = await run_in_threadpool(  # a value index may be built first
                    prompt_ddl,
                    ddl,
                    question,
                    self.cfg.max_ddl_chars,
                    db_path,
                    inferred=self.cfg.inferred_joins,
                    value_links=self.cfg.value_links,
                )
                prompt = build_prompt(schema, question, tok)
                ids = tok(prompt, add_special_tokens=False).input_ids
                grammar = grammar_for(db_path, self.decoding)
                requests = engine_requests(ids, grammar, self.decoding, self.cfg.max_new_tokens)
                start = time.perf_counter()
                cands = await self.backend.candidates(
                    route.model, prompt, requests, route.adapter_path, route.base_path
                )
                upstream_s = time.perf_counter() - start
            except BackendUnavailable as e:
                self.metrics.backend_errors.inc()
                row.update(status="backend_error", error=str(e))
                return Answer(503, {"status": "backend_error", "error": str(e)}, row)
            choice = await run_in_threadpool(
                choose, cands, db_path, self.decoding, self.cfg.sql_timeout_s
            )
            sql = choice.sql
            chosen = {"candidates": choice.n_candidates, "candidates_executed": choice.n_executed}
            chosen["fallback"] = choice.fallback  # several candidates, none ran: best-scoring
            row["fallback"] = choice.fallback  # the log keeps the decoding's doubts (teacher)
            if choice.n_agree is not None:
                row["agreement"] = choice.n_agree / choice.n_candidates
            if choice.fallback:
                log.warning(
                    "no candidate of %d executed for %s: answering the best-scoring one",
                    choice.n_candidates, db_id,
                )  # fmt: skip
        else:
            self.metrics.cache_hits.inc()
            if screen is not None and screen.hit is not None:
                self.metrics.semantic_hits.inc()
        row["sql"] = sql
        body: dict[str, Any] = {
            "sql": sql,
            "model_version": route.model,
            "cached": row["cache_hit"],
            "upstream_ms": round(upstream_s * 1000, 2),  # time spent waiting on vLLM
            **chosen,
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
            res = await run_in_threadpool(self.execute, db_id, sql)
            row["executed"] = True
            if res.ok:
                row["n_rows"] = len(res.rows)
                body |= result_body(res)
            else:
                row.update(status="exec_error", error=res.error)
                body |= {"status": "exec_error", "error": res.error}
        if screen is not None and row["status"] == "ok":
            self.guardrails.remember(screen, sql)
        return Answer(200 if row["status"] == "ok" else 422, body, row)


def service_from_params(p: Params, cache: bool = True) -> Text2SQL:
    """The request path as served: the configured base model's tokenizer (a route naming its
    version's base uses that one's), the configured vLLM server, the prepared databases;
    `cache=False` for the smoke test (every canary really generates, and the model alone is
    judged: no guardrails)."""
    from transformers import AutoTokenizer

    cfg = p.serving if cache else p.serving.model_copy(update={"cache_size": 0})
    tok = AutoTokenizer.from_pretrained(p.path("base_model"))
    backend = VLLMCompletions(vllm_url(cfg), cfg.request_timeout_s, cfg.max_new_tokens)
    guardrails = guardrails_from_params(p) if cache else None
    databases = p.path("prepared") / "databases"
    return Text2SQL(cfg, databases, tok, backend, p.decoding, guardrails)
