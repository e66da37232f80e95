"""Decoding experiment: the same tuned adapter under each decoding, one table, plus the gateway.

    sqlops experiment decoding [--split eval.jsonl] [--n 5] [--adapter DIR] [--requests 32]
                               [--no-serving] [--rows all|bound] [--merged]

Rows: greedy / + grammar / + n candidates / + both (pipelines/model/decoding.py), and params.yaml's
decoding on the DDL without its listed column values (`data.sample_values`), each a normal
evaluation (`evaluate_model`: the backend `evaluate.backend` picks, `evaluate.max_examples` of
the split, the gold results executed once). Columns: execution accuracy with its 95% bootstrap
interval, valid SQL, exact match, tokens/s, seconds per question (generation + choice, engine
start-up apart). Then, unless `--no-serving`, the served path: a vLLM server serving the adapter
as `deploy` puts it there (`model_server`: loaded at runtime, or merged into the base weights
with `serving.merged` or `--merged`), the request path (`Text2SQL.answer`, without
HTTP) at concurrency 4 for every row's decoding (and params.yaml's `decoding:`) in one run, and
how many questions the served greedy SQL equals the offline greedy SQL (merged weights).
`--rows bound` runs only greedy and params.yaml's decoding, offline and served: the two the
latency bound compares (the served path with an unmerged adapter is slow on CPU).
Writes <paths.experiments>/decoding.{json,md}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path

from pipelines.config import DecodingConfig, Params
from pipelines.data.records import read_jsonl, sample_records
from pipelines.data.schema_fit import fit_schema
from pipelines.db_schema import ddl_of
from pipelines.eval.evaluate import evaluate_model, gold_results
from pipelines.eval.metrics import summarize
from pipelines.model.backends import ModelSpec
from pipelines.vllm_runtime import VLLMRuntime

log = logging.getLogger(__name__)
CONCURRENCY = 4  # the latency bound is stated at concurrency 4
LATENCY_BOUND = 1.5  # the default decoding's gateway p50 may be at most 1.5x greedy's


def variants(d: DecodingConfig, n: int, rows: str = "all") -> dict[str, DecodingConfig]:
    """The table's rows: params.yaml's temperature and rule, n and grammar switched; or, for
    `rows="bound"`, greedy and params.yaml's decoding."""
    greedy = d.model_copy(update={"n": 1, "grammar": False})
    if rows == "bound":
        return {"greedy": greedy, "params.yaml decoding": d}
    return {
        "greedy": greedy,
        "+ grammar": d.model_copy(update={"n": 1, "grammar": True}),
        f"+ {n} candidates": d.model_copy(update={"n": n, "grammar": False}),
        f"+ grammar + {n} candidates": d.model_copy(update={"n": n, "grammar": True}),
    }


def without_values(p: Params, records: list[dict]) -> list[dict]:
    """`records` with their database's DDL as it reads without the listed column values
    (`data.sample_values` off), fitted as `prepare` fits it: the row that measures the values."""
    db_dir, ddl = p.path("prepared") / "databases", {}
    out = []
    for r in records:
        if r["db_id"] not in ddl:
            ddl[r["db_id"]] = ddl_of(db_dir / f"{r['db_id']}.sqlite")
        out.append({**r, "ddl": fit_schema(ddl[r["db_id"]], r["question"], p.data.max_ddl_chars)})
    return out


def offline_rows(
    p: Params, spec: ModelSpec, records: list[dict], kinds: dict[str, DecodingConfig]
) -> list[dict]:
    db_dir = p.path("prepared") / "databases"
    gold = gold_results(records, db_dir, p.evaluate.sql_timeout_s)
    rows = [(label, d, records) for label, d in kinds.items()]
    if p.data.sample_values > 0 and len(kinds) > 2:
        rows.append(("params.yaml decoding, DDL without values", p.decoding, None))
    out = []
    for label, d, asked in rows:
        asked = asked or without_values(p, records)
        start = time.monotonic()
        scored, gen = evaluate_model(spec, asked, gold, db_dir, p.evaluate, VLLMRuntime.of(p), d)
        wall = time.monotonic() - start
        m = summarize(scored, p.evaluate.bootstrap_samples, p.seed, gen.tokens_per_s)
        out.append(
            {
                "row": label,
                "decoding": d.model_dump(),
                "backend": gen.backend,
                "execution_accuracy": m["execution_accuracy"],
                "ci95": m["execution_accuracy_ci95"],
                "valid_sql_rate": m["valid_sql_rate"],
                "exact_match": m["exact_match"],
                "tokens_per_s": gen.tokens_per_s,
                "s_per_question": (wall - gen.load_seconds) / len(records),
                "engine_start_s": gen.load_seconds,
                "fallbacks": sum(bool(r["fallback"]) for r in scored),
                "sql": [r["pred_sql"] for r in scored],
            }
        )
        log.info("%s: execution accuracy %.3f", label, m["execution_accuracy"])
    return out


