"""The teachers of the data flywheel, and their answer cache (pipelines/monitoring/teacher.py).

- `ApiTeacher`: any OpenAI-compatible chat endpoint (`OPENAI_BASE_URL` / `OPENAI_API_KEY`; a
  GPT-4-class model in production): k answers per question in one request (`n`), the one
  prompt as the user's message, through the judge's `ChatCalls` (concurrency and rate limits,
  retries with backoff, cost from the replies' usage, the `teacher.max_cost_usd` budget).
- `LocalTeacher`: without a key, the champion the gateway serves, asked as the gateway asks it
  (its vLLM backend, the chat-formatted prompt, the decoding's engine requests) for
  `teacher.local_samples` candidates (greedy + sampled) under the schema grammar.
- `ask_all`: every question's answers, from the `SampleCache` where it has them; a reply is
  cached the moment it is counted, so a rerun after a timeout or a 5xx pays for nothing twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import Params, TeacherConfig
from pipelines.eval.judge import ChatCalls, Malformed, client_from_env
from pipelines.model.decoding import engine_requests, grammar_for
from pipelines.model.prompt import build_prompt
from pipelines.monitoring.doubtful import Pick


class SampleCache:
    """SQLite map sha256(teacher, prompt, k, temperature) → the answers (JSON) and tokens."""

    def __init__(self, path: Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, teacher TEXT,"
            " answers TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
        )

    @staticmethod
    def key(teacher: str, prompt: str, k: int, temperature: float) -> str:
        return hashlib.sha256(f"{teacher}\0{k}\0{temperature}\0{prompt}".encode()).hexdigest()

    def get(self, key: str) -> list | None:
        row = self.conn.execute("SELECT answers FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, teacher: str, answers: list, pt: int, ct: int) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                (key, teacher, json.dumps(answers), pt, ct, time.time()),
            )

    def close(self) -> None:
        self.conn.close()


@dataclass
class Question:
    """One pick, ready for a teacher: its prompt and (local teacher) engine requests."""

    pick: Pick
    ddl: str  # the database's whole prompt DDL (the record's; prepare fits it again)
    prompt: str
    requests: list[dict] = field(default_factory=list)


class ApiTeacher:
    """An OpenAI-compatible chat endpoint: k answers in one request (`n`), the prompt as the
    user's message; retries, rate limits, cost and the budget are the judge's `ChatCalls`."""

    kind = "api"

    def __init__(self, cfg: TeacherConfig, client: Any, **backoff: float):
        self.cfg, self.name, self.k = cfg, cfg.model, cfg.samples
        api_key = getattr(client, "api_key", None)
        if hasattr(client, "with_options"):  # retries are ours, so every request is counted
            client = client.with_options(max_retries=0, timeout=cfg.timeout_s)
        self.calls = ChatCalls(
            client,
            cfg,
            backoff_base_s=backoff.get("backoff_base_s", 1.0),
            backoff_max_s=backoff.get("backoff_max_s", 60.0),
            api_key=api_key if isinstance(api_key, str) else None,
            completion_tokens=cfg.samples * cfg.max_tokens,
            max_cost_usd=cfg.max_cost_usd,
            what="teacher",
        )

    def prompt(self, schema: str, question: str) -> str:
        return build_prompt(schema, question)

    def requests(self, prompt: str, db_path: Path) -> list[dict]:
        return []

    async def answers(self, q: Question, store: Any) -> tuple[list | None, str | None]:
        def parse(resp: Any) -> list:
            texts = [c.message.content for c in resp.choices or [] if c.message.content]
            if not texts:
                raise Malformed("the teacher's reply holds no answer")
            return [[t, None] for t in texts]

        return await self.calls.call(
            q.prompt,
            parse,
            store,
            messages=[{"role": "user", "content": q.prompt}],
            n=self.k,
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
        )

    @property
    def cost_usd(self) -> float:
        return self.calls.cost_usd

    @property
    def n_calls(self) -> int:
        return self.calls.calls


class LocalTeacher:
    """The served champion on vLLM, asked as the gateway asks it (its backend, chat-formatted
    prompt, decoding requests) for `local_samples` candidates under the schema grammar."""

    kind = "local"

    def __init__(self, p: Params, route: Any, tokenizer: Any, backend: Any):
        cfg = p.teacher
        self.cfg, self.route, self.tok, self.backend = cfg, route, tokenizer, backend
        self.name, self.k = route.model, cfg.local_samples
        self.max_tokens = p.serving.max_new_tokens
        self.decoding = p.decoding.model_copy(
            update={"n": cfg.local_samples, "temperature": cfg.temperature, "grammar": True}
        )
        self.sem = asyncio.Semaphore(max(1, cfg.max_concurrency))
        self.cost_usd, self.n_calls = 0.0, 0

    def prompt(self, schema: str, question: str) -> str:
        return build_prompt(schema, question, self.tok)

    def requests(self, prompt: str, db_path: Path) -> list[dict]:
        ids = self.tok(prompt, add_special_tokens=False).input_ids
        return engine_requests(
            ids, grammar_for(db_path, self.decoding), self.decoding, self.max_tokens
        )

    async def answers(self, q: Question, store: Any) -> tuple[list | None, str | None]:
        from pipelines.serving.backend import BackendUnavailable

        error = "not attempted"
        async with self.sem:
            for attempt in range(max(1, self.cfg.max_retries)):
                self.n_calls += 1
                try:
                    cands = await self.backend.candidates(
                        self.route.model, q.prompt, q.requests, self.route.adapter_path
                    )
                except BackendUnavailable as e:
                    error = str(e)
                    await asyncio.sleep(min(30.0, 2.0**attempt))
                    continue
                value = [[c.text, c.logprob] for c in cands]
                store(value, 0, 0)
                return value, None
        return None, error


async def ask_all(
    teacher: ApiTeacher | LocalTeacher, questions: list[Question], cache: SampleCache
) -> tuple[dict[str, list | None], int, dict[str, str]]:
    """(answers by request id, None where there are none this run; how many came from the
    cache; why each missing one is missing)."""
    answers: dict[str, list | None] = {}
    errors: dict[str, str] = {}
    cached = 0

    async def one(q: Question) -> None:
        nonlocal cached
        key = SampleCache.key(teacher.name, q.prompt, teacher.k, teacher.cfg.temperature)
        if (hit := cache.get(key)) is not None:
            cached += 1
            answers[q.pick.request_id] = hit
            return

        def store(value: list, pt: int, ct: int) -> None:
            cache.put(key, teacher.name, value, pt, ct)

        value, error = await teacher.answers(q, store)
        answers[q.pick.request_id] = value
        if value is None:
            errors[q.pick.request_id] = error or "no answer"

    await asyncio.gather(*(one(q) for q in questions))
    return answers, cached, errors


def teacher_from_params(p: Params) -> ApiTeacher | LocalTeacher:
    """`teacher.endpoint`: the API when asked for or (auto) when OPENAI_API_KEY or
    OPENAI_BASE_URL is set; else the local teacher, the champion the gateway serves."""
    cfg = p.teacher
    client = client_from_env(cfg.timeout_s) if cfg.endpoint != "local" else None
    if client is not None:
        return ApiTeacher(cfg, client)
    if cfg.endpoint == "api":
        raise ValueError("teacher.endpoint is api: set OPENAI_BASE_URL and/or OPENAI_API_KEY")
    from transformers import AutoTokenizer

    from pipelines.serving.backend import VLLMCompletions, vllm_url
    from pipelines.serving.routing import read_route

    route = read_route(p.path("routing"))
    if route is None:
        raise ValueError(
            "no teacher: set OPENAI_BASE_URL (any OpenAI-compatible endpoint) or serve the "
            "champion (`sqlops serve --background`) for the local teacher"
        )
    # The version's own base model where the route names one (its tokenizer builds the prompt).
    base = getattr(route, "base_path", None) or p.path("base_model")
    backend = VLLMCompletions(
        vllm_url(p.serving), p.serving.request_timeout_s * 4, p.serving.max_new_tokens
    )
    return LocalTeacher(p, route, AutoTokenizer.from_pretrained(base), backend)
