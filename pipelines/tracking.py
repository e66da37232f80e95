"""MLflow set-up shared by every stage and the CLI: tracking URI, experiment, lineage tags.

Defaults come from params.yaml (`mlflow:`): a SQLite store and artifacts inside the repo.
`MLFLOW_TRACKING_URI` in the environment points everything at a real server instead; a new
experiment then keeps its artifacts in the server's store (S3/MinIO in infra/).
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from pipelines.config import MlflowConfig, resolve, sqlite_url


def tracking_uri(cfg: MlflowConfig) -> str:
    return sqlite_url(os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri)


def artifact_location(cfg: MlflowConfig, uri: str) -> Path | None:
    """Where a new experiment keeps artifacts: `mlflow.artifact_location` with a local store;
    None (the server's default artifact root) with a tracking server, since a path on this
    machine would be unreadable to every other client (gateway, UI, other workers)."""
    if uri.startswith(("http://", "https://")):
        return None
    return resolve(cfg.artifact_location)


def configure_mlflow(cfg: MlflowConfig) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_registry_uri(tracking_uri(cfg))
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        mlflow.set_experiment(cfg.experiment)
        return exp.experiment_id
    location = artifact_location(cfg, tracking_uri(cfg))
    if location is None:
        exp_id = mlflow.create_experiment(cfg.experiment)
    else:
        location.mkdir(parents=True, exist_ok=True)
        exp_id = mlflow.create_experiment(cfg.experiment, artifact_location=location.as_uri())
    mlflow.set_experiment(cfg.experiment)
    return exp_id
