"""End to end on loopback: a real `mlflow server` (SQLite store), real webhook delivery to the
gateway app as its process builds it (pipelines/release/server.py, served by uvicorn via
tests/loopback.py, its reconcile loop running), the vLLM stand-in (tests/fake_vllm.py, a process
with runtime LoRA that sqlops restarts when a version is on another base model: the real vLLM
takes minutes to start on CPU; the real-vLLM run is pipelines/bench/registry_switch.py).
Versions 1 and 3 are on one tiny base model, version 2 on another (their weights logged to the
MLflow server once each, as `sqlops release` logs them).

- an alias moved through the REST API the MLflow UI uses is served within seconds (webhook);
- a webhook signed with the wrong secret is refused (401) and nothing moves;
- a gateway that was down when the alias moved corrects itself (reconcile loop);
- the MLflow UI itself in headless Chromium: `champion` moved with the alias editor to a version
  on another base model and back is served each time, on the version's own base.
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
from pipelines.serving.routing import read_route
from pipelines.serving.vllm_server import AdapterServer, stop_background
from tests.loopback import LoopbackServer
from tests.mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.slow
SECRET = "e2e-secret"
MODEL = "text2sql"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, two_bases) -> Iterator[MlflowServer]:
    """One server for the module (it takes 7-33 s to start), with versions 1-3 registered
    straight into its store (as `sqlops release` does: v1 and v3 on base A, v2 on base B) and
    `champion` on v1."""
    from mlflow import MlflowClient
    from pipelines.config import MlflowConfig
    from pipelines.model.base_store import BaseRef, log_base, read_info

    root = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(root, SECRET)
    client = MlflowClient(tracking_uri=server.store_uri, registry_uri=server.store_uri)
    cfg = MlflowConfig(tracking_uri=server.store_uri, artifact_location=root / "artifacts",
                       experiment="e2e")  # fmt: skip
    refs = [BaseRef(read_info(b)["id"], read_info(b)["weights_sha256"], log_base(client, cfg, b))
            for b in two_bases]  # fmt: skip
    client.create_registered_model(MODEL)
    for v, ref in zip((1, 2, 3), (refs[0], refs[1], refs[0]), strict=True):
        adapter = root / "adapters" / f"v{v}"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")  # the stand-in loads any folder
        client.create_model_version(MODEL, source=str(adapter), tags=ref.tags())
    client.set_registered_model_alias(MODEL, "champion", "1")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stack(mlflow_server, tmp_path, prepared_dir, two_bases, monkeypatch):
    """(server, params, vLLM stand-in, gateway port) with `champion` back on v1; the stand-in
    runs on base A (`paths.base_model`); base B is only in MLflow."""
    from tests.test_base_store import fake_vllm_command

    monkeypatch.delenv("SQLOPS_VLLM_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SQLOPS_WEBHOOK_SECRET", SECRET)
    mlflow_server.set_alias(MODEL, "champion", 1)
    port = free_port()
    p = load_params().replace(
        serving={
            "merged": False,  # the stand-in serves runtime LoRA adapters
            "vllm_port": port,
            "smoke_questions": 2,
            "vllm_startup_timeout_s": 60,
            "inference_log_url": f"sqlite:///{tmp_path}/inference.db",
        },
        paths={
            "prepared": prepared_dir,
            "base_model": two_bases[0],
            "base_models": tmp_path / "bases",
            "routing": tmp_path / "routing.json",
            "deploy_lock": tmp_path / "deploy.lock",
            "served_adapters": tmp_path / "served",
            "run_dir": tmp_path / "run",
        },
        mlflow={
            "tracking_uri": mlflow_server.store_uri,
            "artifact_location": tmp_path / "artifacts",
            "experiment": "e2e",
        },
    )
    command = fake_vllm_command(port, tmp_path)
    vllm = AdapterServer(p, command).start()
    try:
        yield mlflow_server, p, vllm, free_port()
    finally:
        stop_background("vllm", p.path("run_dir"))


@contextlib.contextmanager
def running_gateway(p, port: int, vllm: AdapterServer) -> Iterator[str]:
    """The gateway with its reconcile loop on 127.0.0.1:`port`; stopped afterwards (killed,
    as far as MLflow's deliveries can tell). Its model server restarts the stand-in."""
    app, loop = gateway(p, server_factory=lambda: AdapterServer(p, vllm.command))
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
    server, p, vllm, port = stack
    hook = f"http://127.0.0.1:{port}{PATH}"
    only_webhooks = p.replace(serving={"reconcile_s": 0})  # the loop runs once, at start
    with running_gateway(only_webhooks, port, vllm) as url, caplog.at_level(logging.WARNING):
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
        assert "text2sql-v3" in vllm.loaded()  # v1 and v3 share a base: a hot swap

    # The gateway is down while the alias moves: the webhook goes nowhere.
    server.set_alias(MODEL, "champion", 2)
    with running_gateway(p.replace(serving={"reconcile_s": 1}), port, vllm) as url:
        reconcile_s = wait_served(url, 2, timeout_s=30)  # v2's base: vLLM restarted on it
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
def test_champion_moved_in_the_mlflow_ui_is_served(stack, two_bases):
    """The MLflow UI's model page in headless Chromium: the alias editor moves `champion` from
    v1 (base A) to v2 (base B, fetched from MLflow) and back; the gateway serves each on its
    own base model."""
    from pipelines.model.base_store import read_info, store_folder
    from tests.mlflow_ui import move_alias_in_ui

    server, p, vllm, port = stack
    register(server.url, f"http://127.0.0.1:{port}{PATH}", SECRET)
    time.sleep(1.5)
    shots = p.path("ui_screenshots")
    with running_gateway(p.replace(serving={"reconcile_s": 0}), port, vllm) as url:
        wait_served(url, 1)
        for version, base in ((2, two_bases[1]), (1, two_bases[0])):
            move_alias_in_ui(server.url, MODEL, "champion", version, shots, CHROMIUM, CHROMEDRIVER)
            seconds = wait_served(url, version, timeout_s=30)
            print(f"\nUI alias move -> v{version} served: {seconds:.2f} s")
            stored = store_folder(p.path("base_models"), read_info(base)["weights_sha256"])
            assert read_route(p.path("routing")).base_path == str(stored) == vllm.base()
    assert (shots / "champion-moved.png").is_file()
