"""End to end on loopback: a real `mlflow server` (SQLite store), real webhook delivery to the
gateway app as its process builds it (pipelines/release/server.py, served by uvicorn via
tests/loopback.py, its reconcile loop running), the vLLM stand-in (tests/fake_vllm.py: the real
vLLM takes minutes to start on CPU; the real-vLLM run is pipelines/bench/registry_switch.py).

- an alias moved through the REST API the MLflow UI uses is served within seconds (webhook);
- a webhook signed with the wrong secret is refused (401) and nothing moves;
- a gateway that was down when the alias moved corrects itself (reconcile loop);
- the MLflow UI itself in headless Chromium: `champion` moved with the alias editor is served.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipelines.config import load_params
from pipelines.release.server import gateway
from pipelines.release.webhook import PATH, register
from tests.conftest import GAME_QA
from tests.fake_vllm import FakeVLLM
from tests.loopback import LoopbackServer
from tests.mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.slow
SECRET = "e2e-secret"
MODEL = "text2sql"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """One server for the module (it takes 7-33 s to start), with versions 1-3 registered
    straight into its store (as `sqlops release` does) and `champion` on v1."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(root, SECRET)
    client = MlflowClient(tracking_uri=server.store_uri, registry_uri=server.store_uri)
    client.create_registered_model(MODEL)
    for v in (1, 2, 3):
        adapter = root / "adapters" / f"v{v}"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")  # the stand-in loads any folder
        client.create_model_version(MODEL, source=str(adapter))
    client.set_registered_model_alias(MODEL, "champion", "1")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stack(mlflow_server, tmp_path, prepared_dir, tiny_base_dir, monkeypatch):
    """(server, params, vLLM stand-in, gateway port) with `champion` back on v1."""
    monkeypatch.delenv("SQLOPS_VLLM_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SQLOPS_WEBHOOK_SECRET", SECRET)
    mlflow_server.set_alias(MODEL, "champion", 1)
    with FakeVLLM({q: sql for q, sql, *_ in GAME_QA}) as fake:
        p = load_params().replace(
            serving={
                "merged": False,  # the stand-in serves runtime LoRA adapters
                "vllm_port": fake.port,
                "smoke_questions": 2,
                "inference_log_url": f"sqlite:///{tmp_path}/inference.db",
            },
            paths={
                "prepared": prepared_dir,
                "base_model": tiny_base_dir,
                "routing": tmp_path / "routing.json",
                "deploy_lock": tmp_path / "deploy.lock",
                "served_adapters": tmp_path / "served",
            },
            mlflow={
                "tracking_uri": mlflow_server.store_uri,
                "artifact_location": tmp_path / "artifacts",
                "experiment": "e2e",
            },
        )
        yield mlflow_server, p, fake, free_port()


@contextlib.contextmanager
def running_gateway(p, port: int) -> Iterator[str]:
    """The gateway with its reconcile loop on 127.0.0.1:`port`; stopped afterwards (killed,
    as far as MLflow's deliveries can tell)."""
    app, loop = gateway(p)
    with LoopbackServer(app, port) as gw:
        loop.start()
        try:
            yield gw.url
        finally:
            loop.stop()


def served(url: str) -> int | None:
    s = httpx.get(f"{url}/v1/models", timeout=10).json()["served"]
    return s["version"] if s else None


def wait_served(
    url: str, version: int, timeout_s: float = 60.0, since: float | None = None
) -> float:
    """Seconds (from `since`, a perf_counter reading, or now) until the gateway's /v1/models
    says `version` is served."""
    start = since or time.perf_counter()
    while served(url) != version:
        assert time.perf_counter() - start < timeout_s, f"v{version} not served in time"
        time.sleep(0.1)
    return time.perf_counter() - start


def test_alias_moves_through_mlflow_reach_serving(stack, caplog):
    server, p, fake, port = stack
    hook = f"http://127.0.0.1:{port}{PATH}"
    only_webhooks = p.replace(serving={"reconcile_s": 0})  # the loop runs once, at start
    with running_gateway(only_webhooks, port) as url, caplog.at_level(logging.WARNING):
        wait_served(url, 1)
        # A webhook whose secret is not the gateway's: MLflow delivers, the gateway says 401.
        register(server.url, hook, "not-the-secret")
        server.set_alias(MODEL, "champion", 2)
        deadline = time.monotonic() + 30
        while "webhook refused: bad signature" not in caplog.text:
            assert time.monotonic() < deadline, "MLflow delivered nothing"
            time.sleep(0.1)
        time.sleep(1)
        assert served(url) == 1  # nothing moved
        # The gateway's secret: the move reaches serving through the webhook alone.
        register(server.url, hook, SECRET)
        time.sleep(1.5)  # the server caches its webhook list (MLFLOW_WEBHOOK_CACHE_TTL=1)
        start = time.perf_counter()
        server.set_alias(MODEL, "champion", 3)
        webhook_s = wait_served(url, 3, timeout_s=30, since=start)
        print(f"\nalias move -> v3 served via webhook: {webhook_s:.2f} s")
        assert fake.adapters.keys() >= {"text2sql-v3"}

    # The gateway is down while the alias moves: the webhook goes nowhere.
    server.set_alias(MODEL, "champion", 2)
    with running_gateway(p.replace(serving={"reconcile_s": 1}), port) as url:
        reconcile_s = wait_served(url, 2, timeout_s=30)
        print(f"gateway restarted -> v2 served via reconcile: {reconcile_s:.2f} s")
        # /v1/models moves when the deploy writes the route; /health reports the check once it
        # has finished, a moment later.
        deadline = time.monotonic() + 10
        while "champion" not in (health := httpx.get(f"{url}/health").json()["registry"]):
            assert time.monotonic() < deadline, health
            time.sleep(0.1)
        assert (health["champion"], health["served"], health["in_sync"]) == (2, 2, True)
    assert webhook_s < 10 and reconcile_s < 10


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="needs Debian's chromium: sudo apt-get install -y chromium chromium-driver",
)
def test_champion_moved_in_the_mlflow_ui_is_served(stack):
    """The MLflow UI's model page in headless Chromium: the alias editor moves `champion` from
    v1 to v2; the gateway then serves v2."""
    from tests.mlflow_ui import move_alias_in_ui

    server, p, _, port = stack
    register(server.url, f"http://127.0.0.1:{port}{PATH}", SECRET)
    time.sleep(1.5)
    shots = p.path("ui_screenshots")
    with running_gateway(p.replace(serving={"reconcile_s": 0}), port) as url:
        wait_served(url, 1)
        move_alias_in_ui(server.url, MODEL, "champion", 2, shots, CHROMIUM, CHROMEDRIVER)
        seconds = wait_served(url, 2, timeout_s=30)
        print(f"\nUI alias move -> v2 served: {seconds:.2f} s")
    assert (shots / "champion-moved.png").is_file()
