"""The model server behind the gateway: vLLM's OpenAI completions API.

`VLLMCompletions.candidates(model, prompt, requests)` sends the already chat-formatted prompt
with each of the decoding's engine requests (`pipelines.model.decoding.engine_requests`, the
same dicts offline vLLM turns into `SamplingParams`: n, temperature, seed, log-probabilities,
the grammar as `structured_outputs`) in the request's extra body, concurrently, and returns the
candidates; `complete(model, prompt)` is the plain greedy call. Both turn every way the server
can fail into `BackendUnavailable` with the reason, which the gateway answers as a 503. An
adapter missing after a vLLM restart is loaded again from the path the routing file names (none
with merged serving: a vLLM restarting on another merged model is a 503 until the route follows
it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from pathlib import Path

import httpx
import openai

from pipelines.config import ServingConfig
from pipelines.model.decoding import Candidate
from pipelines.model.prompt import STOP

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """vLLM cannot answer (down, timed out, adapter not loaded); the message says why."""


def external_vllm() -> str | None:
    """The URL of a vLLM that sqlops did not start and must not restart (`SQLOPS_VLLM_URL`)."""
    return os.environ.get("SQLOPS_VLLM_URL") or None


def vllm_url(cfg: ServingConfig) -> str:
    return external_vllm() or f"http://{cfg.host}:{cfg.vllm_port}/v1"


def vllm_headers() -> dict[str, str]:
    """vLLM's own API key (`SQLOPS_VLLM_API_KEY`, when its server was started with one), on
    every call: completions, health, adapter loads."""
    key = os.environ.get("SQLOPS_VLLM_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def load_adapter(http: httpx.Client, root: str, name: str, path: str) -> None:
    """Load a LoRA adapter into a running vLLM (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`); a name
    already loaded is fine (names are immutable per version). Raises RuntimeError when refused."""
    body = {"lora_name": name, "lora_path": str(path)}
    r = http.post(f"{root}/v1/load_lora_adapter", json=body, headers=vllm_headers())
    if r.status_code == 400 and "already" in r.text:
        return
    if r.status_code != 200:
        raise RuntimeError(f"vLLM refused to load {name}: {r.status_code} {r.text[:300]}")


def served_base(http: httpx.Client, root: str) -> str | None:
    """The base-model folder a vLLM serves (its `--model`, the model without a parent)."""
    data = http.get(f"{root}/v1/models", headers=vllm_headers()).raise_for_status().json()["data"]
    return next((m.get("root") for m in data if not m.get("parent")), None)


def same_base(served: str | None, base: Path | str) -> bool:
    return served is not None and Path(served).resolve() == Path(base).resolve()


class VLLMCompletions:
    """The OpenAI completions API of a vLLM server (the prompt is already chat-formatted)."""

    def __init__(self, base_url: str, timeout_s: float, max_new_tokens: int):
        self.base_url = base_url.rstrip("/")
        self.timeout_s, self.max_new_tokens = timeout_s, max_new_tokens
        # One client per event loop: its connection pool belongs to the loop that made it (the
        # app's loop, and the deployment smoke test's own `asyncio.run`).
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _client(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            # No client retries: a down server must turn into a fast 503, not a long hang.
            self._clients[loop] = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=os.environ.get("SQLOPS_VLLM_API_KEY", "EMPTY"),
                timeout=self.timeout_s,
                max_retries=0,
            )
        return self._clients[loop]

    async def candidates(
        self,
        model: str,
        prompt: str,
        requests: list[dict],
        adapter_path: str | None = None,
        base_path: str | None = None,
    ) -> list[Candidate]:
        """Every completion of `requests` (one prompt's engine requests), in request order."""
        try:
            outs = await asyncio.gather(*(self._request(model, prompt, r) for r in requests))
        except openai.NotFoundError as e:
            if adapter_path is None:
                raise BackendUnavailable(f"model {model} is not loaded on the model server") from e
            await self._reload(model, adapter_path, base_path)
            outs = await asyncio.gather(*(self._request(model, prompt, r) for r in requests))
        return [c for out in outs for c in out]

    async def _request(self, model: str, prompt: str, request: dict) -> list[Candidate]:
        # The prompt goes as text, tokenized by vLLM without special tokens: the token ids the
        # engine request holds (same tokenizer files), which offline vLLM gets as ids.
        fields = {k: v for k, v in request.items() if k != "prompt_token_ids"}
        extra = {"add_special_tokens": False}
        for key in ("include_stop_str_in_output", "skip_special_tokens", "structured_outputs"):
            if key in fields:
                extra[key] = fields.pop(key)
        try:
            r = await self._client().completions.create(
                model=model, prompt=prompt, extra_body=extra, **fields
            )
        except openai.APITimeoutError as e:
            raise BackendUnavailable(f"model server timed out: {e}") from e
        except openai.APIConnectionError as e:
            raise BackendUnavailable(f"model server unreachable at {self.base_url}") from e
        except openai.NotFoundError:
            raise
        except openai.APIStatusError as e:
            raise BackendUnavailable(f"model server error {e.status_code}: {e.message}") from e
        out = []
        for choice in sorted(r.choices, key=lambda c: c.index):
            lp = choice.logprobs.token_logprobs if choice.logprobs else None
            logprob = sum(x for x in lp if x is not None) if lp else None
            tokens = len(lp) if lp else 0
            out.append(Candidate(choice.text, logprob, tokens))
        return out

    async def complete(self, model: str, prompt: str, adapter_path: str | None = None) -> str:
        """Greedy completion; a routed adapter missing from vLLM (restarted since the deploy)
        is loaded again from `adapter_path` once, then the request is retried."""
        try:
            return await self._complete(model, prompt)
        except openai.NotFoundError as e:
            if adapter_path is None:
                raise BackendUnavailable(f"model {model} is not loaded on the model server") from e
            await self._reload(model, adapter_path)
            return await self._complete(model, prompt)

    async def _reload(self, model: str, adapter_path: str, base_path: str | None = None) -> None:
        """The adapter loaded again, only into a vLLM that serves its base model (one switching
        to another version's base is a 503 until the route follows)."""
        root = self.base_url.removesuffix("/v1")

        def load() -> None:
            with httpx.Client(timeout=self.timeout_s, headers=vllm_headers()) as http:
                if base_path is not None and not same_base(
                    served := served_base(http, root), base_path
                ):
                    raise RuntimeError(f"the model server runs base model {served}")
                load_adapter(http, root, model, adapter_path)

        try:
            await asyncio.to_thread(load)
        except httpx.HTTPError as e:
            raise BackendUnavailable(f"model server unreachable at {self.base_url}") from e
        except RuntimeError as e:
            raise BackendUnavailable(f"model {model} is not loaded; reloading failed: {e}") from e
        log.warning("reloaded adapter %s into the model server", model)

    async def _complete(self, model: str, prompt: str) -> str:
        greedy = {"n": 1, "temperature": 0.0, "max_tokens": self.max_new_tokens, "stop": STOP}
        out = await self._request(model, prompt, greedy)
        return out[0].text if out else ""

    async def health(self) -> str | None:
        """None when the server answers, else the reason."""
        try:
            async with httpx.AsyncClient(timeout=2.0, headers=vllm_headers()) as c:
                (await c.get(f"{self.base_url}/models")).raise_for_status()
        except httpx.HTTPError as e:
            return f"model server unreachable at {self.base_url}: {type(e).__name__}"
        return None
