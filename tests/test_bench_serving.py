"""`make bench`'s serving part (`python -m pipelines.bench serving`): skipped with a reason when
no champion is registered; against running servers (the vLLM stand-in and a real gateway on
127.0.0.1) it writes reports/bench/gateway.json in the output contract and hot_swap.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipelines.bench.compare import bench_serving
from pipelines.config import load_params
from pipelines.serving.backend import VLLMCompletions
from pipelines.serving.gateway import create_app
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import Route, RouteWatcher, read_route, write_route
from pipelines.serving.service import Text2SQL
from tests.fake_vllm import FakeVLLM
from tests.loopback import LoopbackServer
from tests.test_backends import make_adapter
from tests.test_deploy_merged import merged  # noqa: F401  (fixture)


def params_for(tmp_path: Path, **paths):
    """params.yaml with the routing file and the reports under `tmp_path`."""
    out = tmp_path / "reports"
    reports = {"bench": out / "bench", "hot_swap": out / "hot_swap.json"}
    return load_params().replace(paths={"routing": tmp_path / "routing.json", **reports, **paths})


def test_skipped_with_reason_when_no_champion(tmp_path, mlflow_cfg, caplog):
    p = params_for(tmp_path).model_copy(update={"mlflow": mlflow_cfg})
    out = tmp_path / "reports"
    with caplog.at_level(logging.WARNING):
        assert bench_serving(p) is None
    assert "serving bench skipped: no champion is registered" in caplog.text
    assert not out.exists()  # nothing half-written, no servers started


@pytest.fixture
def running(tmp_path, prepared_dir, tiny_base_dir, monkeypatch):
    """(params, fake vLLM) with text2sql-v1 loaded and routed and a real gateway app up."""
    from transformers import AutoTokenizer

    with FakeVLLM() as vllm:
        vllm.adapters["text2sql-v1"] = "/adapters/v1"
        vllm.delay_s = 0.2  # long enough for the hot swap to flip routes mid-run
        monkeypatch.setenv("SQLOPS_VLLM_URL", vllm.base_url)
        p = params_for(tmp_path, base_model=tiny_base_dir, prepared=prepared_dir)
        routing = p.path("routing")
        write_route(routing, Route("text2sql-v1", 1))
        backend = VLLMCompletions(vllm.base_url, 5.0, p.serving.max_new_tokens)
        tok = AutoTokenizer.from_pretrained(tiny_base_dir)
        service = Text2SQL(p.serving, prepared_dir / "databases", tok, backend)
        app = create_app(
            service, InferenceLog(f"sqlite:///{tmp_path}/log.db"), RouteWatcher(routing)
        )
        gateway = LoopbackServer(app).start()
        try:
            p = p.replace(serving={"gateway_port": gateway.port})
            yield p, vllm
        finally:
            gateway.stop()


def test_writes_gateway_bench_and_hot_swap(tmp_path, running):
    p, vllm = running
    out = tmp_path / "reports"
    result = bench_serving(p, requests=3, concurrency=1, swaps=2)

    gw = json.loads((out / "bench" / "gateway.json").read_text())
    assert gw == result["gateway"]
    assert set(gw) == {"metric", "unit", "sqlops", "baseline", "baseline_name", "ratio", "setup"}
    assert gw["metric"] == "seconds_per_request" and gw["unit"] == "s"
    # ratio = sqlops / baseline (the contract) = direct / via-gateway throughput (the issue).
    assert gw["ratio"] == pytest.approx(gw["sqlops"] / gw["baseline"], rel=0.02)
    throughput = gw["setup"]["direct"]["throughput_rps"] / gw["setup"]["gateway"]["throughput_rps"]
    assert gw["ratio"] == pytest.approx(throughput, rel=0.02)
    assert gw["setup"]["gateway"]["errors"] == 0 and gw["setup"]["direct"]["errors"] == 0
    assert gw["setup"]["requests"] == 6 and gw["setup"]["model"] == "text2sql-v1"

    swap = json.loads((out / "hot_swap.json").read_text())
    assert swap["requests"] == 3 and swap["failed"] == 0 and 1 <= swap["swaps"] <= 2
    assert set(swap["served"]) <= {"text2sql-v1", "text2sql-v1-swapcheck"}
    assert sum(swap["served"].values()) == 3
    # Afterwards the route and vLLM are as before: the swap copy is unloaded, v1 routed.
    assert read_route(p.path("routing")).model == "text2sql-v1"
    assert set(vllm.adapters) == {"text2sql-v1"}


def test_merged_serving_measures_restart_switches(merged, tmp_path):  # noqa: F811
    """With merged serving the switch is a restart (the vLLM stand-in as a real process): the
    clients are answered by both names, the route ends where it began, and each switch says
    how long it took and how long nothing answered."""
    from pipelines.bench.loadtest import restart_switch

    p, server, _, service, _ = merged
    p = p.replace(paths={"served_adapters": tmp_path / "served"})
    make_adapter(p.path("base_model"), p.path("served_adapters") / "text2sql-v1", seed=1)
    server.serve("text2sql-v1", p.path("served_adapters") / "text2sql-v1")
    write_route(p.path("routing"), Route("text2sql-v1", 1))
    app = create_app(
        service, InferenceLog(f"sqlite:///{tmp_path}/log.db"), RouteWatcher(p.path("routing"))
    )
    with LoopbackServer(app) as gateway:
        result = restart_switch(p.replace(serving={"gateway_port": gateway.port}), 2, server)
    assert result["mode"] == "merged" and result["swaps"] == 2
    assert len(result["switch_s"]) == 2 and all(s > 0 for s in result["switch_s"])
    assert all(s is not None for s in result["unavailable_s"])  # each new name answered
    assert {"text2sql-v1", "text2sql-v1-swapcheck"} <= set(result["served"])
    assert result["requests"] == sum(result["served"].values()) + result["failed"]
    assert read_route(p.path("routing")).model == "text2sql-v1"
    assert server.loaded() == ["text2sql-v1"]
