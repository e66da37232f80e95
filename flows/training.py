"""The training flow: every DVC stage as its own Prefect task, then the release.

DVC decides what is stale (`dvc repro --single-item <stage>` skips an up-to-date stage in about
a second), Prefect shows the DAG, retries and schedules it. The release registers and gates the
new adapter; when the gate promotes it and a model is being served (a gateway route and a vLLM
that answers), the promoted version is deployed at once (hot swap, smoke test, rollback on
failure), so a drift-triggered retraining reaches users without a person. Run it with
`sqlops flow training` (ephemeral Prefect) or serve it against `make ui`'s Prefect server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task

from flows.release import deploy_task, register_and_gate_task
from pipelines.config import ROOT, load_params
from pipelines.release.deploy import is_serving


def dvc_stages(root: Path = ROOT) -> list[str]:
    """Stage names in dvc.yaml order (the file lists them in dependency order)."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


@task(task_run_name="dvc-{stage}", retries=1, retry_delay_seconds=10)
def dvc_stage(stage: str, root: Path = ROOT) -> None:
    logger = get_run_logger()
    dvc = Path(sys.executable).with_name("dvc")
    proc = subprocess.run(
        [str(dvc), "repro", "--single-item", stage], cwd=root, capture_output=True, text=True
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip():
            logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc stage {stage} failed (exit {proc.returncode})")


@flow(name="training", log_prints=True)
def training(run_release: bool = True, root: Path = ROOT) -> dict | None:
    for stage in dvc_stages(root):
        dvc_stage(stage, root)
    if not run_release:
        return None
    result = register_and_gate_task()
    if result["promoted"] and is_serving(load_params()):
        result["deployed"] = deploy_task(result["version"])
    return result
