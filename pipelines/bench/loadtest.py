"""Bounded load on loopback: the gateway vs vLLM directly (same run), and a hot swap under load.

python -m pipelines.bench.loadtest [--requests N] [--concurrency C] [--swaps S]
(`make bench` runs it as `python -m pipelines.bench serving`, starting and stopping the servers)

Needs `sqlops serve` (vLLM + gateway) running. Writes reports/bench/gateway.json (DESIGN.md's
output contract: metric = seconds per request, so ratio = sqlops / baseline = direct /
via-gateway throughput) and reports/hot_swap.json `{"requests", "failed", "swaps"}`: with runtime
adapters a hot swap (no request may fail), with merged serving restart switches (`mode: merged`,
`switch_s`, `unavailable_s`: what a deploy or rollback costs). Questions are the eval split's,
each sent once per pass, so the gateway's response cache never answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from pipelines.config import Params, load_params, setup_entry_point
from pipelines.db_schema import ddl_of
from pipelines.model.prompt import build_prompt
from pipelines.serving.backend import external_vllm, vllm_url
from pipelines.serving.routing import Route, read_route, write_route
from pipelines.vllm_runtime import VLLMRuntime

if TYPE_CHECKING:
    from pipelines.serving.vllm_server import MergedServer

# Default load: enough requests for stable seconds per request on 2 CPU cores, in minutes.
REQUESTS, CONCURRENCY, SWAPS = 48, 8, 6
RETRY_S = 1.0  # a client's pause after a failed request during a restart switch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def run_load(send: Callable[[int], bool], n: int, concurrency: int) -> dict:
    """`n` calls of `send(i)` (True = success) from `concurrency` threads; latency figures."""
    latencies: list[float] = []
    errors = 0

    def one(i: int) -> None:
        nonlocal errors
        start = time.perf_counter()
        ok = send(i)
        latencies.append(time.perf_counter() - start)
        errors += not ok

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    seconds = time.perf_counter() - start
    return {
        "requests": n,
        "errors": errors,
        "seconds": round(seconds, 3),
        "throughput_rps": round(n / seconds, 3),
        "p50_ms": round(1000 * percentile(latencies, 0.5), 1),
        "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
        "mean_ms": round(1000 * statistics.fmean(latencies), 1),
    }


def merge(runs: list[dict]) -> dict:
    """Passes of `run_load` as one: totals, and latency figures averaged over the passes."""
    n, seconds = sum(r["requests"] for r in runs), sum(r["seconds"] for r in runs)
    out = {"requests": n, "errors": sum(r["errors"] for r in runs), "seconds": round(seconds, 3)}
    out["throughput_rps"] = round(n / seconds, 3)
    for key in ("p50_ms", "p95_ms", "mean_ms"):
        out[key] = round(statistics.fmean(r[key] for r in runs), 1)
    return out


def eval_questions(p: Params, n: int) -> list[dict]:
    with (p.path("prepared") / "eval.jsonl").open() as f:
        records = [json.loads(line) for line, _ in zip(f, range(n), strict=False)]
    return [{"question": r["question"], "db_id": r["db_id"]} for r in records]


def bench(p: Params, n: int, concurrency: int) -> dict:
    """Gateway vs direct over the same `2n` eval questions: a warm-up pass fills vLLM's prefix
    cache, then ABBA order (gateway, direct on the first half; direct, gateway on the second),
    so drift in machine load hits both sides alike and the gateway's cache never answers."""
    from transformers import AutoTokenizer

    cfg = p.serving
    route = read_route(p.path("routing"))
    if route is None:
        raise RuntimeError("nothing is deployed: run `sqlops serve` first")
    gateway = f"http://{cfg.host}:{cfg.gateway_port}"
    tok = AutoTokenizer.from_pretrained(p.path("base_model"))
    questions = eval_questions(p, 2 * n)
    dbs = p.path("prepared") / "databases"
    ddl = {q["db_id"]: ddl_of(dbs / f"{q['db_id']}.sqlite", cfg.sample_values) for q in questions}
    prompts = [build_prompt(ddl[q["db_id"]], q["question"], tok) for q in questions]
    http = httpx.Client(timeout=cfg.request_timeout_s * 2, limits=httpx.Limits(max_connections=64))

    def direct(i: int) -> bool:
        body = {"model": route.model, "prompt": prompts[i], "max_tokens": cfg.max_new_tokens,
                "temperature": 0.0, "stop": [";"]}  # fmt: skip
        return http.post(f"{vllm_url(cfg)}/completions", json=body).status_code == 200

    overhead_ms: list[float] = []  # gateway's own time per request: latency - time on vLLM

    def via_gateway(i: int) -> bool:
        r = http.post(f"{gateway}/v1/sql", json=questions[i])
        body = r.json()
        if "upstream_ms" in body:
            overhead_ms.append(body["latency_ms"] - body["upstream_ms"])
        return r.status_code in (200, 422)

    run_load(direct, 2 * n, concurrency)  # warm-up

    def second_half(send: Callable[[int], bool]) -> Callable[[int], bool]:
        return lambda i: send(i + n)

    gw = [run_load(via_gateway, n, concurrency)]
    dr = [run_load(direct, n, concurrency), run_load(second_half(direct), n, concurrency)]
    gw.append(run_load(second_half(via_gateway), n, concurrency))
    gw, dr = merge(gw), merge(dr)
    return {
        "metric": "seconds_per_request",
        "unit": "s",
        "sqlops": round(gw["seconds"] / gw["requests"], 4),
        "baseline": round(dr["seconds"] / dr["requests"], 4),
        "baseline_name": "vLLM OpenAI completions API called directly",
        "ratio": round(gw["seconds"] / dr["seconds"], 4),
        "setup": {
            "requests": 2 * n,
            "order": "warm-up (direct), gateway, direct, direct, gateway",
            "concurrency": concurrency,
            "model": route.model,
            "gateway": gw,
            "direct": dr,
            "gateway_overhead_ms_p50": round(percentile(overhead_ms, 0.5), 2),
            "gateway_overhead_ms_p95": round(percentile(overhead_ms, 0.95), 2),
            "ratio_means": "gateway s/request over direct s/request = direct / via-gateway "
            "throughput: 1.0 = no overhead, above 1 = the gateway is slower",
            "note": "gateway requests without execute; overhead = gateway latency minus its "
            "time waiting on vLLM, measured in the gateway process",
        },
    }


