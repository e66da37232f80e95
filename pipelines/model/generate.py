"""SQL generation with transformers (KV cache, stop at `;`): batched greedy, and candidates.

The transformers backend of `pipelines.model.backends`, and what the registered MLflow model
runs. `generate_sql` is the greedy path (decoding `n: 1`, no grammar); `generate_candidates`
serves the other decodings prompt by prompt: a greedy candidate and `n - 1` sampled ones, each
scored by its cumulative log-probability under the model's raw logits, with the database's
grammar applied by xgrammar's logits processor (when xgrammar is importable; else unconstrained,
and the log says so). Greedy: prompts for one database share their system line and DDL (~85% of
the prompt). Batches are formed per shared prefix: the prefix is run once, its key/value cache
copied to every row, and each row's own tail is padded between prefix and tail (the attention
mask hides the gap, positions continue from the prefix). Results come back in the caller's order.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch

from pipelines.model.decoding import Candidate
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
    candidates: list[list] = field(default_factory=list)  # per prompt: decoding.Candidate's

    @classmethod
    def from_candidates(cls, candidates: list[list], seconds: float, backend: str) -> Generation:
        """From every prompt's candidates; `texts`/`sql` are the first (greedy) candidate's."""
        texts = [c[0].text for c in candidates]
        tokens = sum(x.tokens for c in candidates for x in c)
        gen = cls(texts, [c[0].sql for c in candidates], tokens, seconds, backend)
        gen.candidates = candidates
        return gen

    @classmethod
    def of(cls, texts: list[str], new_tokens: int, seconds: float, backend: str) -> Generation:
        """From raw greedy outputs: every backend's SQL comes out of the same `extract_sql`."""
        gen = cls(texts, [extract_sql(t) for t in texts], new_tokens, seconds, backend)
        gen.candidates = [[Candidate(t)] for t in texts]
        return gen

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


def _grammar_processor(tok, model, grammar: str | None, compiled: dict):
    """xgrammar's transformers logits processor for `grammar` (compiled once per grammar), or
    None (no grammar, or xgrammar missing: logged once)."""
    if grammar is None:
        return None
    try:
        import xgrammar as xgr
        from xgrammar.contrib.hf import LogitsProcessor
    except ImportError as e:
        if "missing" not in compiled:
            compiled["missing"] = True
            log.warning("decoding.grammar: xgrammar is not importable (%s): unconstrained", e)
        return None
    if grammar not in compiled:
        if "compiler" not in compiled:
            info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model.config.vocab_size)
            compiled["compiler"] = xgr.GrammarCompiler(info)
        compiled[grammar] = compiled["compiler"].compile_grammar(grammar)
    return LogitsProcessor(compiled[grammar])  # one per generate() call: it keeps state


def _scored(tok, out, prompt_len: int) -> list:
    """decoding.Candidate's from a generate() output with raw logits: text, tokens, and the
    sum of log-probabilities of the generated tokens under the unprocessed logits."""
    gen = out.sequences[:, prompt_len:]
    logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
    picked = logprobs.gather(-1, gen[:, : logprobs.shape[1], None]).squeeze(-1)
    cands = []
    for row, lp in zip(gen, picked, strict=True):
        keep = row != tok.pad_token_id
        cands.append(
            Candidate(
                tok.decode(row, skip_special_tokens=True),
                float(lp[keep[: lp.shape[0]]].sum()),
                int(keep.sum()),
            )
        )
    return cands


@torch.inference_mode()
def generate_candidates(
    model, tok, prompts: list[str], grammars: list[str | None], cfg, max_new_tokens: int
) -> Generation:
    """Per prompt: the greedy candidate and `cfg.n - 1` sampled ones (`cfg`: DecodingConfig),
    each constrained by the prompt's grammar when there is one."""
    model.eval()
    compiled: dict = {}
    candidates, start = [], time.monotonic()
    common = {"max_new_tokens": max_new_tokens, "stop_strings": STOP, "tokenizer": tok,
              "pad_token_id": tok.pad_token_id, "return_dict_in_generate": True,
              "output_logits": True}  # fmt: skip
    for prompt, grammar in zip(prompts, grammars, strict=True):
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        runs = [{"do_sample": False}]
        if cfg.n > 1:
            runs.append({"do_sample": True, "temperature": cfg.temperature, "top_k": 0,
                         "num_return_sequences": cfg.n - 1})  # fmt: skip
        cands = []
        for k, run in enumerate(runs):
            proc = _grammar_processor(tok, model, grammar, compiled)
            if k:
                torch.manual_seed(0)  # sampled candidates are reproducible run to run
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                logits_processor=[proc] if proc else None,
                **common,
                **run,
            )
            cands += _scored(tok, out, ids.shape[1])
        candidates.append(cands)
    result = Generation.from_candidates(candidates, time.monotonic() - start, "transformers")
    log.info(
        "generated %d prompts x %d candidates, %d tokens in %.1f s (%.0f tok/s; transformers)",
        len(prompts), cfg.n, result.new_tokens, result.seconds, result.tokens_per_s,
    )  # fmt: skip
    return result
