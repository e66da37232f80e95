"""What the schema grammar costs a base model's vocabulary: `python -m pipelines.bench grammar`.

xgrammar builds a mask over the whole vocabulary at every generated token, so its cost grows
with the tokenizer (SmolLM2: 49,152 tokens; Gemma 3: 262,144). Measured on the evaluation
split's gold SQL, teacher-forced (the same tokens with and without the grammar, no sampling):

- sqlops: ms per token of a greedy decoding step with the grammar: the model's forward with
  its KV cache, plus filling the token mask, applying it to the logits and advancing the
  matcher; baseline: the same forward alone. The ratio is the grammar's share of a step.
- setup: the one-off costs (the tokenizer's xgrammar index, each database's grammar compiled)
  and the tokens the grammar accepted (a gold query it refuses stops there: it is counted).

`reports/bench/grammar.json` (output contract in DESIGN.md). The transformers backend pays
exactly this; vLLM runs the same xgrammar masks in its own engine.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from pipelines.config import Params
from pipelines.data.records import read_jsonl, sample_records
from pipelines.model.base import load_base
from pipelines.model.grammar import schema_grammar
from pipelines.model.prompt import build_completion, build_prompt


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.inference_mode()
def _teacher_forced(model, prompt_ids: list[int], target_ids: list[int], matcher, bitmask):
    """(forward seconds, grammar seconds, tokens) stepping through `target_ids` one token at a
    time after the prompt; grammar work only when a matcher is given."""
    import xgrammar as xgr

    out = model(torch.tensor([prompt_ids]), use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    forward_s = grammar_s = 0.0
    steps = 0
    for tid in target_ids:
        if matcher is not None:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            accepted = matcher.accept_token(tid)
            grammar_s += time.perf_counter() - start
            if not accepted:
                break
        start = time.perf_counter()
        out = model(torch.tensor([[tid]]), past_key_values=cache, use_cache=True)
        forward_s += time.perf_counter() - start
        cache, logits = out.past_key_values, out.logits[:, -1]
        steps += 1
    return forward_s, grammar_s, steps


def bench_grammar(p: Params, n_examples: int = 24, base_dir: Path | None = None) -> dict:
    """Grammar vs no grammar per decoding step, on `n_examples` evaluation questions."""
    import xgrammar as xgr

    base_dir = base_dir or p.path("base_model")
    model, tok = load_base(base_dir)
    model.eval()
    vocab = model.config.vocab_size
    info, info_s = _timed(lambda: xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    compiler = xgr.GrammarCompiler(info)
    prepared = p.path("prepared")
    records = sample_records(read_jsonl(prepared / "eval.jsonl"), n_examples, p.seed)
    compiled, compile_s = {}, []
    fwd = fwd_alone = gram = 0.0
    tokens = tokens_alone = refused = 0
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    for r in records:
        if r["db_id"] not in compiled:
            text = schema_grammar(prepared / "databases" / f"{r['db_id']}.sqlite", p.decoding)
            compiled[r["db_id"]], s = _timed(lambda text=text: compiler.compile_grammar(text))
            compile_s.append(s)
        prompt = tok(build_prompt(r["ddl"], r["question"], tok), add_special_tokens=False)
        # The SQL up to its `;`, where generation stops (build_completion adds end of turn).
        sql = build_completion(r["sql"]).removesuffix(getattr(tok, "eos_token", "") or "")
        target = tok(sql, add_special_tokens=False).input_ids
        matcher = xgr.GrammarMatcher(compiled[r["db_id"]])
        f, g, n = _teacher_forced(model, prompt.input_ids, target, matcher, bitmask)
        fwd, gram, tokens = fwd + f, gram + g, tokens + n
        refused += n < len(target)
        f, _, n = _teacher_forced(model, prompt.input_ids, target, None, None)
        fwd_alone, tokens_alone = fwd_alone + f, tokens_alone + n
    with_grammar = 1000 * (fwd + gram) / max(tokens, 1)
    alone = 1000 * fwd_alone / max(tokens_alone, 1)
    return {
        "metric": "ms per greedy decoding step, teacher-forced on gold SQL",
        "unit": "ms/token",
        "sqlops": with_grammar,
        "baseline": alone,
        "baseline_name": "the same forward without the grammar",
        "ratio": with_grammar / alone,
        "setup": {
            "base_model": str(base_dir),
            "vocabulary": vocab,
            "examples": len(records),
            "tokens": tokens,
            "gold_queries_the_grammar_refused": refused,
            "grammar_ms_per_token": 1000 * gram / max(tokens, 1),
            "tokenizer_index_s": info_s,
            "grammar_compile_s_mean": statistics.mean(compile_s),
            "grammar_compile_s_max": max(compile_s),
            "databases": len(compiled),
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        },
    }
