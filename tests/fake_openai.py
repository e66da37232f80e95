"""A real OpenAI-compatible chat server on 127.0.0.1 for judge tests, with fault injection.

`with FakeOpenAI(Faults(rate_429=0.1)) as fake:` serves `POST /v1/chat/completions` with uvicorn
in a background thread on a free port; `fake.base_url` is what `OPENAI_BASE_URL` should hold.
The verdict is predictable: it parses the reference and generated SQL out of the judge prompt and
answers "yes" iff they are equal after whitespace/case normalisation (and a trailing `;`); a
teacher prompt (the project's, ending in `### SQL:`) gets the answers listed for its question.
Faults are drawn from a hash of (seed, prompt, how often the prompt was seen), so a run is
reproducible whatever the concurrency, and every reply is recorded in `served` / `ok_by_prompt`.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipelines.eval.judge import SECTIONS
from tests.loopback import LoopbackServer

MALFORMED_REPLIES = ("maybe", '{"answer": 1}', '{"resolve_yn": "perhaps"}')


@dataclass
class Faults:
    rate_429: float = 0.0  # share of requests answered 429 with Retry-After: `retry_after_s`
    rate_500: float = 0.0  # share answered 500
    rate_slow: float = 0.0  # share answered only after `slow_s` (beyond the client's timeout)
    rate_malformed: float = 0.0  # share answered 200 with content that is not a verdict
    slow_s: float = 2.0
    retry_after_s: float = 0.0
    seed: int = 0
    fail_marker: str | None = None  # prompts containing it always get a 500 (exhaust retries)
    slow_marker: str | None = None  # prompts containing it are always answered too late
    api_key: str | None = None  # when set, other keys get a 401 that echoes the key sent


def _section(prompt: str, name: str) -> str:
    m = re.search(rf"^### {re.escape(name)}:\n(.*?)(?=^### |\Z)", prompt, re.S | re.M)
    return m.group(1).strip() if m else ""


def _norm(sql: str) -> str:
    return " ".join(sql.split()).lower().rstrip(";").strip()


def expected_verdict(gt_sql: str, gen_sql: str) -> bool:
    """What the fake answers for a pair: the tests' oracle."""
    return _norm(gt_sql) == _norm(gen_sql)


class FakeOpenAI:
    """The server, its fault plan (mutable between runs) and its record of what it served."""

    def __init__(
        self,
        faults: Faults | None = None,
        teacher: dict[str, list[str]] | None = None,
        reject_labels: set[str] = frozenset(),
    ):
        self.faults = faults or Faults()
        # A teacher prompt (`### SQL:` last, pipelines/model/prompt.py): question → its answers,
        # the `n` choices cycling through them ("SELECT 1" for an unknown question).
        self.teacher = teacher or {}
        # A judge prompt without a reference (a teacher's label): "yes" unless the SQL is here.
        self.reject_labels = {_norm(s) for s in reject_labels}
        self.served: Counter[str] = Counter()  # by outcome: ok, 429, 500, slow, malformed, 401
        self.ok_by_prompt: Counter[str] = Counter()  # verdicts actually delivered, per prompt
        self.requests_by_prompt: Counter[str] = Counter()
        self.request_params: list[dict[str, Any]] = []  # everything but the messages
        self.app = self._build_app()
        self._server: LoopbackServer | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _fault(self, prompt: str) -> str:
        f = self.faults
        if f.fail_marker and f.fail_marker in prompt:
            return "500"
        if f.slow_marker and f.slow_marker in prompt:
            return "slow"
        seen = self.requests_by_prompt[prompt]
        digest = hashlib.sha256(f"{f.seed}:{seen}:{prompt}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        for name, rate in (("429", f.rate_429), ("500", f.rate_500), ("slow", f.rate_slow)):
            if u < rate:
                return name
            u -= rate
        return "malformed" if u < f.rate_malformed else "ok"

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            key = request.headers.get("authorization", "").removeprefix("Bearer ")
            if self.faults.api_key is not None and key != self.faults.api_key:
                self.served["401"] += 1
                return _error(401, f"Incorrect API key provided: {key}")
            prompt = "\n".join(m.get("content") or "" for m in body.get("messages", []))
            self.request_params.append({k: v for k, v in body.items() if k != "messages"})
            outcome = self._fault(prompt)
            self.requests_by_prompt[prompt] += 1
            self.served[outcome] += 1
            if outcome == "429":
                return _error(
                    429, "Rate limit reached", {"retry-after": f"{self.faults.retry_after_s:g}"}
                )
            if outcome == "500":
                return _error(500, "The server had an error")
            if outcome == "slow":
                await asyncio.sleep(self.faults.slow_s)  # the client has given up by now
            if outcome == "malformed":
                contents = [MALFORMED_REPLIES[self.requests_by_prompt[prompt] % 3]]
            elif prompt.rstrip().endswith("### SQL:"):
                answers = self.teacher.get(_section(prompt, "Question"), ["SELECT 1"])
                contents = [answers[i % len(answers)] for i in range(body.get("n") or 1)]
            else:
                if f"### {SECTIONS[2]}:" in prompt:
                    same = expected_verdict(
                        _section(prompt, SECTIONS[2]), _section(prompt, SECTIONS[3])
                    )
                else:
                    same = _norm(_section(prompt, SECTIONS[3])) not in self.reject_labels
                contents = ['{"resolve_yn": "%s"}' % ("yes" if same else "no")]
            if outcome == "ok":
                self.ok_by_prompt[prompt] += 1
            return JSONResponse(_completion(body.get("model", ""), prompt, contents))

        return app

    def __enter__(self) -> FakeOpenAI:
        self._server = LoopbackServer(self.app).start()
        self.port = self._server.port
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.stop()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "fake_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _completion(model: str, prompt: str, contents: list[str]) -> dict[str, Any]:
    prompt_tokens, completion_tokens = len(prompt) // 4, sum(len(c) for c in contents) // 4
    return {
        "id": f"chatcmpl-{hashlib.sha1(prompt.encode()).hexdigest()[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
            for i, content in enumerate(contents)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
