"""What the gateway exposes: off loopback it needs an API key (or an explicit opt-in), the k8s
example secrets hold no usable password, and vLLM's own API key goes on every call to vLLM,
adapter reloads included (against the vLLM stand-in, which checks it like `--api-key`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pipelines.config import ROOT, load_params
from pipelines.release import server
from pipelines.serving.backend import BackendUnavailable, VLLMCompletions
from pipelines.serving.vllm_server import VLLMAdmin
from tests.fake_vllm import FakeVLLM


@pytest.mark.parametrize(
    ("host", "key", "insecure", "refused"),
    [
        ("127.0.0.1", None, False, False),
        ("::1", None, False, False),
        ("localhost", None, False, False),
        ("0.0.0.0", None, False, True),
        ("10.1.2.3", None, False, True),
        ("gateway.internal", None, False, True),
        ("0.0.0.0", "k", False, False),
        ("0.0.0.0", None, True, False),
    ],
)
def test_off_loopback_needs_a_key_or_an_explicit_opt_in(host, key, insecure, refused):
    assert (server.exposure_problem(host, key, insecure) is not None) == refused


def test_the_process_refuses_to_start_open(monkeypatch, capsys):
    p = load_params().replace(serving={"host": "0.0.0.0"})
    monkeypatch.setattr(server, "load_params", lambda: p)
    monkeypatch.delenv("SQLOPS_API_KEY", raising=False)
    monkeypatch.delenv("SQLOPS_ALLOW_INSECURE", raising=False)
    with pytest.raises(SystemExit) as stopped:
        server.main([])
    assert stopped.value.code == 2 and "SQLOPS_API_KEY" in capsys.readouterr().err


def test_k8s_example_secrets_hold_no_usable_password():
    example = Path(ROOT / "infra" / "k8s" / "secrets.env.example").read_text()
    values = dict(
        line.split("=", 1) for line in example.splitlines() if "=" in line and line[0] != "#"
    )
    assert values["PGPASSWORD"] == "" and values["SQLOPS_API_KEY"] == ""


def test_vllm_api_key_is_sent_on_completions_and_adapter_reloads(monkeypatch):
    with FakeVLLM({"q": "SELECT 1"}) as vllm:
        vllm.api_key = "vllm-key"
        backend = VLLMCompletions(vllm.base_url, 2.0, 8)
        monkeypatch.delenv("SQLOPS_VLLM_API_KEY", raising=False)
        with pytest.raises(BackendUnavailable):
            asyncio.run(backend.complete("text2sql-v1", "### Question:\nq", "/adapters/v1"))
        monkeypatch.setenv("SQLOPS_VLLM_API_KEY", "vllm-key")
        backend = VLLMCompletions(vllm.base_url, 2.0, 8)
        # not loaded (vLLM restarted): reloaded with the key, then answered
        text = asyncio.run(backend.complete("text2sql-v1", "### Question:\nq", "/adapters/v1"))
        assert text == "SELECT 1" and vllm.adapters == {"text2sql-v1": "/adapters/v1"}
        assert asyncio.run(backend.health()) is None
        admin = VLLMAdmin(vllm.base_url)
        admin.load("text2sql-v2", Path("/adapters/v2"))
        assert admin.loaded() == ["text2sql-v1", "text2sql-v2"]