def hot_swap(p: Params, n: int, concurrency: int, swaps: int) -> dict:
    """Load through the gateway while the route flips between the served adapter and a second
    copy of it under another name (loaded at runtime): no request may fail. Over `n` questions
    after the bench's `2n`."""
    from pipelines.serving.vllm_server import VLLMAdmin

    cfg = p.serving
    routing = p.path("routing")
    route = read_route(routing)
    admin = VLLMAdmin(vllm_url(cfg))
    models = admin.http.get(f"{admin.root}/v1/models").json()["data"]
    path = next(m["root"] for m in models if m["id"] == route.model)
    other = Route(f"{route.model}-swapcheck", route.version)
    admin.load(other.model, Path(path))
    gateway = f"http://{cfg.host}:{cfg.gateway_port}"
    questions = eval_questions(p, 3 * n)[2 * n :]  # not the bench's: no response-cache hits
    served: list[str] = []
    http = httpx.Client(timeout=cfg.request_timeout_s * 2)

    def send(i: int) -> bool:
        r = http.post(f"{gateway}/v1/sql", json=questions[i])
        served.append(r.json().get("model_version"))
        return r.status_code in (200, 422)

    done, result = threading.Event(), {}
    worker = threading.Thread(
        target=lambda: (result.update(run_load(send, n, concurrency)), done.set())
    )
    worker.start()
    made, every = 0, max(n // (swaps + 1), 1)  # swaps spread over the run, by progress
    try:
        while not done.wait(timeout=0.2):
            if made < swaps and len(served) >= (made + 1) * every:
                write_route(routing, [other, route][made % 2])
                made += 1
        worker.join()
    finally:
        write_route(routing, route)
        admin.unload(other.model)
    by_name = {name: served.count(name) for name in sorted(set(served), key=str)}
    return {"requests": n, "failed": result["errors"], "swaps": made, "served": by_name}


def restart_switch(p: Params, swaps: int, server: MergedServer | None = None) -> dict:
    """With merged serving, what every deploy and rollback costs: vLLM restarted on the served
    merged weights under another name, the route following it, and back, `swaps` times in all,
    while `CONCURRENCY` clients keep asking through the gateway (distinct questions, no cache
    hits; a failed one waits `RETRY_S` before the next). Requests fail, with a 503 and the
    reason, only while vLLM restarts: per switch the seconds to the new route and the seconds
    without an answer. Holds the deploy lock, so the gateway's reconcile loop waits."""
    from pipelines.release.deploy import deploy_lock
    from pipelines.serving.vllm_server import MergedServer

    cfg, routing = p.serving, p.path("routing")
    route = read_route(routing)
    adapter = p.path("served_adapters") / route.model  # deploy copied it out of the registry
    if not (adapter / "adapter_config.json").is_file():
        return {"skipped": f"no adapter for {route.model} in {adapter.parent}"}
    server = server or MergedServer(p)
    other = Route(f"{route.model}-swapcheck", route.version)
    questions = eval_questions(p, 10_000)
    gateway = f"http://{cfg.host}:{cfg.gateway_port}"
    answers: list[tuple[float, str | None]] = []  # (when, served model or None: failed)
    done = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(timeout=cfg.request_timeout_s * 2) as http:
            i = k
            while not done.is_set():
                try:
                    r = http.post(f"{gateway}/v1/sql", json=questions[i % len(questions)])
                    ok = r.status_code in (200, 422)
                except httpx.HTTPError:
                    ok = False
                answers.append((time.monotonic(), r.json().get("model_version") if ok else None))
                i += CONCURRENCY
                if not ok:
                    done.wait(RETRY_S)

    clients = [threading.Thread(target=client, args=(k,)) for k in range(CONCURRENCY)]
    for t in clients:
        t.start()
    switches = []
    try:
        with deploy_lock(p):
            for k in range(swaps):
                target = (other, route)[k % 2]
                started = time.monotonic()
                server.serve(target.model, adapter)
                write_route(routing, target)
                switches.append((started, time.monotonic(), target.model))
                # The next switch only once the new name has answered (or a request's timeout).
                deadline = time.monotonic() + 2 * cfg.request_timeout_s
                while time.monotonic() < deadline and not any(
                    t > started and m == target.model for t, m in answers[::-1]
                ):
                    time.sleep(0.2)
            if swaps % 2:  # back on the route it found
                server.serve(route.model, adapter)
                write_route(routing, route)
    finally:
        done.set()
        for t in clients:
            t.join()
    unavailable = []
    for started, _, model in switches:
        first = next((t for t, m in answers if t > started and m == model), None)
        unavailable.append(None if first is None else round(first - started, 1))
    served = [m for _, m in answers]
    return {
        "mode": "merged",
        "requests": len(answers),
        "failed": served.count(None),
        "swaps": len(switches),
        "switch_s": [round(end - start, 1) for start, end, _ in switches],
        "unavailable_s": unavailable,
        "served": {name: served.count(name) for name in sorted(set(served) - {None})},
    }


def cannot_run(p: Params, champion: Callable[[], int | None] | None = None) -> str | None:
    """Why the serving bench cannot run on this checkout (None when it can). `champion` reads
    the registry's champion version (default: MLflow's)."""
    if read_route(p.path("routing")) is None:
        if champion is None:
            from pipelines.release.deploy import MlflowRegistry

            champion = MlflowRegistry(p).champion
        if champion() is None:
            return "no champion is registered: run `make run` (or `sqlops release`) first"
    from pipelines.serving.vllm_server import VLLMAdmin

    installed = external_vllm() or VLLMRuntime.of(p).problem() is None
    if not installed and not VLLMAdmin(vllm_url(p.serving)).healthy():
        return "vLLM is not installed: run `make serve-setup`"
    return None


@contextlib.contextmanager
def serving_up(p: Params) -> Iterator[None]:
    """vLLM + gateway for the load test: servers already up are used and left running; what
    this starts (`sqlops serve --background`) is stopped by PID afterwards."""
    from pipelines.release.deploy import serve
    from pipelines.serving.vllm_server import VLLMAdmin, stop_background

    cfg = p.serving
    health = f"http://{cfg.host}:{cfg.gateway_port}/health"
    try:
        r = httpx.get(health, timeout=5)
    except httpx.HTTPError:
        r = None
    if r is not None:
        if r.status_code != 200:
            raise RuntimeError(f"the gateway at {health} is up but unhealthy: {r.text[:200]}")
        yield
        return
    vllm_was_up = VLLMAdmin(vllm_url(cfg)).healthy()
    try:
        if serve(p, background=True) != 0:
            raise RuntimeError(
                f"serving did not start; see vllm.log and gateway.log in {p.path('run_dir')}"
            )
        yield
    finally:
        stop_background("gateway", p.path("run_dir"))
        if not vllm_was_up:
            stop_background("vllm", p.path("run_dir"))


def run(
    p: Params, requests: int = REQUESTS, concurrency: int = CONCURRENCY, swaps: int = SWAPS
) -> dict:
    """Both measurements against running servers: <paths.bench>/gateway.json, paths.hot_swap."""
    p.path("bench").mkdir(parents=True, exist_ok=True)
    b = bench(p, requests, concurrency)
    (p.path("bench") / "gateway.json").write_text(json.dumps(b, indent=2) + "\n")
    print(json.dumps(b, indent=2))
    from pipelines.serving.vllm_server import serves_merged

    if serves_merged(p):  # a switch restarts vLLM (~1 min on 2 cores): two of them
        h = restart_switch(p, min(swaps, 2))
    else:
        h = hot_swap(p, requests, concurrency, swaps)
    p.path("hot_swap").write_text(json.dumps(h, indent=2) + "\n")
    print(json.dumps(h, indent=2))
    return {"gateway": b, "hot_swap": h}


def main() -> None:
    setup_entry_point()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=REQUESTS)
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY)
    ap.add_argument("--swaps", type=int, default=SWAPS)
    args = ap.parse_args()
    run(load_params(), args.requests, args.concurrency, args.swaps)


if __name__ == "__main__":
    main()
