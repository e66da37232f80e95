"""LLM judge: asks an OpenAI-compatible model whether generated SQL resolves the question.

As in the seed book's GPT-4 judge, one system message carries the instruction, the DDL, the
question, the reference SQL and the generated SQL; the model answers `{"resolve_yn": "yes"|"no"}`.
An empty reference asks whether the generated SQL answers the question on its own (the teacher's
labels, pipelines/monitoring/teacher.py). The evaluate stage calls `judge(items, cfg,
cache_path)`; the endpoint comes from the environment
(`OPENAI_API_KEY`, `OPENAI_BASE_URL`) and, when neither is set, the judge is skipped with a notice.

Requests run concurrently under a semaphore and optional requests/tokens-per-minute buckets, and
are retried with jittered exponential backoff on rate limits, 5xx, timeouts, connection errors
and malformed replies. Verdicts land in a SQLite cache as they arrive, so a rerun (or a run after
an interruption) pays only for what is still missing. `ChatCalls` (limits, retries, cost, an
optional budget) serves any chat request: the teacher sends its own through it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import openai

from pipelines.config import ChatEndpointConfig, JudgeConfig

log = logging.getLogger(__name__)

RESOLVE_KEY = "resolve_yn"
INSTRUCTION = (
    "You review the output of a Text2SQL system. Given the database schema (DDL) and a question, "
    'decide whether the generated SQL resolves the question. Answer "yes" if the generated SQL '
    "and the reference SQL do the same job, that is, they return the information the question "
    'asks for, and "no" otherwise. Reply with a JSON object that has exactly one key, '
    f'"{RESOLVE_KEY}", whose value is "yes" or "no".'
)
# Section headers of the prompt; tests/fake_openai.py parses the two SQL sections back out.
SECTIONS = ("DDL", "Question", "Reference SQL", "Generated SQL")
COMPLETION_TOKENS_ESTIMATE = 10  # `{"resolve_yn": "no"}` and a little slack, for the TPM bucket
RETRYABLE_STATUS = {408, 409, 429}  # plus every 5xx
MAX_RETRY_AFTER_S = 120.0  # a larger Retry-After is more likely a bug than advice
FATAL_STATUS = {401, 403, 404}  # wrong key, no access, unknown model: no point in trying the rest


# Without a reference (a teacher's label of live traffic): does the SQL answer the question?
LABEL_INSTRUCTION = (
    "You review a label for a Text2SQL training set. Given the database schema (DDL) and a "
    "question, decide whether the generated SQL returns the information the question asks for. "
    'Answer "yes" or "no". Reply with a JSON object that has exactly one key, '
    f'"{RESOLVE_KEY}", whose value is "yes" or "no".'
)


def judge_prompt(ddl: str, question: str, gt_sql: str, gen_sql: str) -> str:
    """The single system message sent for one example; an empty `gt_sql` asks about the
    generated SQL alone (no reference section)."""
    parts = dict(zip(SECTIONS, (ddl, question, gt_sql, gen_sql), strict=True))
    instruction = INSTRUCTION
    if not gt_sql.strip():
        del parts[SECTIONS[2]]
        instruction = LABEL_INSTRUCTION
    body = "\n\n".join(f"### {h}:\n{p.strip()}" for h, p in parts.items())
    return f"{instruction}\n\n{body}\n"


@dataclass
class JudgeItem:
    id: str
    ddl: str
    question: str
    gt_sql: str
    gen_sql: str


@dataclass
class JudgeReport:
    status: Literal["ok", "skipped", "partial"]  # partial: some examples have no verdict
    model: str | None  # judge model; None when skipped
    calls: int = 0  # HTTP requests made in this run, retries included
    unanswered: int = 0  # of those, requests that got no HTTP reply (timeout, connection error)
    cost_usd: float = 0.0  # from the usage of every reply received in this run
    prompt_tokens: int = 0
    completion_tokens: int = 0
    verdicts: dict[str, bool | None] = field(default_factory=dict)  # None: skipped or judge_error
    errors: dict[str, str] = field(default_factory=dict)  # id -> last error after all attempts
    notice: str | None = None  # one line for people when the judge did not run fully
    cached: int = 0  # examples answered from the verdict cache (no call)


class Malformed(ValueError):
    """The reply is not a JSON object with resolve_yn = yes/no."""


class Aborted(RuntimeError):
    """An earlier reply showed that no request can succeed (bad key, unknown model)."""


def parse_verdict(content: str | None) -> bool:
    try:
        answer = json.loads(content or "")[RESOLVE_KEY]
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise Malformed(f"malformed reply: {(content or '')[:80]!r}") from e
    if not isinstance(answer, str) or answer.strip().lower() not in ("yes", "no"):
        raise Malformed(f"malformed reply: {(content or '')[:80]!r}")
    return answer.strip().lower() == "yes"


class VerdictCache:
    """SQLite map sha256(model, prompt) -> verdict and tokens; committed one verdict at a time."""

    def __init__(self, path: Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path)
        self.conn.execute("PRAGMA journal_mode=WAL")  # cheap per-verdict commits
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, model TEXT,"
            " verdict INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
        )

    @staticmethod
    def key(model: str, prompt: str) -> str:
        return hashlib.sha256(f"{model}\0{prompt}".encode()).hexdigest()

    def get(self, key: str) -> bool | None:
        row = self.conn.execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
        return None if row is None else bool(row[0])

    def put(self, key: str, model: str, verdict: bool, prompt_tokens: int, completion_tokens: int):
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?)",
                (key, model, int(verdict), prompt_tokens, completion_tokens, time.time()),
            )

    def close(self) -> None:
        self.conn.close()


class TokenBucket:
    """Allows `per_minute` units a minute, refilled continuously; bursts up to a minute's worth."""

    def __init__(self, per_minute: float):
        self.capacity = float(per_minute)
        self.level = self.capacity
        self.rate = self.capacity / 60.0
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, amount: float = 1.0) -> None:
        amount = min(amount, self.capacity)  # an oversized request must not wait forever
        async with self.lock:  # first come, first served: later requests queue behind
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)


