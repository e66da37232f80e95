"""The monitoring flow: drift check → MLflow run + Prefect artifact → retrain decision → retrain.

When `should_retrain()` says so, the flow exports the verified feedback corrections to the
feedback data source, has the teacher label the doubtful traffic into the teacher data source
(pipelines/monitoring/teacher.py: an MLflow run and a Prefect artifact with what was picked,
accepted, quarantined and what it cost) and emits the Prefect event `sqlops.drift.detected`.
Where a Prefect server holds the `training` deployment (served by `sqlops prefect serve`),
that deployment's trigger starts the training flow; otherwise (ephemeral Prefect, no
deployment) this flow runs the training flow itself, as a subflow.

Run once: `sqlops flow monitoring [--hours N] [--no-retrain]`; scheduled: `sqlops prefect serve`.
"""

from __future__ import annotations

import os
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from flows.training import training
from pipelines.config import Params, load_params
from pipelines.monitoring import drift, feedback, report, teacher
from pipelines.monitoring.policy import history_horizon_s, should_retrain

DRIFT_EVENT = "sqlops.drift.detected"
TRAINING_DEPLOYMENT = "training/training"


@task
def check_drift(p: Params, now: float) -> drift.DriftResult:
    return drift.run(
        p.monitoring,
        p.path("prepared") / "train.jsonl",
        p.serving.inference_log_url,
        p.path("monitoring"),
        p.seed,
        now,
    )


@task
def decide(p: Params, result: drift.DriftResult, now: float) -> tuple[bool, list[str]]:
    history = report.retrain_history(p.mlflow, now - history_horizon_s(p.monitoring))
    return should_retrain(result, now, history, p.monitoring)


@task
def publish(p: Params, result: drift.DriftResult, retrain: bool, reasons: list[str]) -> str:
    run_id = report.log_check(p.mlflow, result, retrain, reasons)
    create_markdown_artifact(
        key="drift-check",
        markdown=report.summary_markdown(result, retrain, reasons),
        description=f"drift check, MLflow run {run_id}",
    )
    return run_id


@task
def export_feedback(p: Params) -> feedback.FeedbackExport:
    return feedback.export_logged(p)


@task
def label_traffic(p: Params) -> dict | None:
    """The teacher's labels of the doubtful traffic (None, with a warning, when no teacher is
    available: no endpoint and no served champion)."""
    logger = get_run_logger()
    try:
        out = teacher.label_logged(p)
    except ValueError as e:
        logger.warning("teacher labelling skipped: %s", e)
        return None
    run_id = report.log_labelling(p.mlflow, out)
    create_markdown_artifact(
        key="teacher-labels",
        markdown=report.labelling_markdown(out),
        description=f"teacher labelling, MLflow run {run_id}",
    )
    logger.info(teacher.summary_line(out))
    return {"accepted": out.accepted, "quarantined": out.quarantined, "picked": out.picked,
            "cost_usd": out.cost_usd, "mlflow_run_id": run_id}  # fmt: skip


def training_deployed() -> bool:
    """Whether a Prefect server holds the `training` deployment (then its trigger retrains)."""
    if not os.environ.get("PREFECT_API_URL"):
        return False
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(TRAINING_DEPLOYMENT)
        except ObjectNotFound:
            return False
    return True


def triggered_training(since: float, timeout_s: float) -> tuple[str, str]:
    """(flow run id, final state name) of the first run of the `training` deployment expected
    to start after `since` (unix seconds): the run the drift event's trigger created, awaited."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    after = datetime.fromtimestamp(since, UTC)
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(TRAINING_DEPLOYMENT)
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(
                    expected_start_time=FlowRunFilterExpectedStartTime(after_=after)
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=1,
            )
            if runs and runs[0].state is not None and runs[0].state.is_final():
                return str(runs[0].id), runs[0].state.name
            time.sleep(5)
    raise TimeoutError(f"no triggered `training` run finished within {timeout_s:.0f} s")


@flow(name="monitoring", log_prints=True)
def monitoring(
    window_hours: float | None = None,
    retrain: bool = True,
    now: float | None = None,
    overrides: dict | None = None,
    export: bool = True,
    label: bool = True,
) -> dict:
    """Check the last `window_hours` (default: params.yaml) of traffic ending at `now`
    (default: the current time); retrain when the policy says so and `retrain` is on, first
    exporting the feedback (`export`) and the teacher's labels (`label`) as data sources.
    `overrides` replaces `monitoring:` params for this run (the demo lifts the cooldown)."""
    logger = get_run_logger()
    p = load_params()
    update = {**(overrides or {}), **({"window_hours": window_hours} if window_hours else {})}
    if update:
        logger.info("monitoring params for this run: %s", update)
        checked = type(p.monitoring).model_validate(p.monitoring.model_dump() | update)
        p = p.model_copy(update={"monitoring": checked})
    now = time.time() if now is None else now
    result = check_drift(p, now)
    should, reasons = decide(p, result, now)
    run_id = publish(p, result, should, reasons)
    logger.info("drift: %s; retrain: %s (%s)", result.drifted_signals, should, "; ".join(reasons))
    out = {
        "drifted": result.drifted,
        "drifted_signals": result.drifted_signals,
        "should_retrain": should,
        "reasons": reasons,
        "mlflow_run_id": run_id,
        "report": str(result.report_path) if result.report_path else None,
        "retrain": None,
    }
    if not (should and retrain):
        return out
    exported = export_feedback(p) if export else None
    if exported is not None:
        out["feedback"] = {"labelled": exported.n_labelled, "verified": exported.n_verified,
                           "quarantined": len(exported.quarantine)}  # fmt: skip
    out["teacher"] = label_traffic(p) if label else None
    out["event_at"] = time.time()
    emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"sqlops.monitoring.{run_id}"},
        payload={
            "drifted_signals": result.drifted_signals,
            "reasons": reasons,
            "n_current": result.n_current,
            "feedback_examples": exported.n_verified if exported else 0,
            "teacher_labels": (out["teacher"] or {}).get("accepted", 0),
            "mlflow_run_id": run_id,
        },
    )
    if training_deployed():
        out["retrain"] = "event"  # the `training` deployment's trigger takes it from here
    else:
        state = training(return_state=True)
        out["retrain"] = "subflow"
        out["retrain_flow_run"] = str(state.state_details.flow_run_id)
        # The release's {version, champion, promoted}; None when the training flow failed.
        out["retrain_release"] = state.result() if state.is_completed() else None
    return out
