"""Merged serving (`serving.merged: true`): each switch restarts the model server on the
version's merged weights under `text2sql-v<N>`. The server is the vLLM stand-in run as a real
process (tests/fake_vllm.py, merged mode: one served name, no LoRA endpoints), started and
stopped by PID like vLLM; the merges are real (tiny base model, random adapters)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import httpx
import pytest

from pipelines.config import load_params
from pipelines.model.merge import INFO_FILE
from pipelines.release.deploy import deploy, route_to
from pipelines.serving.backend import BackendUnavailable, VLLMCompletions
from pipelines.serving.routing import read_route
from pipelines.serving.service import Text2SQL
from pipelines.serving.vllm_server import (
    MergedServer,
    serves_merged,
    stop_background,
    vllm_command,
    vllm_env,
)
from tests.conftest import GAME_QA
from tests.test_backends import make_adapter
from tests.test_deploy import FakeRegistry


class AdapterRegistry(FakeRegistry):
    """Registered versions as real (random) adapters on the tiny base model."""

    def __init__(self, root: Path, base_dir: Path, champion: int):
        super().__init__(root, champion)
        self.base_dir = base_dir

    def adapter_path(self, version: int) -> Path:
        path = self.root / f"v{version}"
        if not (path / "adapter_config.json").is_file():
            make_adapter(self.base_dir, path, seed=version)
        return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def merged(tmp_path, prepared_dir, tiny_base_dir, monkeypatch):
    """(params, server, registry, smoke service, run dir) with merged serving on a free port."""
    from transformers import AutoTokenizer

    monkeypatch.delenv("SQLOPS_VLLM_URL", raising=False)
    run_dir = tmp_path / "run"
    p = load_params().replace(
        serving={
            "merged": True,
            "vllm_port": free_port(),
            "smoke_questions": 3,
            "vllm_startup_timeout_s": 60,
        },
        paths={
            "prepared": prepared_dir,
            "base_model": tiny_base_dir,
            "merged_models": tmp_path / "merged",
            "routing": tmp_path / "routing.json",
            "deploy_lock": tmp_path / "deploy.lock",
            "run_dir": run_dir,
        },
    )
    serving = p.serving
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({q: sql for q, sql, *_ in GAME_QA}))

    def command(model: Path, name: str) -> list[str]:
        return [
            sys.executable, "-m", "tests.fake_vllm", "--port", str(serving.vllm_port),
            "--served-model-name", name, "--model", str(model), "--answers", str(answers),
        ]  # fmt: skip

    server = MergedServer(p, command)
    backend = VLLMCompletions(f"{server.root}/v1", 5.0, 64)
    service = Text2SQL(serving, prepared_dir / "databases", AutoTokenizer.from_pretrained(
        tiny_base_dir), backend)  # fmt: skip
    registry = AdapterRegistry(tmp_path / "adapters", tiny_base_dir, champion=1)
    try:
        yield p, server, registry, service, run_dir
    finally:
        stop_background("vllm", run_dir)


def served_root(server: MergedServer) -> Path:
    (model,) = httpx.get(f"{server.root}/v1/models").json()["data"]
    return Path(model["root"])


def test_vllm_command_merged_vs_adapters():
    p = load_params()
    merged = p.model_copy(update={"serving": p.serving.model_copy(update={"merged": True})})
    cmd = vllm_command(merged, Path("/m/abc"), "text2sql-v3")
    assert "--enable-lora" not in cmd and "--max-lora-rank" not in cmd
    assert cmd[cmd.index("--served-model-name") + 1] == "text2sql-v3"
    assert cmd[cmd.index("--model") + 1] == "/m/abc"
    eager = merged.replace(vllm={"enforce_eager": True})
    assert "--enforce-eager" in vllm_command(eager, Path("/m/abc"), "text2sql-v3")
    compiled = merged.replace(vllm={"enforce_eager": False})
    assert "--enforce-eager" not in vllm_command(compiled, Path("/m/abc"), "text2sql-v3")
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in vllm_env(merged)
    with pytest.raises(ValueError):
        vllm_command(merged)
    adapters = p.replace(serving={"merged": False})
    lora = vllm_command(adapters)
    assert "--enable-lora" in lora and "--served-model-name" not in lora
    assert vllm_env(adapters)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


@pytest.mark.parametrize(
    "flags, cuda, vllm_url, merged",
    [
        ("avx2 fma", False, None, True),  # AVX2-only CPU: vLLM's CPU LoRA path stalls
        ("avx2 avx512f avx512_bf16", False, None, False),
        ("avx2 amx_bf16", False, None, False),
        ("avx2 fma", True, None, False),  # CUDA: fused LoRA kernels
        ("avx2 fma", False, "http://127.0.0.1:9", False),  # not ours to restart
    ],
    ids=["avx2", "avx512-bf16", "amx", "cuda", "external-vllm"],
)
def test_auto_serves_merged_only_where_runtime_lora_stalls(
    flags, cuda, vllm_url, merged, tmp_path, monkeypatch
):
    from pipelines.model import devices

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
    files = {"/proc/cpuinfo": cpuinfo, "/dev/nvidiactl": Path(tmp_path / "nvidiactl")}
    monkeypatch.setattr(devices, "Path", lambda path: files[path])
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: cuda)
    if vllm_url:
        monkeypatch.setenv("SQLOPS_VLLM_URL", vllm_url)
    else:
        monkeypatch.delenv("SQLOPS_VLLM_URL", raising=False)
    devices.cpu_has_native_bf16.cache_clear()
    try:
        auto = load_params().replace(serving={"merged": "auto"})
        assert serves_merged(auto) is merged
        assert ("--enable-lora" in vllm_command(auto, Path("/m"), "text2sql-v1")) is not merged
        for setting in (True, False):  # an explicit choice is kept, whatever the hardware
            assert serves_merged(auto.replace(serving={"merged": setting})) is setting
    finally:
        devices.cpu_has_native_bf16.cache_clear()


def test_deploy_restarts_on_the_merged_model_then_routes(merged):
    p, server, registry, service, run_dir = merged
    r = deploy(p, server=server, registry=registry, service=service)
    assert r.ok and r.smoke.n_ok == r.smoke.n == 3 and r.name == "text2sql-v1"
    assert server.loaded() == ["text2sql-v1"]
    v1_dir = served_root(server)
    assert v1_dir.parent == p.path("merged_models") and (v1_dir / INFO_FILE).is_file()
    route = read_route(p.path("routing"))
    assert (route.model, route.adapter_path) == ("text2sql-v1", None)  # nothing to hot-load
    pid1 = int((run_dir / "vllm.pid").read_text())

    deploy(p, 1, server=server, registry=registry, service=service)  # already served
    assert int((run_dir / "vllm.pid").read_text()) == pid1

    r = deploy(p, 2, server=server, registry=registry, service=service)
    pid2 = int((run_dir / "vllm.pid").read_text())
    assert r.ok and pid2 != pid1 and r.unloaded == []
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid1, 0)  # the old server is gone, not left beside the new one
    assert server.loaded() == ["text2sql-v2"] and served_root(server) != v1_dir
    assert read_route(p.path("routing")).model == "text2sql-v2"

    # A request still naming the old version gets a reason, and no LoRA load is tried.
    with pytest.raises(BackendUnavailable, match="not loaded on the model server"):
        asyncio.run(service.backend.complete("text2sql-v1", "### Question:\nx", None))


def test_smoke_failure_restarts_the_previous_merged_model(merged):
    p, server, registry, service, run_dir = merged
    deploy(p, server=server, registry=registry, service=service)
    v1_dir = served_root(server)
    stamp = (v1_dir / INFO_FILE).stat().st_mtime_ns
    registry.set_champion(2)
    r = deploy(p, server=server, registry=registry, service=service, force_smoke_failure=True)
    assert not r.ok and r.rolled_back_to == 1 and registry.moves == [2, 1]
    assert server.loaded() == ["text2sql-v1"] and served_root(server) == v1_dir
    assert (v1_dir / INFO_FILE).stat().st_mtime_ns == stamp  # the merge was reused
    assert read_route(p.path("routing")).model == "text2sql-v1"
    assert len(list(p.path("merged_models").glob("*/" + INFO_FILE))) == 2

    route_to(p, 2, server, registry)  # `sqlops rollback --to 2` on merged serving
    assert server.loaded() == ["text2sql-v2"]
    assert read_route(p.path("routing")).version == 2
