"""Batched greedy SQL generation with transformers (KV cache, stop at `;`).

The transformers backend of `pipelines.model.backends`, and what the registered MLflow model
runs. Prompts for one database share their system line and DDL (~85% of the prompt). Batches
are formed per shared prefix: the prefix is run once, its key/value cache copied to every row,
and each row's own tail is padded between prefix and tail (the attention mask hides the gap,
positions continue from the prefix). Results come back in the caller's order.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch

from pipelines.model.prompt import STOP
from pipelines.sql import extract_sql

log = logging.getLogger(__name__)
MIN_SHARED_PREFIX = 16  # shorter common prefixes are not worth a separate forward pass


@dataclass
class Generation:
    texts: list[str]  # raw model output per prompt
    sql: list[str]  # the SQL statement extracted from each output
    new_tokens: int  # tokens generated over all prompts (end of turn not counted)
    seconds: float  # generation time, model loading not included
    backend: str = "transformers"
    load_seconds: float = 0.0  # engine start-up where the backend has one (vLLM)

    @classmethod
    def of(cls, texts: list[str], new_tokens: int, seconds: float, backend: str) -> Generation:
        """From raw outputs: every backend's SQL comes out of the same `extract_sql`."""
        return cls(texts, [extract_sql(t) for t in texts], new_tokens, seconds, backend)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix all rows share, leaving every row at least one own token."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def _batches(encoded: list[list[int]], batch_size: int) -> list[list[int]]:
    # Sorting the token lists puts prompts with the same prefix (same database) together,
    # and similar tails next to each other.
    order = sorted(range(len(encoded)), key=lambda i: encoded[i])
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


def _inputs(rows: list[list[int]], prefix: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids / attention_mask as prefix + padding + tail (left padding when prefix = 0)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tail = r[prefix:]
        ids[i, :prefix], mask[i, :prefix] = torch.tensor(r[:prefix]), 1
        ids[i, width - len(tail) :], mask[i, width - len(tail) :] = torch.tensor(tail), 1
    return ids, mask


@torch.inference_mode()
def generate_sql(
    model, tok, prompts: list[str], batch_size: int, max_new_tokens: int
) -> Generation:
    model.eval()
    encoded = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    texts: list[str] = [""] * len(prompts)
    new_tokens, start, shared_tokens = 0, time.monotonic(), 0
    prefix_caches: dict[tuple[int, ...], object] = {}
    for idxs in _batches(encoded, batch_size):
        rows = [encoded[i] for i in idxs]
        prefix = common_prefix(rows) if len(rows) > 1 else 0
        prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
        ids, mask = _inputs(rows, prefix, tok.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        kwargs = {}
        if prefix:
            key = tuple(rows[0][:prefix])
            if key not in prefix_caches:
                prefix_caches[key] = model(
                    input_ids=ids[:1, :prefix], use_cache=True
                ).past_key_values
            cache = copy.deepcopy(prefix_caches[key])  # generate() extends the cache in place
            cache.batch_repeat_interleave(len(rows))
            kwargs["past_key_values"] = cache
            shared_tokens += prefix * (len(rows) - 1)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=STOP,
            tokenizer=tok,
            pad_token_id=tok.pad_token_id,
            **kwargs,
        )
        gen = out[:, ids.shape[1] :]
        new_tokens += int((gen != tok.pad_token_id).sum())
        for i, row in zip(idxs, gen, strict=True):
            texts[i] = tok.decode(row, skip_special_tokens=True)
    seconds = time.monotonic() - start
    result = Generation.of(texts, new_tokens, seconds, "transformers")
    log.info(
        "generated %d prompts, %d tokens in %.1f s (%.0f tok/s; transformers, batch %d, "
        "%d prompt tokens served from shared-prefix caches)",
        len(prompts),
        new_tokens,
        seconds,
        result.tokens_per_s,
        batch_size,
        shared_tokens,
    )
    return result
