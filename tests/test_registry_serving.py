"""The registry's `champion` drives what is served: the reconcile decision and loop, MLflow's
webhook signature, every deploy path ending consistent, and shadow traffic to the challenger.

Fast: the vLLM stand-in (tests/fake_vllm.py) in process, the registry a stand-in with the same
contract as MLflow's (tests/test_deploy.py). The real MLflow server, webhook delivery and the
MLflow UI in a browser are in tests/test_registry_serving_e2e.py (slow)."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
import sqlalchemy as sa

from pipelines.config import load_params
from pipelines.release.controller import needs_deploy, reconcile
from pipelines.release.gate import LiveErrors, live_check, live_errors, should_promote
from pipelines.release.webhook import (
    DELIVERY_ID,
    PATH,
    SIGNATURE,
    TIMESTAMP,
    is_champion_event,
    sign,
    verify_signature,
)
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import read_route
from pipelines.serving.vllm_server import VLLMAdmin
from tests.inference_logs import OLD_REQUESTS_DDL
from tests.loopback import LoopbackServer
from tests.test_deploy import FakeRegistry, env, run_deploy  # noqa: F401  (fixture)
from tests.test_deploy_merged import merged  # noqa: F401  (fixture)

SECRET = "s3cret"


def signed(body: bytes, secret: str = SECRET, age_s: float = 0) -> dict[str, str]:
    delivery, ts = str(uuid.uuid4()), str(int(time.time() - age_s))
    return {DELIVERY_ID: delivery, TIMESTAMP: ts, SIGNATURE: sign(secret, delivery, ts, body)}


def alias_event(version: int, alias: str = "champion", action: str = "created") -> bytes:
    data = {"name": "text2sql", "alias": alias, "version": str(version)}
    payload = {"entity": "model_version_alias", "action": action, "timestamp": "t", "data": data}
    return json.dumps(payload).encode()


# --- pure decisions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("served", "champion", "deploy"),
    [(1, 1, False), (2, 1, True), (None, 1, True), (1, None, False), (None, None, False)],
)
def test_needs_deploy(served, champion, deploy):
    assert needs_deploy(served, champion) is deploy


def test_signature_matches_mlflows_own_and_refuses_the_rest():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = alias_event(3)
    h = signed(body)
    now = time.time()
    # What MLflow 3.17 sends (its delivery code signs the JSON text it posts).
    assert h[SIGNATURE] == _generate_hmac_signature(
        SECRET, h[DELIVERY_ID], h[TIMESTAMP], body.decode()
    )
    args = (h[SIGNATURE], h[DELIVERY_ID], h[TIMESTAMP])
    assert verify_signature(SECRET, *args, body, now, 300) is None
    assert verify_signature(SECRET, *args, body + b" ", now, 300) == "bad signature"
    assert verify_signature("other", *args, body, now, 300) == "bad signature"
    assert verify_signature(SECRET, None, h[DELIVERY_ID], h[TIMESTAMP], body, now, 300) == (
        "unsigned delivery"
    )
    assert "stale" in verify_signature(SECRET, *args, body, now + 301, 300)
    assert "not set" in verify_signature(None, *args, body, now, 300)
    # Secret rotation: several signatures, one valid.
    assert verify_signature(SECRET, f"v1,AAAA {h[SIGNATURE]}", *args[1:], body, now, 300) is None


def test_only_the_served_alias_of_the_model_counts():
    event = json.loads(alias_event(2))
    assert is_champion_event(event, "text2sql", "champion")
    assert not is_champion_event(json.loads(alias_event(2, "challenger")), "text2sql", "champion")
    assert not is_champion_event(event, "other-model", "champion")


def test_gate_reads_the_live_error_rate_once_there_are_enough_shadow_answers():
    cfg = load_params().registry.model_copy(
        update={"live_min_rows": 10, "live_error_tolerance": 0.05}
    )
    good = live_errors(["ok"] * 9 + ["exec_error"])
    bad = live_errors(["ok"] * 6 + ["exec_error", "guard_rejected"] * 2)
    assert (good.rate, bad.rate) == (0.1, 0.4)
    assert live_check(bad, good, cfg)[0] is False and live_check(good, bad, cfg)[0] is True
    assert live_check(LiveErrors(3, 0), good, cfg) is None  # too few: no check
    m = {"execution_accuracy": 0.6, "valid_sql_rate": 0.9}
    ref = {"execution_accuracy": 0.5}
    assert should_promote(m, ref, ref, cfg).promote
    d = should_promote(m, ref, ref, cfg, live=(bad, good))
    assert not d.promote and "live execution-error rate 0.400" in d.reasons[-1]


# --- reconcile and every deploy path ending consistent ---------------------------------------


def served(p) -> int | None:
    route = read_route(p.path("routing"))
    return route.version if route else None


def test_reconcile_serves_the_champion_and_is_idle_when_in_sync(env):  # noqa: F811
    p, fake, admin, registry, service = env
    r = reconcile(p, server=admin, registry=registry, service=service)
    assert (r.action, r.served, r.champion, r.in_sync) == ("deployed", 1, 1, True)
    calls = sum(fake.calls.values())
    r = reconcile(p, server=admin, registry=registry, service=service)
    assert r.action == "in_sync" and sum(fake.calls.values()) == calls  # nothing redeployed


def test_rollback_while_vllm_is_down_is_served_when_it_is_back(env):  # noqa: F811
    p, fake, admin, registry, service = env
    run_deploy(env, 1)
    registry.set_champion(2)
    run_deploy(env, 2)  # champion v2 served
    fake.stop()
    registry.set_champion(1)  # `sqlops rollback` while vLLM is down
    r = reconcile(p, server=admin, registry=registry, service=service)
    # Not the version's fault: the alias stays where the user put it, and it is retried.
    assert r.action == "failed" and (r.champion, r.served) == (1, 2)
    assert registry.failures == {}
    fake.start()  # `sqlops serve` starts vLLM again; it reconciles first
    r = reconcile(p, server=admin, registry=registry, service=service)
    assert (r.champion, r.served, r.action) == (1, 1, "deployed")


def test_smoke_test_crashing_after_the_route_is_written_rolls_back(env):  # noqa: F811
    p, _, admin, registry, service = env
    run_deploy(env, 1)
    real = service.answer
    calls = {"n": 0}

    async def crash_after_warmup(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 1:  # the warm-up passed, the route was written, then it crashes
            raise RuntimeError("tokenizer exploded")
        return await real(*a, **kw)

    service.answer = crash_after_warmup
    registry.set_champion(2)
    r = reconcile(p, server=admin, registry=registry, service=service)
    assert r.action == "rolled_back" and (r.champion, r.served) == (1, 1)
    assert "smoke test crashed: RuntimeError: tokenizer exploded" in registry.failures[2]


class RefusingServer(VLLMAdmin):
    """vLLM that refuses to (re)load the names in `refuse` while staying healthy."""

    def __init__(self, base_url: str):
        super().__init__(base_url)
        self.refuse: set[str] = set()

    def serve(self, name, adapter, base=None) -> None:
        if name in self.refuse:
            raise RuntimeError(f"vLLM refused to load {name}")
        super().serve(name, adapter, base)


def test_revert_whose_own_reload_fails_leaves_nothing_failed_routed(env):  # noqa: F811
    p, fake, _, registry, service = env
    server = RefusingServer(fake.base_url)
    reconcile(p, server=server, registry=registry, service=service)  # v1 served
    fake.fail_for.add("text2sql-v2")  # v2 fails its smoke test ...
    server.refuse.add("text2sql-v1")  # ... and v1 cannot be loaded again
    registry.set_champion(2)
    r = reconcile(p, server=server, registry=registry, service=service)
    # The alias is back on the last good version; nothing is routed rather than the failed one.
    assert r.action == "rolled_back" and (r.champion, r.served) == (1, None)
    assert "smoke test 0/3" in registry.failures[2]
    server.refuse.clear()  # vLLM recovers: the next tick serves the alias again
    r = reconcile(p, server=server, registry=registry, service=service)
    assert (r.champion, r.served, r.action) == (1, 1, "deployed")


def test_a_version_vllm_cannot_load_leaves_route_and_alias_on_the_previous(env):  # noqa: F811
    p, fake, _, registry, service = env
    server = RefusingServer(fake.base_url)
    reconcile(p, server=server, registry=registry, service=service)
    server.refuse.add("text2sql-v2")
    registry.set_champion(2)
    r = reconcile(p, server=server, registry=registry, service=service)
    assert (r.champion, r.served, r.action) == (1, 1, "rolled_back")
    assert "could not load text2sql-v2" in registry.failures[2]


class MovingRegistry(FakeRegistry):
    """Someone moves `champion` in the UI again while the first move is being deployed."""

    def __init__(self, root, champion, move_during: int, move_to: int):
        super().__init__(root, champion)
        self.move_during, self.move_to = move_during, move_to

    def adapter_path(self, version):
        if version == self.move_during:
            self.set_champion(self.move_to)
        return super().adapter_path(version)


def test_two_quick_alias_moves_the_last_one_wins(env, tmp_path):  # noqa: F811
    p, _, admin, _, service = env
    registry = MovingRegistry(tmp_path / "adapters", 1, move_during=2, move_to=3)
    reconcile(p, server=admin, registry=registry, service=service)
    registry.set_champion(2)
    r = reconcile(p, server=admin, registry=registry, service=service)
    assert (r.champion, r.served, r.in_sync) == (3, 3, True)
    assert registry.moves == [2, 3]


def test_merged_serving_follows_the_champion_by_restarting(merged):  # noqa: F811
    p, server, registry, service, run_dir = merged
    r = reconcile(p, server=server, registry=registry, service=service)
    assert (r.served, r.action) == (1, "deployed") and server.loaded() == ["text2sql-v1"]
    pid = (run_dir / "vllm.pid").read_text()
    registry.set_champion(2)
    r = reconcile(p, server=server, registry=registry, service=service)
    assert (r.champion, r.served) == (2, 2) and server.loaded() == ["text2sql-v2"]
    assert (run_dir / "vllm.pid").read_text() != pid  # a restart, not a hot swap


# --- the gateway with its reconcile loop and webhook -----------------------------------------


@pytest.fixture
def gateway(env, tmp_path, tiny_base_dir, monkeypatch):  # noqa: F811
    """The gateway app as the gateway process builds it (pipelines/release/server.py), with the
    stand-in registry and the vLLM stand-in, on loopback; its reconcile loop not started."""
    from pipelines.release import server as gateway_process

    p, fake, admin, registry, _ = env
    p = p.replace(
        serving={
            "vllm_port": fake.port,
            "reconcile_s": 0.2,
            "shadow_share": 1.0,  # shadow traffic only once a challenger is named
            "inference_log_url": f"sqlite:///{tmp_path}/inference.db",
        },
        paths={"base_model": tiny_base_dir},
    )
    monkeypatch.delenv("SQLOPS_VLLM_URL", raising=False)
    monkeypatch.setenv("SQLOPS_WEBHOOK_SECRET", SECRET)
    challenger = {"v": None}
    app, loop = gateway_process.gateway(
        p,
        registry_factory=lambda: registry,
        server_factory=lambda: admin,
        catalog=lambda: [],
        challenger_version=lambda: challenger["v"],
    )
    try:
        with LoopbackServer(app) as gw:
            yield p, gw, loop, registry, challenger, fake
    finally:
        loop.stop()


def wait_for(check, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_signed_webhook_queues_a_reconcile_and_a_forged_one_is_refused(gateway):
    p, gw, loop, registry, *_ = gateway
    loop.run_once()  # v1 served; the loop itself is not running: a request only queues
    loop._wake.clear()
    registry.set_champion(2)
    body = alias_event(2)
    url = f"{gw.url}{PATH}"
    assert httpx.post(url, content=body).status_code == 401  # unsigned
    forged = signed(body, secret="guess")
    assert httpx.post(url, content=body, headers=forged).status_code == 401
    tampered = signed(alias_event(1))  # a valid signature for another body
    assert httpx.post(url, content=body, headers=tampered).status_code == 401
    assert httpx.post(url, content=body, headers=signed(body, age_s=600)).status_code == 401
    assert not loop._wake.is_set() and served(p) == 1  # nothing moved
    other = alias_event(2, alias="challenger")
    assert httpx.post(url, content=other, headers=signed(other)).json()["status"] == "ignored"
    assert not loop._wake.is_set()
    start = time.perf_counter()
    r = httpx.post(url, content=body, headers=signed(body))
    assert r.status_code == 202 and time.perf_counter() - start < 1.0
    assert loop._wake.is_set() and served(p) == 1  # queued, not deployed in the request


def test_webhook_moves_the_served_version_through_the_loop(gateway):
    p, gw, loop, registry, *_ = gateway
    loop.p = p.replace(serving={"reconcile_s": 0})  # only a webhook wakes it
    loop.start()
    wait_for(lambda: served(p) == 1)
    registry.set_champion(2)
    body = alias_event(2)
    assert httpx.post(f"{gw.url}{PATH}", content=body, headers=signed(body)).status_code == 202
    wait_for(lambda: httpx.get(f"{gw.url}/v1/models").json()["served"]["version"] == 2)


def test_health_and_metrics_show_served_vs_champion(gateway):
    p, gw, loop, registry, _, fake = gateway
    loop.run_once()  # v1 served
    fake.stop()  # vLLM away: the move cannot be served yet
    registry.set_champion(2)
    loop.run_once()
    body = httpx.get(f"{gw.url}/health").json()
    block = body["registry"]
    assert body["model"] == "text2sql-v1" and body["weights"] == "adapter"
    assert (block["served"], block["champion"], block["in_sync"]) == (1, 2, False)
    assert block["action"] == "failed" and block["error"]
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert "sqlops_served_version 1.0" in metrics
    assert "sqlops_registry_champion_version 2.0" in metrics
    assert "sqlops_registry_in_sync 0.0" in metrics
    fake.start()
    loop.run_once()
    assert "sqlops_served_version 2.0" in httpx.get(f"{gw.url}/metrics").text
    assert httpx.get(f"{gw.url}/health").json()["registry"]["in_sync"] is True


def test_the_loop_corrects_a_gateway_that_missed_the_webhook(gateway):
    p, _, loop, registry, *_ = gateway
    loop.run_once()
    registry.set_champion(2)  # moved while nobody listened
    loop.start()  # every serving.reconcile_s (0.2 s here)
    wait_for(lambda: served(p) == 2)
    assert loop.last.in_sync


def test_shadow_traffic_logs_both_answers_off_the_response_path(gateway):
    p, gw, loop, registry, challenger, fake = gateway
    loop.run_once()  # champion v1 served
    challenger["v"] = 2
    loop.run_once()
    assert loop.shadow.model == "text2sql-v2" and "text2sql-v2" in fake.adapters
    fake.delay_s = 0.3  # the shadow calls are slow; the user's answer must not wait for them
    question = "How many players are there?"
    start = time.perf_counter()
    r = httpx.post(f"{gw.url}/v1/sql", json={"question": question, "db_id": "game"})
    assert r.status_code == 200 and r.json()["model_version"] == "text2sql-v1"
    assert time.perf_counter() - start < 0.6 + 0.3  # one completion, not three
    ilog = InferenceLog(p.serving.inference_log_url)
    wait_for(lambda: len(ilog.window(shadow=True)) == 2)
    shadow = ilog.window(shadow=True)
    assert sorted(shadow["model_version"]) == ["text2sql-v1", "text2sql-v2"]
    assert shadow["executed"].all()  # both executed: the outcome the gate compares
    users = ilog.window()
    assert list(users["model_version"]) == ["text2sql-v1"]  # drift and figures see only this


def test_logs_made_before_shadow_rows_get_the_column(tmp_path):
    db = tmp_path / "old.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.exec_driver_sql(OLD_REQUESTS_DDL)
        conn.exec_driver_sql(
            "INSERT INTO requests VALUES ('a', 1.0, 'game', 'q', 'en', 'text2sql-v1', "
            "'SELECT 1', 'ok', 0, NULL, NULL, 5.0, 0, NULL, NULL, NULL)"
        )
    ilog = InferenceLog(f"sqlite:///{db}")
    ilog.record(db_id="game", question="q2", status="ok", latency_ms=1.0, shadow=True)
    assert list(ilog.window()["request_id"]) == ["a"]
    assert len(ilog.window(shadow=True)) == 1


def test_summary_lists_live_traffic_by_version(tmp_path):
    from pipelines.config import load_params
    from pipelines.release.registry import live_traffic

    p = load_params().replace(serving={"inference_log_url": f"sqlite:///{tmp_path}/none.db"})
    assert live_traffic(p) == {} and not (tmp_path / "none.db").exists()  # no log is made
    p = p.replace(serving={"inference_log_url": f"sqlite:///{tmp_path}/log.db"})
    ilog = InferenceLog(p.serving.inference_log_url)
    rows = [("text2sql-v1", "ok"), ("text2sql-v2", "exec_error"), ("text2sql-v2", "ok")]
    ilog.record_many(
        [
            {
                "db_id": "game",
                "question": "q",
                "model_version": m,
                "status": s,
                "latency_ms": 1.0,
                "shadow": True,
            }
            for m, s in rows
        ]  # fmt: skip
    )
    ilog.record(db_id="game", question="q", model_version="text2sql-v2", status="ok",
                latency_ms=1.0)  # fmt: skip
    traffic = live_traffic(p)
    assert traffic["text2sql-v1"] == LiveErrors(1, 0)
    assert traffic["text2sql-v2"] == LiveErrors(2, 1)  # the user's row is not counted
