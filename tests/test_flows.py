"""The training flow's wiring under Prefect's test harness, on a throwaway DVC project:
each dvc.yaml stage becomes one task, in order, and a second run skips what is up to date."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
DVC = str(Path(sys.executable).with_name("dvc"))

DVC_YAML = """
stages:
  first:
    cmd: python -c "import time; open('a.txt','w').write(str(time.time()))"
    outs: [a.txt]
  second:
    cmd: python -c "open('b.txt','w').write(open('a.txt').read())"
    deps: [a.txt]
    outs: [b.txt]
"""


@pytest.fixture(scope="module")
def prefect_harness():
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def dvc_project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "site-cache"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    return tmp_path


def test_training_flow_runs_each_dvc_stage_as_a_task(prefect_harness, dvc_project):
    from prefect.client.orchestration import get_client

    from flows.training import dvc_stages, training

    assert dvc_stages(dvc_project) == ["first", "second"]
    state = training(run_release=False, root=dvc_project, return_state=True)
    assert state.is_completed()
    first = (dvc_project / "b.txt").read_text()
    assert first == (dvc_project / "a.txt").read_text()

    import asyncio

    async def task_names():
        async with get_client() as client:
            runs = await client.read_task_runs()
            return sorted(r.name for r in runs if r.flow_run_id == state.state_details.flow_run_id)

    assert asyncio.run(task_names()) == ["dvc-first", "dvc-second"]

    training(run_release=False, root=dvc_project)  # up to date: DVC skips both stages
    assert (dvc_project / "b.txt").read_text() == first
