"""Publishing drift checks: one MLflow run per check, the retrain history, a markdown summary.

Checks go to their own experiment, `<mlflow.experiment>-monitoring`, so that training runs stay
comparable side by side. A run holds every signal's score as a metric (`drift.<signal>`), the
Evidently HTML report and the `DriftResult` JSON as artifacts, and the tag
`retrain_triggered` that `retrain_history()` reads back for the cooldown and the daily limit.
"""

from __future__ import annotations

import time

from pipelines.config import MlflowConfig
from pipelines.monitoring.drift import DriftResult
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
