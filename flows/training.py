"""The training flow: every DVC stage as its own Prefect task, then the release.

DVC decides what is stale (`dvc repro --single-item <stage>` skips an up-to-date stage in about
a second), Prefect shows the DAG, retries and schedules it. The release registers and gates the
new adapter; when the gate promotes it and a model is being served (a gateway route and a vLLM
that answers), the promoted version is deployed at once (hot swap, smoke test, rollback on
failure), so a drift-triggered retraining reaches users without a person. Run it with
`sqlops flow training` (ephemeral Prefect) or serve it against `make ui`'s Prefect server.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task

from flows.release import deploy_task
from pipelines.config import ROOT, Params, load_params
from pipelines.release.registry import release as release_model
from pipelines.serving.backend import vllm_url
from pipelines.serving.routing import read_route
from pipelines.serving.vllm_server import VLLMAdmin

log = logging.getLogger(__name__)


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


@task
def release() -> dict:
    r = release_model(load_params())
    get_run_logger().info(
        "version %d, champion v%s: %s", r.version, r.champion, "; ".join(r.decision.reasons)
    )
    return {"version": r.version, "champion": r.champion, "promoted": r.decision.promote}


def serving(p: Params) -> bool:
    """Whether a model is being served: the gateway has a route and its vLLM answers."""
    if read_route(ROOT / p.serving.routing_file) is None:
        return False
    return VLLMAdmin(vllm_url(p.serving)).healthy()


@flow(name="training", log_prints=True)
def training(run_release: bool = True, root: Path = ROOT) -> dict | None:
    for stage in dvc_stages(root):
        dvc_stage(stage, root)
    if not run_release:
        return None
    result = release()
    if result["promoted"] and serving(load_params()):
        result["deployed"] = deploy_task(result["version"])
    return result
