"""Batched greedy SQL generation with transformers (left padding, KV cache, stop at `;`).

Used by `evaluate` and by the registered MLflow model. Prompts are sorted by length so each
batch pads little; results come back in the caller's order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from pipelines.sql import extract_sql

log = logging.getLogger(__name__)


@dataclass
class Generation:
    texts: list[str]  # raw model output per prompt
    sql: list[str]  # the SQL statement extracted from each output
    new_tokens: int  # tokens generated over all prompts
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@torch.inference_mode()
def generate_sql(
    model, tok, prompts: list[str], batch_size: int, max_new_tokens: int
) -> Generation:
    tok.padding_side = "left"
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    new_tokens, start = 0, time.monotonic()
    for b in range(0, len(order), batch_size):
        idxs = order[b : b + batch_size]
        enc = tok(
            [prompts[i] for i in idxs], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=[";"],
            tokenizer=tok,
            pad_token_id=tok.pad_token_id,
        )
        gen = out[:, enc.input_ids.shape[1] :]
        new_tokens += int((gen != tok.pad_token_id).sum())
        for i, row in zip(idxs, gen, strict=True):
            texts[i] = tok.decode(row, skip_special_tokens=True)
    seconds = time.monotonic() - start
    result = Generation(texts, [extract_sql(t) for t in texts], new_tokens, seconds)
    log.info(
        "generated %d prompts, %d tokens in %.1f s (%.0f tok/s, transformers batch %d)",
        len(prompts),
        new_tokens,
        seconds,
        result.tokens_per_s,
        batch_size,
    )
    return result
