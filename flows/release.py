"""The release flow: register → gate → deploy → smoke test → automatic rollback on failure.

Each step is a task around a `pipelines.release` function, so the Prefect UI shows where a
release stopped; the gate's decision and the smoke test's outcome are Prefect artifacts. Run it
with `sqlops flow release` (ephemeral Prefect) or serve it against `make ui`'s Prefect server.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipelines.config import load_params
from pipelines.release.deploy import deploy as deploy_version
from pipelines.release.deploy import deploy_lock
from pipelines.release.registry import release as register_and_gate


@task
def register_and_gate_task() -> dict:
    r = register_and_gate(load_params())
    create_markdown_artifact(
        key="release-decision", markdown=r.decision.markdown(), description=f"v{r.version}"
    )
    get_run_logger().info("version %d: %s", r.version, "; ".join(r.decision.reasons))
    return {"version": r.version, "champion": r.champion, "promoted": r.decision.promote}


@task
def deploy_task(version: int | None, force_smoke_failure: bool = False) -> dict:
    p = load_params()
    with deploy_lock(p):  # the gateway's reconcile loop deploys too
        r = deploy_version(p, version, force_smoke_failure=force_smoke_failure)
    lines = [f"- smoke test of {r.name}: {r.smoke.n_ok}/{r.smoke.n} canaries executed"]
    lines += [f"- failed: {f}" for f in r.smoke.failures]
    if r.rolled_back_to is not None:
        lines.append(f"- **rolled back** to v{r.rolled_back_to} (alias and routing)")
    create_markdown_artifact(key="release-smoke-test", markdown="\n".join(lines))
    return {"served": r.name, "ok": r.ok, "rolled_back_to": r.rolled_back_to}


@flow(name="release", log_prints=True)
def release(force_smoke_failure: bool = False) -> dict:
    """Deploys the champion after the gate (the new version, or the unchanged champion)."""
    gate = register_and_gate_task()
    served = deploy_task(gate["champion"], force_smoke_failure)
    return gate | served
