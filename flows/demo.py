"""The closed-loop demo (`make demo`): drift in live traffic → feedback → retraining → promotion.

1. Serve the champion (vLLM + gateway, started if needed).
2. Users of the trained domains ask fresh questions: the drift check reports no retraining.
3. Users switch to the held-out domain (`data.eval_domains`): the drift check reports drift.
4. The new data, by `arm`: `human` (default) - part of that traffic gets corrections through
   the gateway's `/v1/feedback`; `teacher` - no person at all: the teacher labels the doubtful
   requests (pipelines/monitoring/teacher.py), the feedback source is emptied for the run;
   `none` - no new data, no retraining (the control).
5. The monitoring flow exports the new data as a new DVC data version and runs the training
   flow (every DVC stage, then register + gate), which deploys what the gate promoted.
6. Execution accuracy on the drifted domain, before (the old champion's held-out evaluation)
   and after (the new version's, same examples) with the paired-bootstrap 95% interval of the
   gain, labels picked / accepted / quarantined, their precision against the traffic's gold
   SQL, cost and minutes go to `reports/demo.json` and `reports/demo-<arm>.json`;
   `reports/demo-arms.md` tabulates every arm run so far. Run the arms from the same champion
   (`sqlops rollback --to N` between them) for a like-for-like table.

Every step is a Prefect flow or task run (the Prefect UI shows them after `make ui`), and the
retraining is an MLflow run and model version. The demo lifts the retraining cooldown for its
own check only, so it can be rerun. Run: `make demo` or `sqlops flow demo` (needs a champion:
`make run` first).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.monitoring import monitoring, triggered_training
from mlflow import MlflowClient
from pipelines.config import ROOT, Params, load_params
from pipelines.data.records import read_jsonl
from pipelines.eval.metrics import bootstrap_ci, pooled_accuracy
from pipelines.monitoring import feedback as feedback_source
from pipelines.monitoring import simulate, teacher
from pipelines.release.deploy import serve
from pipelines.release.gate import promoted_version
from pipelines.release.registry import (
    CHAMPION,
    current_version,
    list_versions,
    version_metrics,
    version_outcomes,
)
from pipelines.serving.routing import read_route
from pipelines.tracking import configure_mlflow


def domain_accuracy(p: Params, version: int, domains: list[str]) -> float | None:
    """A version's held-out execution accuracy on `domains` (from the eval it was registered
    with)."""
    configure_mlflow(p.mlflow)
    metrics = version_metrics(MlflowClient(), p.registry.model_name, version)
    return pooled_accuracy(metrics["tuned"]["by_domain"], domains)


def paired_gain(
    before: dict[str, bool] | None, after: dict[str, bool] | None, samples: int, seed: int
) -> dict | None:
    """Mean per-example gain of `after` over `before` on the examples both were scored on, with
    its paired-bootstrap 95% interval (None when they share no example)."""
    common = sorted(set(before or {}) & set(after or {}))
    if not common:
        return None
    diffs = [int(after[i]) - int(before[i]) for i in common]
    lo, hi = bootstrap_ci(diffs, samples, seed)
    return {"n": len(common), "gain": sum(diffs) / len(common), "ci95": [lo, hi]}


def tuned_outcomes(p: Params, version: int) -> dict[str, bool] | None:
    configure_mlflow(p.mlflow)
    outcomes = version_outcomes(MlflowClient(), p.registry.model_name, version)
    return (outcomes or {}).get("tuned")


def set_aside(path: Path, aside_dir: Path) -> Path | None:
    """Move a data source's file out of the way for this arm (kept, not deleted)."""
    if not path.is_file():
        return None
    aside_dir.mkdir(parents=True, exist_ok=True)
    target = aside_dir / f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}"
    path.replace(target)
    return target


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


