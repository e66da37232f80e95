"""The closed-loop demo (`make demo`): drift in live traffic → feedback → retraining → promotion.

1. Serve the champion (vLLM + gateway, started if needed).
2. Users of the trained domains ask fresh questions: the drift check reports no retraining.
3. Users switch to the held-out domain (`data.eval_domains`): the drift check reports drift.
4. Part of that traffic gets corrections through the gateway's `/v1/feedback`.
5. The monitoring flow exports the verified feedback as a new DVC data version and runs the
   training flow (every DVC stage, then register + gate), which deploys what the gate
   promoted into the running vLLM (no restart).
6. Execution accuracy on the drifted domain, before (the old champion's held-out evaluation)
   and after (the new version's, same examples), goes to `reports/demo.json`.

Every step is a Prefect flow or task run (the Prefect UI shows them after `make ui`), and the
retraining is an MLflow run and model version. The demo lifts the retraining cooldown for its
own check only, so it can be rerun. Run: `make demo` or `sqlops flow demo` (needs a champion:
`make run` first).
"""

from __future__ import annotations

import json
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.monitoring import monitoring, triggered_training
from mlflow import MlflowClient
from pipelines.config import ROOT, Params, load_params
from pipelines.data.records import read_jsonl
from pipelines.eval.metrics import pooled_accuracy
from pipelines.monitoring import simulate
from pipelines.release.deploy import serve
from pipelines.release.gate import promoted_version
from pipelines.release.registry import (
    CHAMPION,
    current_version,
    list_versions,
    version_metrics,
)
from pipelines.serving.routing import read_route
from pipelines.tracking import configure_mlflow


def domain_accuracy(p: Params, version: int, domains: list[str]) -> float | None:
    """A version's held-out execution accuracy on `domains` (from the eval it was registered
    with)."""
    configure_mlflow(p.mlflow)
    metrics = version_metrics(MlflowClient(), p.registry.model_name, version)
    return pooled_accuracy(metrics["tuned"]["by_domain"], domains)


def champion(p: Params) -> int | None:
    configure_mlflow(p.mlflow)
    return current_version(MlflowClient(), p.registry.model_name, CHAMPION)


def newest_version(p: Params) -> dict:
    """The release outcome as the registry shows it: newest version and the champion."""
    return {"version": max(v["version"] for v in list_versions(p)), "champion": champion(p)}


@task
def start_serving(p: Params) -> str:
    if serve(p, background=True) != 0:
        logs = p.path("run_dir")
        raise RuntimeError(f"could not serve the champion; see vllm.log and gateway.log in {logs}")
    return f"http://{p.serving.host}:{p.serving.gateway_port}"


@task(task_run_name="traffic-{label}")
def traffic(p: Params, gateway: str, label: str, domains: list[str], n: int, seed: int) -> list:
    prepared = p.path("prepared")
    known = read_jsonl(prepared / "train.jsonl") + read_jsonl(prepared / "eval.jsonl")
    questions = simulate.fresh_questions(
        domains,
        -(-n // len(domains)),
        p.synth,
        p.seed,
        seed,
        prepared / "databases",
        known,
    )[:n]
    return simulate.ask(gateway, questions, concurrency=4)


@task
def feedback(gateway: str, answers: list[dict], share: float, seed: int) -> int:
    return simulate.give_feedback(gateway, answers, share, seed)


def window_hours(since: float) -> float:
    return (time.time() - since) / 3600 + 1e-3


@flow(name="demo", log_prints=True)
def demo() -> dict:
    logger = get_run_logger()
    p = load_params()
    cfg = p.demo
    start = time.time()
    before_version = champion(p)
    if before_version is None:
        raise ValueError("no champion to serve: run `make run` (or `sqlops release`) first")
    drifted = list(p.data.eval_domains)
    trained = [d for d in p.synth.domains if d not in drifted]
    before = domain_accuracy(p, before_version, drifted)
    gateway = start_serving(p)

    phase = time.time()
    traffic(p, gateway, "trained-domains", trained, cfg.requests_per_phase, p.seed + 1)
    calm = monitoring(window_hours=window_hours(phase), retrain=False)
    logger.info("trained-domain traffic: drift %s", calm["drifted_signals"] or "none")

    phase = time.time()
    answers = traffic(p, gateway, "drifted-domain", drifted, cfg.requests_per_phase, p.seed + 2)
    n_feedback = feedback(gateway, answers, cfg.feedback_share, p.seed)
    policy = {
        "cooldown_hours": cfg.cooldown_hours,
        "max_retrains_per_day": cfg.max_retrains_per_day,
    }
    check = monitoring(window_hours=window_hours(phase), retrain=True, overrides=policy)

    if not check["should_retrain"]:
        raise RuntimeError(f"the drifted traffic did not trigger retraining: {check['reasons']}")
    if check["retrain"] == "event":  # a Prefect server's deployment trigger runs the training
        run_id, state = triggered_training(check["event_at"], timeout_s=3 * 3600)
        check["retrain_flow_run"] = run_id
        check["retrain_release"] = newest_version(p) if state == "Completed" else None
    release = check["retrain_release"]
    if release is None:
        raise RuntimeError(f"retraining failed: see flow run {check['retrain_flow_run']}")
    promoted = promoted_version(release, before_version)
    route = read_route(p.path("routing"))
    result = {
        "drift_detected": bool(check["should_retrain"]),
        "retrain_flow_run": check.get("retrain_flow_run"),
        "promoted_version": promoted,
        "drifted_domain_ex_before": before,
        "drifted_domain_ex_after": domain_accuracy(p, release["version"], drifted),
        "seconds": round(time.time() - start, 1),
        "champion_before": before_version,
        "retrained_version": release["version"],
        "drifted_domains": drifted,
        "trained_domain_check": {k: calm[k] for k in ("drifted_signals", "should_retrain")},
        "drifted_domain_check": {k: check[k] for k in ("drifted_signals", "reasons")},
        "feedback_recorded": n_feedback,
        "served_after": route.model if route else None,  # training hot-swaps a promotion
    }
    report = p.path("demo_report")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2))
    result["report"] = str(report.relative_to(ROOT))
    create_markdown_artifact(key="demo", markdown=summary(result))
    print(summary(result))
    return result


def summary(r: dict) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    calm, check = r["trained_domain_check"], r["drifted_domain_check"]
    domains = ", ".join(r["drifted_domains"])
    lines = [
        f"- trained-domain traffic: drifted {calm['drifted_signals'] or 'none'}, "
        f"retrain {calm['should_retrain']}",
        f"- {domains} traffic: drifted {check['drifted_signals'] or 'none'}, "
        f"retrain {r['drift_detected']}",
        f"- feedback corrections recorded: {r['feedback_recorded']}",
        f"- retraining flow run {r['retrain_flow_run']}, version {r['retrained_version']}, "
        f"promoted: {r['promoted_version'] is not None}",
        f"- execution accuracy on {domains}: {pct(r['drifted_domain_ex_before'])} "
        f"(v{r['champion_before']}) -> {pct(r['drifted_domain_ex_after'])} "
        f"(v{r['retrained_version']})",
        f"- {r['seconds'] / 60:.1f} min; report: {r.get('report')}",
    ]
    return "\n".join(lines)