def served(
    p: Params, adapter: Path, records: list[dict], requests: int, kinds: dict[str, DecodingConfig]
) -> dict:
    """p50/p95 of the request path at concurrency 4 for every decoding in `kinds` (the first:
    greedy), in one run: the first half of the requests in order, the second half in reverse,
    so drift in machine load hits all alike; on a vLLM server started here with the adapter
    served as `deploy` serves it (`model_server`). Also the served greedy SQL per question."""
    from transformers import AutoTokenizer

    from pipelines.bench.loadtest import merge, run_load
    from pipelines.serving.backend import VLLMCompletions, vllm_url
    from pipelines.serving.routing import Route
    from pipelines.serving.service import Text2SQL
    from pipelines.serving.vllm_server import model_server, serves_merged, stop_background

    # A private server on a free loopback port: never someone else's vLLM with its own models.
    with socket.socket() as sock:
        sock.bind((p.serving.host, 0))
        port = sock.getsockname()[1]
    p = p.replace(serving={"vllm_port": port}, paths={"run_dir": p.path("run_dir") / "exp-vllm"})
    cfg = p.serving.model_copy(update={"cache_size": 0})
    merged = serves_merged(p)
    try:
        name = "text2sql-decoding-exp"
        server = model_server(p)
        server.serve(name, adapter)
        route = Route(name, 0, adapter_path=None if merged else str(adapter))
        tok = AutoTokenizer.from_pretrained(p.path("base_model"))
        backend = VLLMCompletions(vllm_url(cfg), cfg.request_timeout_s, cfg.max_new_tokens)
        dbs = p.path("prepared") / "databases"
        services = {k: Text2SQL(cfg, dbs, tok, backend, d) for k, d in kinds.items()}
        greedy = next(iter(kinds))
        sql = [""] * len(records)

        def sender(kind: str, offset: int):
            def send(i: int) -> bool:
                k = (i + offset) % len(records)
                r = records[k]
                a = asyncio.run(services[kind].answer(r["question"], r["db_id"], False, route))
                if kind == greedy:
                    sql[k] = a.body.get("sql", "")
                return a.http_status in (200, 422)

            return send

        half = requests // 2
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for kind in kinds:  # warm-up: grammar compilation, prefix caches
            run_load(sender(kind, 0), CONCURRENCY, CONCURRENCY)
        for kind in kinds:
            runs[kind].append(run_load(sender(kind, 0), half, CONCURRENCY))
        for kind in reversed(kinds):
            runs[kind].append(run_load(sender(kind, half), half, CONCURRENCY))
        # Every question once through the served greedy path (agreement with offline).
        missing = [i for i, s in enumerate(sql) if not s]
        if missing:
            run_load(lambda i: sender(greedy, 0)(missing[i]), len(missing), CONCURRENCY)
        server.unload(name)
    finally:
        stop_background("vllm", p.path("run_dir"))
    out = {k: merge(v) for k, v in runs.items()}
    for k in kinds:
        out[k]["p50_vs_greedy"] = out[k]["p50_ms"] / max(out[greedy]["p50_ms"], 1e-9)
    return {"latency": out, "served_greedy_sql": sql, "merged": merged}


def run(
    p: Params,
    split: str = "eval.jsonl",
    n: int = 5,
    adapter: Path | None = None,
    requests: int = 32,
    serving: bool = True,
    rows: str = "all",
    merged: bool = False,
) -> Path:
    adapter = adapter or p.path("adapter")
    if merged:
        p = p.replace(serving={"merged": True})
    kinds = variants(p.decoding, n, rows)
    spec = ModelSpec(p.path("base_model"), adapter)
    records = sample_records(
        read_jsonl(p.path("prepared") / split), p.evaluate.max_examples, p.seed
    )
    result: dict = {"split": split, "n_examples": len(records), "adapter": str(adapter)}
    result["rows"] = offline_rows(p, spec, records, kinds)
    out_dir = p.path("experiments")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The offline rows first: the served part is slow on CPU (LoRA unmerged) and may be cut.
    (out_dir / "decoding.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if serving:
        if p.decoding not in kinds.values():
            kinds["params.yaml decoding"] = p.decoding
        s = served(p, adapter, records, requests, kinds)
        offline = result["rows"][0]["sql"]
        agree = sum(a == b for a, b in zip(offline, s.pop("served_greedy_sql"), strict=True))
        s["offline_vs_served_greedy_same_sql"] = agree
        result["serving"] = s
    (out_dir / "decoding.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    md = out_dir / "decoding.md"
    md.write_text(to_markdown(result, p.decoding))
    return md


def to_markdown(result: dict, default: DecodingConfig) -> str:
    lines = [
        f"Experiment `decoding`: {result['n_examples']} examples of `{result['split']}`, adapter "
        f"`{result['adapter']}`; temperature {default.temperature}, selection "
        f"`{default.selection}`.",
        "",
        "| decoding | execution accuracy (95% CI) | valid SQL | exact match | tokens/s "
        "| s/question | engine start s | no candidate ran |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lo, hi = r["ci95"]
        lines.append(
            f"| {r['row']} ({r['backend']}) | {100 * r['execution_accuracy']:.1f}% "
            f"({100 * lo:.1f}–{100 * hi:.1f}) | {100 * r['valid_sql_rate']:.1f}% "
            f"| {100 * r['exact_match']:.1f}% | {r['tokens_per_s']:.0f} "
            f"| {r['s_per_question']:.2f} | {r['engine_start_s']:.0f} | {r['fallbacks']} |"
        )
    if "serving" in result:
        s = result["serving"]
        served_as = "merged weights" if s.get("merged") else "adapter loaded at runtime"
        lines += [
            "",
            f"Request path (`Text2SQL.answer`) at concurrency {CONCURRENCY} on the vLLM server, "
            f"{served_as}, all decodings in one run (first half of the requests in "
            "order, second half in reverse):",
            "",
            "| decoding | requests | p50 ms | p95 ms | requests/s | p50 / greedy |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for kind, g in s["latency"].items():
            lines.append(
                f"| {kind} | {g['requests']} | {g['p50_ms']:.0f} | {g['p95_ms']:.0f} "
                f"| {g['throughput_rps']:.2f} | {g['p50_vs_greedy']:.2f} |"
            )
        lines += [
            "",
            f"The default may cost at most {LATENCY_BOUND}x greedy's p50. Served greedy "
            f"({served_as}) = offline greedy (merged weights) on "
            f"{s['offline_vs_served_greedy_same_sql']} of {result['n_examples']} questions.",
        ]
    return "\n".join(lines) + "\n"