@task
def isolate_sources(p: Params, arm: str) -> list[str]:
    """Only the arm's new data may train: the teacher arm empties the feedback source (it is a
    function of the log: `python -m pipelines.monitoring.feedback` rebuilds it), the human arm
    sets the teacher's labels aside (under reports/demo-aside/)."""
    moved = []
    if arm == "teacher":
        databases = p.path("prepared") / "databases"
        feedback_source.write_source(p.path("feedback"), databases, [], [])
        moved.append("feedback emptied")
    elif arm == "human":
        aside = set_aside(p.path("teacher") / teacher.SOURCE_FILE, p.path("demo_report").parent)
        moved += [f"teacher labels set aside: {aside}"] if aside else []
    return moved


@task
def teacher_labels(p: Params, phase: float, answers: list[dict]) -> dict:
    """The teacher's labels of the drifted phase (people's labels of earlier arms ignored), and
    their precision against the traffic's gold SQL."""
    out = teacher.label_logged(p, since=phase, human_since=phase)
    matched, known = simulate.label_precision(
        out.labels, answers, p.path("prepared") / "databases", p.validate_.sql_timeout_s
    )
    return {
        "picked": out.picked,
        "accepted": out.accepted,
        "quarantined": out.quarantined,
        "rejected": out.rejected,
        "label_precision": matched / known if known else None,
        "cost_usd": out.cost_usd,
        "teacher": f"{out.teacher} ({out.kind})",
    }


@flow(name="demo", log_prints=True)
def demo(arm: str = "human") -> dict:
    """The closed loop with one arm's new data: `none`, `human` or `teacher` (module doc)."""
    if arm not in ("none", "human", "teacher"):
        raise ValueError(f"unknown demo arm {arm!r}: none, human or teacher")
    logger = get_run_logger()
    p = load_params()
    cfg = p.demo
    start = time.time()
    before_version = champion(p)
    if before_version is None:
        raise ValueError("no champion to serve: run `make run` (or `sqlops release`) first")
    drifted = list(p.data.eval_domains)
    trained = [d for d in p.synth.domains if d not in drifted]
    gateway = start_serving(p)

    phase = time.time()
    traffic(p, gateway, "trained-domains", trained, cfg.requests_per_phase, p.seed + 1)
    calm = monitoring(window_hours=window_hours(phase), retrain=False)
    logger.info("trained-domain traffic: drift %s", calm["drifted_signals"] or "none")

    phase = time.time()
    answers = traffic(p, gateway, "drifted-domain", drifted, cfg.requests_per_phase, p.seed + 2)
    share = cfg.feedback_share if arm == "human" else 0.0
    n_feedback = feedback(gateway, answers, share, p.seed) if share else 0
    moved = isolate_sources(p, arm)
    labels = teacher_labels(p, phase, answers) if arm == "teacher" else None
    policy = {
        "cooldown_hours": cfg.cooldown_hours,
        "max_retrains_per_day": cfg.max_retrains_per_day,
    }
    check = monitoring(
        window_hours=window_hours(phase),
        retrain=arm != "none",
        overrides=policy,
        export=arm == "human",
        label=False,  # the teacher arm labelled its own phase above
    )
    if arm == "none":
        return finish(p, arm, start, before_version, drifted, calm, check, None, None)
    if not check["should_retrain"]:
        raise RuntimeError(f"the drifted traffic did not trigger retraining: {check['reasons']}")
    if check["retrain"] == "event":  # a Prefect server's deployment trigger runs the training
        run_id, state = triggered_training(check["event_at"], timeout_s=3 * 3600)
        check["retrain_flow_run"] = run_id
        check["retrain_release"] = newest_version(p) if state == "Completed" else None
    release = check["retrain_release"]
    if release is None:
        raise RuntimeError(f"retraining failed: see flow run {check['retrain_flow_run']}")
    if arm == "human":
        exported = check.get("feedback") or {}
        labels = {"picked": exported.get("labelled"), "accepted": exported.get("verified"),
                  "quarantined": exported.get("quarantined"), "label_precision": None,
                  "cost_usd": 0.0, "teacher": "people (the traffic's gold SQL)"}  # fmt: skip
    return finish(p, arm, start, before_version, drifted, calm, check, release, labels,
                  feedback_recorded=n_feedback, sources=moved)  # fmt: skip


