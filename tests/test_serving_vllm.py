"""The real thing: vLLM (from .venv-vllm) on loopback with a runtime-loaded LoRA adapter, behind
the gateway. Slow (vLLM needs ~60 s to start on 2 cores); skipped without `make serve-setup`
or without the base model (`dvc repro base_model`)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.config import load_params
from pipelines.release.deploy import deploy
from pipelines.serving.backend import VLLMCompletions
from pipelines.serving.gateway import create_app
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import RouteWatcher
from pipelines.serving.service import Text2SQL
from tests.real_vllm import needs_real_vllm, running_vllm

P = load_params().replace(serving={"merged": False})  # runtime LoRA is under test
pytestmark = [
    pytest.mark.slow,
    needs_real_vllm,
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AdapterDir:
    def __init__(self, path: Path):
        self.path, self.moves = path, []

    def champion(self) -> int:
        return 1

    def set_champion(self, version: int) -> None:
        self.moves.append(version)

    def clear_champion(self) -> None:
        self.moves.append(None)

    def note_failure(self, version: int, reason: str) -> None:
        self.failure = reason

    def adapter_path(self, version: int) -> Path:
        return self.path

    def base_path(self, version: int) -> Path | None:
        return None  # the base vLLM serves


@pytest.fixture(scope="module")
def real_vllm(tmp_path_factory):
    """(params pointing at a private vLLM, admin); the server is stopped by its process group."""
    tmp = tmp_path_factory.mktemp("vllm")
    p = P.replace(
        serving={"vllm_port": free_port(), "smoke_min_pass": 0},
        paths={"routing": tmp / "routing.json"},
    )
    with running_vllm(p, tmp) as admin:
        yield p, admin, tmp


def test_adapter_hot_loads_and_gateway_answers(real_vllm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p, admin, tmp = real_vllm
    adapter = tmp / "adapter"
    base = AutoModelForCausalLM.from_pretrained(p.path("base_model"))
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    get_peft_model(base, lora).save_pretrained(adapter)

    tok = AutoTokenizer.from_pretrained(p.path("base_model"))
    backend = VLLMCompletions(admin.root + "/v1", 120, 48)
    service = Text2SQL(p.serving, p.path("prepared") / "databases", tok, backend)
    registry = AdapterDir(adapter)
    r = deploy(p, 1, server=admin, registry=registry, service=service)
    assert r.ok and admin.loaded() == ["text2sql-v1"]

    ilog = InferenceLog(f"sqlite:///{tmp}/inference.db")
    app = create_app(service, ilog, RouteWatcher(p.path("routing")))
    with TestClient(app) as client:
        db_id = next((p.path("prepared") / "databases").glob("*.sqlite")).stem
        body = {"question": "How many rows are in the first table?", "db_id": db_id}
        resp = client.post("/v1/sql", json=body | {"execute": True})
        assert resp.status_code in (200, 422), resp.text  # a model answer, not a server error
        assert resp.json()["model_version"] == "text2sql-v1"
        assert client.get("/health").status_code == 200
