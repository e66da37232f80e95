"""A stand-in for vLLM's OpenAI server on 127.0.0.1, for fast gateway and deployment tests.

It speaks the parts of vLLM's API the product uses: `POST /v1/completions` (only for loaded
adapters, 404 otherwise, as vLLM does), `GET /v1/models`, `POST /v1/load_lora_adapter`,
`POST /v1/unload_lora_adapter`, `GET /health`. The completion is looked up by the prompt's
question in `model_answers[model]`, then in `answers` (the tests' oracle); `stop()` / `start()`
on the same port simulate vLLM going down and coming back. `lora=False` acts as a vLLM serving
merged weights: one model under its `--served-model-name`, no LoRA endpoints; `python -m
tests.fake_vllm --port P --served-model-name NAME --model DIR --answers FILE` runs that as a
process (merged-serving restarts are real process restarts); `--lora` without a served name runs
runtime-LoRA serving on the base model DIR that way (restarts onto another base model).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import time
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from tests.loopback import LoopbackServer

_QUESTION = re.compile(r"### Question:\n(.*?)(?:\n|$)", re.S)


class FakeVLLM:
    def __init__(
        self,
        answers: dict[str, str] | None = None,
        base: str = "base",
        lora: bool = True,
        root: str | None = None,
    ):
        self.answers = answers or {}  # question -> completion text
        self.model_answers: dict[str, dict[str, str]] = {}  # model -> its own answers first
        self.base = base  # the served model name
        self.root = root or base  # the model directory /v1/models reports
        self.lora = lora  # runtime LoRA endpoints on (adapter serving) or absent (merged)
        self.adapters: dict[str, str] = {}  # loaded name -> path
        self.calls: Counter[str] = Counter()  # completions served, by model
        self.delay_s = 0.0  # added to every completion (load tests)
        self.fail_for: set[str] = set()  # models whose completions return 500
        self.api_key: str | None = None  # as vLLM's --api-key: required on /v1/* when set
        self.bodies: list[dict] = []  # every completions request body, in arrival order
        self.request_log: Path | None = None  # bodies also appended here (a server process)
        self.port = 0
        self._server: LoopbackServer | None = None
        self.app = self._build_app()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def api_key(request: Request, call_next):
            given = request.headers.get("authorization", "")
            if (
                self.api_key
                and request.url.path.startswith("/v1")
                and given != (f"Bearer {self.api_key}")
            ):
                return _error(401, "Unauthorized")
            return await call_next(request)

        @app.get("/health")
        async def health() -> PlainTextResponse:
            return PlainTextResponse("")

        @app.get("/v1/models")
        async def models() -> dict:
            data = [{"id": self.base, "object": "model", "root": self.root, "parent": None}]
            data += [
                {"id": n, "object": "model", "root": p, "parent": self.base}
                for n, p in self.adapters.items()
            ]
            return {"object": "list", "data": data}

        if self.lora:
            self._lora_routes(app)

        @app.post("/v1/completions")
        async def completions(request: Request):
            import asyncio

            body = await request.json()
            model = body["model"]
            if model != self.base and model not in self.adapters:
                return _error(404, f"The model `{model}` does not exist.")
            if model in self.fail_for:
                return _error(500, "internal error")
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            m = _QUESTION.search(body["prompt"])
            question = m.group(1).strip() if m else ""
            self.calls[model] += 1
            self.bodies.append(body)
            if self.request_log is not None:
                with self.request_log.open("a") as f:
                    f.write(json.dumps(body) + "\n")
            text = self.model_answers.get(model, {}).get(question)
            text = self.answers.get(question, "SELECT 1") if text is None else text
            # n completions of the oracle's text; with `logprobs`, one token scored -1 each.
            lp = None
            if body.get("logprobs") is not None:
                lp = {"tokens": [text], "token_logprobs": [-1.0], "top_logprobs": None,
                      "text_offset": [0]}  # fmt: skip
            choices = [
                {"index": i, "text": text, "finish_reason": "stop", "logprobs": lp}
                for i in range(body.get("n", 1))
            ]
            return {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": choices,
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        return app

    def _lora_routes(self, app: FastAPI) -> None:
        @app.post("/v1/load_lora_adapter")
        async def load(request: Request):
            body = await request.json()
            name = body["lora_name"]
            if name in self.adapters:
                return _error(400, f"The lora adapter '{name}' has already been loaded.")
            self.adapters[name] = body["lora_path"]
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request):
            name = (await request.json())["lora_name"]
            if self.adapters.pop(name, None) is None:
                return _error(404, f"The lora adapter '{name}' cannot be found.")
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    def start(self) -> FakeVLLM:
        self._server = LoopbackServer(self.app, self.port).start()  # same port after a stop
        self.port = self._server.port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> FakeVLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _error(status: int, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "BadRequestError", "code": status}}
    return JSONResponse(body, status_code=status)


def main() -> None:
    """A model server process until SIGTERM: merged weights served as `--served-model-name`,
    or with `--lora` the base model `--model` with runtime LoRA (as vLLM, named by its path)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--served-model-name")
    ap.add_argument("--model", required=True)
    ap.add_argument("--answers", required=True, help="JSON file: question -> completion")
    ap.add_argument("--lora", action="store_true", help="runtime LoRA endpoints on")
    ap.add_argument("--requests", type=Path, help="JSONL file: every completions request body")
    args = ap.parse_args()
    answers = json.loads(Path(args.answers).read_text())
    name = args.served_model_name or args.model
    fake = FakeVLLM(answers, base=name, lora=args.lora, root=args.model)
    fake.request_log = args.requests
    fake.port = args.port
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # delivered to sigwait, not as an exit
    fake.start()
    signal.sigwait(stop)
    fake.stop()


if __name__ == "__main__":
    main()
