"""The release flow's wiring under Prefect's test harness: gate → deploy, with the smoke-test
outcome (here a rollback) in the flow's result. The steps themselves are tested in
test_deploy.py and test_evaluate_release.py."""

from __future__ import annotations

import os

import pytest

from pipelines.release.deploy import DeployResult, SmokeResult
from pipelines.release.gate import Decision
from pipelines.release.registry import ReleaseResult

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def test_release_flow_gates_then_deploys_and_reports_the_rollback(prefect_harness, monkeypatch):
    import flows.release as flow_module

    decision = Decision(True, ["execution accuracy 0.700 vs champion 0.500"])
    monkeypatch.setattr(
        flow_module, "register_and_gate", lambda p: ReleaseResult(3, "run", decision, 3, False)
    )
    deployed = []

    def fake_deploy(p, version, force_smoke_failure=False):
        deployed.append((version, force_smoke_failure))
        smoke = SmokeResult(False, 0, 1, ["canary -> bad_request"])
        return DeployResult(version, f"text2sql-v{version}", smoke, rolled_back_to=2)

    monkeypatch.setattr(flow_module, "deploy_version", fake_deploy)
    out = flow_module.release(force_smoke_failure=True)
    assert deployed == [(3, True)]
    assert out == {
        "version": 3,
        "champion": 3,
        "promoted": True,
        "served": "text2sql-v3",
        "ok": False,
        "rolled_back_to": 2,
    }