def client_from_env(timeout_s: float) -> openai.AsyncOpenAI | None:
    key, base_url = os.environ.get("OPENAI_API_KEY"), os.environ.get("OPENAI_BASE_URL")
    if not key and not base_url:
        return None
    # Local OpenAI-compatible servers (vLLM) take any key; our own loop does the retries.
    return openai.AsyncOpenAI(
        api_key=key or "EMPTY", base_url=base_url or None, timeout=timeout_s, max_retries=0
    )


def _retry_after(err: openai.APIStatusError) -> float | None:
    headers = err.response.headers
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) / scale)
        except (KeyError, ValueError):
            continue
    return None


class OverBudget(RuntimeError):
    """The request could take the run past its cost budget: it is not sent."""


class ChatCalls:
    """One run's requests to an OpenAI-compatible chat endpoint: the concurrency and rate
    limits, retries with jittered backoff, the abort on a fatal reply, the token counters and
    the cost budget. The judge and the teacher (pipelines/monitoring/teacher.py) share it."""

    def __init__(
        self,
        client: Any,
        cfg: ChatEndpointConfig,
        *,
        backoff_base_s: float,
        backoff_max_s: float,
        api_key: str | None,
        completion_tokens: int = COMPLETION_TOKENS_ESTIMATE,
        max_cost_usd: float | None = None,
        what: str = "judge",
    ):
        self.client, self.cfg, self.what = client, cfg, what
        self.sem = asyncio.Semaphore(max(1, cfg.max_concurrency))
        self.rpm = TokenBucket(cfg.rpm_limit) if cfg.rpm_limit else None
        self.tpm = TokenBucket(cfg.tpm_limit) if cfg.tpm_limit else None
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.completion_tokens_estimate = completion_tokens
        self.max_cost_usd, self.reserved_usd, self.over_budget = max_cost_usd, 0.0, False
        # Placeholder keys of local servers ("EMPTY") are no secret and would garble messages.
        self.secrets = [s for s in (os.environ.get("OPENAI_API_KEY"), api_key) if s and len(s) > 7]
        self.resume_at = 0.0  # a 429 pauses every request until then
        self.fatal: str | None = None
        self.calls = self.unanswered = self.prompt_tokens = self.completion_tokens = 0

    @property
    def cost_usd(self) -> float:
        """What the replies received so far cost, from their usage."""
        return self._cost(self.prompt_tokens, self.completion_tokens)

    def _cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        cfg = self.cfg
        usd = prompt_tokens * cfg.price_per_1k_in + completion_tokens * cfg.price_per_1k_out
        return usd / 1000

    def _backoff(self, attempt: int) -> float:
        d = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return d / 2 + random.uniform(0, d / 2)  # jitter spreads retries of a burst apart

    def _redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text[:300]

    def _reserve(self, prompt_tokens: float) -> float:
        """The most this request may cost, held against the budget until its reply is counted;
        raises OverBudget when it could pass the budget (and so does every later request)."""
        most = self._cost(prompt_tokens, self.completion_tokens_estimate)
        limit = self.max_cost_usd
        if limit is not None and (
            self.over_budget or self.cost_usd + self.reserved_usd + most > limit
        ):
            self.over_budget = True
            raise OverBudget(f"{self.what} budget of ${limit:g} reached")
        self.reserved_usd += most
        return most

    async def _request(
        self, prompt: str, messages: list[dict], parse: Callable, store: Callable, request: dict
    ) -> Any:
        """One HTTP request under the concurrency and rate limits; raises on any failure."""
        async with self.sem:
            if self.fatal:  # checked after the wait for a slot: the abort may be recent
                raise Aborted(self.fatal)
            if (wait := self.resume_at - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            prompt_tokens = len(prompt) / 3.5  # no tiktoken
            held = self._reserve(prompt_tokens)
            try:
                if self.rpm:
                    await self.rpm.take()
                if self.tpm:
                    await self.tpm.take(prompt_tokens + self.completion_tokens_estimate)
                self.calls += 1
                resp = await self.client.chat.completions.create(
                    model=self.cfg.model,
                    messages=messages,
                    timeout=self.cfg.timeout_s,
                    **request,
                )
                usage = resp.usage
                pt, ct = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
                self.prompt_tokens += pt
                self.completion_tokens += ct
            finally:
                self.reserved_usd -= held
        value = parse(resp)
        store(value, pt, ct)
        return value

    async def call(
        self,
        prompt: str,
        parse: Callable[[Any], Any],
        store: Callable[[Any, int, int], None],
        messages: list[dict] | None = None,
        **request: Any,
    ) -> tuple[Any, str | None]:
        """(parse(reply), None), the reply stored with `store(value, prompt_tokens,
        completion_tokens)` as it arrives; or, after the last attempt, (None, error). `prompt`
        is sent as the system message unless `messages` are given; `request`: the API's other
        fields (temperature, n, response_format, ...)."""
        messages = messages or [{"role": "system", "content": prompt}]
        error = "not attempted"
        for attempt in range(1, max(1, self.cfg.max_retries) + 1):
            pause = self._backoff(attempt)
            try:
                return await self._request(prompt, messages, parse, store, request), None
            except (Aborted, OverBudget) as e:
                return None, str(e)
            except Malformed as e:
                error = str(e)
            except openai.APIStatusError as e:
                error = self._redact(f"HTTP {e.status_code}: {e.message}")
                if e.status_code == 429:
                    after = _retry_after(e)
                    pause = pause if after is None else min(after, MAX_RETRY_AFTER_S)
                    self.resume_at = max(self.resume_at, time.monotonic() + pause)
                elif e.status_code not in RETRYABLE_STATUS and e.status_code < 500:
                    if e.status_code in FATAL_STATUS:
                        self.fatal = f"{self.what} aborted: {error}"
                        log.error(self.fatal)
                    return None, error
            except openai.APIError as e:  # connection errors and timeouts, mostly
                self.unanswered += isinstance(e, openai.APIConnectionError)  # timeouts included
                error = self._redact(f"{type(e).__name__}: {e}")
            log.debug("%s attempt %d failed: %s", self.what, attempt, error)
            if attempt < self.cfg.max_retries:
                await asyncio.sleep(pause)
        return None, error


async def judge_async(
    items: list[JudgeItem],
    cfg: JudgeConfig,
    cache_path: Path,
    client: Any | None = None,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
    max_cost_usd: float | None = None,
) -> JudgeReport:
    """`judge` for callers that already run an event loop; with `max_cost_usd`, no request
    that could take the run's cost past it is sent (its example gets an error)."""
    owned = client is None
    client = client_from_env(cfg.timeout_s) if owned else client
    if client is None:
        notice = "LLM judge skipped: set OPENAI_API_KEY and/or OPENAI_BASE_URL to enable it"
        log.warning(notice)
        return JudgeReport("skipped", None, verdicts={i.id: None for i in items}, notice=notice)
    if hasattr(client, "with_options"):  # retries are ours, so every request is counted
        client = client.with_options(max_retries=0, timeout=cfg.timeout_s)

    key_of: dict[str, str] = {}  # item id -> cache key
    prompt_of: dict[str, str] = {}  # cache key -> prompt: equal prompts are paid for once
    for i in items:
        prompt = judge_prompt(i.ddl, i.question, i.gt_sql, i.gen_sql)
        key_of[i.id] = key = VerdictCache.key(cfg.model, prompt)
        prompt_of[key] = prompt
    cache = VerdictCache(cache_path)
    results: dict[str, tuple[bool | None, str | None]]
    results = {k: (v, None) for k in prompt_of if (v := cache.get(k)) is not None}
    todo = {k: p for k, p in prompt_of.items() if k not in results}
    cached = sum(k in results for k in key_of.values())
    log.info(
        "judge %s: %d examples, %d cached, %d to ask", cfg.model, len(items), cached, len(todo)
    )
    api_key = getattr(client, "api_key", None)
    run = ChatCalls(
        client,
        cfg,
        backoff_base_s=backoff_base_s,
        backoff_max_s=backoff_max_s,
        api_key=api_key if isinstance(api_key, str) else None,
        max_cost_usd=max_cost_usd,
    )

    def verdict_of(resp: Any) -> bool:
        return parse_verdict(resp.choices[0].message.content if resp.choices else None)

    async def one(key: str, prompt: str) -> None:
        def store(verdict: bool, pt: int, ct: int) -> None:
            cache.put(key, cfg.model, verdict, pt, ct)

        results[key] = await run.call(
            prompt, verdict_of, store, response_format={"type": "json_object"}, temperature=0
        )

    try:
        await asyncio.gather(*(one(k, p) for k, p in todo.items()))
    finally:
        cache.close()
        if owned:
            await client.close()

    report = JudgeReport("ok", cfg.model, calls=run.calls, unanswered=run.unanswered, cached=cached)
    report.prompt_tokens, report.completion_tokens = run.prompt_tokens, run.completion_tokens
    report.cost_usd = round(run.cost_usd, 6)
    for item_id, key in key_of.items():
        verdict, error = results[key]
        report.verdicts[item_id] = verdict
        if error is not None:
            report.errors[item_id] = error
    if report.errors:
        report.status = "partial"
        report.notice = f"LLM judge: {len(report.errors)} of {len(items)} examples have no verdict"
        log.warning(report.notice)
    log.info(
        "judge done: %d calls (%d without a reply), %d tokens",
        run.calls,
        run.unanswered,
        run.prompt_tokens + run.completion_tokens,
    )
    return report


def judge(items: list[JudgeItem], cfg: JudgeConfig, cache_path: Path, **kwargs: Any) -> JudgeReport:
    """Judge every item (see `judge_async` for the keyword arguments); never raises on API faults.

    A client passed in must not be tied to another event loop: this runs its own.
    """
    coro = judge_async(items, cfg, cache_path, **kwargs)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside a running loop (notebook, async flow): use a fresh loop in a thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
