"""Publishing drift checks: one MLflow run per check, the retrain history, a markdown summary.

Checks go to their own experiment, `<mlflow.experiment>-monitoring`, so that training runs stay
comparable side by side. A run holds every signal's score as a metric (`drift.<signal>`), the
Evidently HTML report and the `DriftResult` JSON as artifacts, and the tag
`retrain_triggered` that `retrain_history()` reads back for the cooldown and the daily limit.
Teacher labelling runs (pipelines/monitoring/teacher.py) are logged there too.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from pipelines.config import MlflowConfig
from pipelines.monitoring.drift import DriftResult
from pipelines.monitoring.teacher import Labelling
from pipelines.tracking import configure_mlflow

TRIGGER_TAG = "retrain_triggered"


def _use_monitoring_experiment(cfg: MlflowConfig) -> str:
    return configure_mlflow(
        cfg.model_copy(
            update={
                "experiment": f"{cfg.experiment}-monitoring",
                "artifact_location": cfg.artifact_location / "monitoring",
            }
        )
    )


def retrain_history(cfg: MlflowConfig, since: float) -> list[float]:
    """Check times (unix seconds) of the checks since `since` that triggered retraining."""
    import mlflow

    exp_id = _use_monitoring_experiment(cfg)
    runs = mlflow.search_runs(
        [exp_id],
        filter_string=f"tags.{TRIGGER_TAG} = 'true' and metrics.check_time >= {since}",
        output_format="list",
    )
    return sorted(r.data.metrics["check_time"] for r in runs)


def log_check(cfg: MlflowConfig, result: DriftResult, retrain: bool, reasons: list[str]) -> str:
    """Record one drift check and its decision; returns the MLflow run id."""
    import mlflow

    _use_monitoring_experiment(cfg)
    check_time = result.until or time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(check_time))
    with mlflow.start_run(run_name=f"drift-check {stamp}") as run:
        mlflow.set_tags(
            {
                TRIGGER_TAG: str(retrain).lower(),
                "drifted": str(result.drifted).lower(),
                "drifted_signals": ", ".join(result.drifted_signals) or "none",
                "decision": "; ".join(reasons),
            }
        )
        mlflow.log_metrics(
            {
                "check_time": check_time,
                "n_current": result.n_current,
                "seconds": result.seconds,
                **{
                    f"drift.{name}": s["score"]
                    for name, s in result.signals.items()
                    if s["score"] is not None
                },
            }
        )
        if result.report_path is not None:
            mlflow.log_artifact(str(result.report_path), "drift")
            mlflow.log_artifact(str(result.report_path.with_suffix(".json")), "drift")
        return run.info.run_id


def summary_markdown(result: DriftResult, retrain: bool, reasons: list[str]) -> str:
    """A table of the signals and the decision, for the Prefect UI."""
    lines = [
        f"**{result.n_current} requests**, drift: **{', '.join(result.drifted_signals) or 'none'}**"
        f"; retrain: **{'yes' if retrain else 'no'}** ({'; '.join(reasons)})",
        "",
        "| signal | score | threshold | method | drifted |",
        "|---|---|---|---|---|",
    ]
    for name, s in result.signals.items():
        flag = "**yes**" if s["drifted"] else "no"
        lines.append(f"| {name} | {s['score']} | {s['threshold']} | {s['method']} | {flag} |")
    if result.report_path is not None:
        lines += ["", f"Evidently report: `{result.report_path}`"]
    return "\n".join(lines)


def log_labelling(cfg: MlflowConfig, out: Labelling) -> str:
    """Record one teacher labelling run (`teacher-labels <time>`, beside the drift checks):
    how many requests were picked, accepted, quarantined and deferred, and what they cost;
    the report (`paths.teacher_report`'s content) as an artifact. Returns the run id."""
    import mlflow

    _use_monitoring_experiment(cfg)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(out.until))
    with mlflow.start_run(run_name=f"teacher-labels {stamp}") as run:
        mlflow.set_tags({"teacher": out.teacher, "teacher_kind": out.kind})
        counts = ("doubtful", "picked", "cached", "accepted", "quarantined", "deferred",
                  "overridden", "calls", "cost_usd", "seconds")  # fmt: skip
        mlflow.log_metrics({f"teacher.{k}": float(getattr(out, k)) for k in counts})
        mlflow.log_metrics({f"teacher.rejected.{k}": v for k, v in out.rejected.items()})
        mlflow.log_dict(asdict(out) | {"labels": [r["id"] for r in out.labels]}, "teacher.json")
        return run.info.run_id


def labelling_markdown(out: Labelling) -> str:
    """The labelling run as a table, for the Prefect UI."""
    lines = [
        f"**teacher {out.teacher}** ({out.kind}): {out.doubtful} doubtful requests, "
        f"${out.cost_usd:.4f} in {out.calls} calls",
        "",
        "| picked | accepted | quarantined | deferred | skipped |",
        "|---|---|---|---|---|",
        f"| {out.picked} | {out.accepted} | {out.quarantined} | {out.deferred} "
        f"| {out.skipped or '-'} |",
        "",
        "| quarantine rule | labels |",
        "|---|---|",
        *(f"| {rule} | {n} |" for rule, n in sorted(out.rejected.items())),
    ]
    return "\n".join(lines)