def finish(
    p: Params,
    arm: str,
    start: float,
    before_version: int,
    drifted: list[str],
    calm: dict,
    check: dict,
    release: dict | None,
    labels: dict | None,
    **extra: object,
) -> dict:
    """The arm's figures into `reports/demo.json` and `demo-<arm>.json`, the table of every
    arm run so far into `demo-arms.md`, the Prefect artifact and the log."""
    after_version = release["version"] if release else before_version
    before = domain_accuracy(p, before_version, drifted)
    gain = None
    if release:
        samples = p.registry.bootstrap_samples
        before_ok, after_ok = tuned_outcomes(p, before_version), tuned_outcomes(p, after_version)
        gain = paired_gain(before_ok, after_ok, samples, p.seed)
    route = read_route(p.path("routing"))
    result = {
        "arm": arm,
        "drift_detected": bool(check["should_retrain"]),
        "retrain_flow_run": check.get("retrain_flow_run"),
        "promoted_version": promoted_version(release, before_version) if release else None,
        "drifted_domain_ex_before": before,
        "drifted_domain_ex_after": domain_accuracy(p, after_version, drifted),
        "paired_gain": gain,  # {n, gain, ci95}: after - before on the same examples
        "labels": labels,  # picked / accepted / quarantined / label_precision / cost_usd
        "seconds": round(time.time() - start, 1),
        "champion_before": before_version,
        "retrained_version": release["version"] if release else None,
        "drifted_domains": drifted,
        "trained_domain_check": {k: calm[k] for k in ("drifted_signals", "should_retrain")},
        "drifted_domain_check": {k: check[k] for k in ("drifted_signals", "reasons")},
        "served_after": route.model if route else None,  # training hot-swaps a promotion
        **extra,
    }
    report = p.path("demo_report")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2))
    report.with_name(f"{report.stem}-{arm}.json").write_text(json.dumps(result, indent=2))
    runs = [report.with_name(f"{report.stem}-{a}.json") for a in ARMS]
    table = arms_table([json.loads(r.read_text()) for r in runs if r.is_file()])
    report.with_name(f"{report.stem}-arms.md").write_text(table + "\n")
    result["report"] = str(report.relative_to(ROOT))
    create_markdown_artifact(key="demo", markdown=summary(result) + "\n\n" + table)
    print(summary(result))
    print(table)
    return result


ARMS = ("none", "human", "teacher")


def arms_table(results: list[dict]) -> str:
    """One row per demo arm: the issue's columns."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        "| arm | EX before | EX after | gain (paired 95% CI) | picked | accepted | quarantined "
        "| label precision | cost | minutes |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        g, lab = r.get("paired_gain"), r.get("labels") or {}
        gain = (
            "n/a"
            if g is None
            else (
                f"{100 * g['gain']:+.1f} pts [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]"
            )
        )
        cost = lab.get("cost_usd")
        lines.append(
            f"| {r['arm']} | {pct(r['drifted_domain_ex_before'])} "
            f"| {pct(r['drifted_domain_ex_after'])} | {gain} | {lab.get('picked', 0)} "
            f"| {lab.get('accepted', 0)} | {lab.get('quarantined', 0)} "
            f"| {pct(lab.get('label_precision'))} | {'n/a' if cost is None else f'${cost:.2f}'} "
            f"| {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


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
        f"- arm {r['arm']}: new labels {r['labels'] or 'none'}",
        f"- retraining flow run {r['retrain_flow_run']}, version {r['retrained_version']}, "
        f"promoted: {r['promoted_version'] is not None}",
        f"- execution accuracy on {domains}: {pct(r['drifted_domain_ex_before'])} "
        f"(v{r['champion_before']}) -> {pct(r['drifted_domain_ex_after'])} "
        f"(v{r['retrained_version']})",
        f"- {r['seconds'] / 60:.1f} min; report: {r.get('report')}",
    ]
    return "\n".join(lines)
