"""Serve the Prefect deployments that close the loop (needs a Prefect server, e.g. `make ui`):

- `training/training`: nightly (`monitoring.training_cron`), by hand
  (`prefect deployment run training/training`), and on every `sqlops.drift.detected` event
  through a deployment trigger;
- `monitoring/monitoring`: the drift check, hourly (`monitoring.monitoring_cron`); it emits that
  event when `should_retrain()` says so.

Run: `PREFECT_API_URL=http://127.0.0.1:4200/api sqlops prefect serve` (stop with SIGTERM).
Event triggers need a real server; in ephemeral mode the monitoring flow runs training itself.
"""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from flows.monitoring import DRIFT_EVENT, monitoring
from flows.training import training
from pipelines.config import Params, load_params


def deployments(p: Params) -> list[RunnerDeployment]:
    retrain_on_drift = DeploymentEventTrigger(
        name="retrain-on-drift", expect={DRIFT_EVENT}, parameters={"run_release": True}
    )
    return [
        training.to_deployment(
            name="training",
            cron=p.monitoring.training_cron,
            triggers=[retrain_on_drift],
            description="every DVC stage as a task, then register + gate + promote",
        ),
        monitoring.to_deployment(
            name="monitoring",
            cron=p.monitoring.monitoring_cron,
            description="drift of recent traffic vs the training questions; may retrain",
        ),
    ]


def serve_deployments() -> None:
    """Serve both deployments until SIGTERM (`sqlops prefect serve`)."""
    serve(*deployments(load_params()))
