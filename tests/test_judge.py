"""The LLM judge against a real local OpenAI-compatible server: verdicts, cache, faults, load."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from pipelines.config import load_params
from pipelines.eval.judge import (
    JudgeItem,
    Malformed,
    TokenBucket,
    judge,
    judge_prompt,
    parse_verdict,
)
from tests.fake_openai import FakeOpenAI, Faults, expected_verdict

DDL = "CREATE TABLE players (player_id INTEGER PRIMARY KEY, username TEXT, level INTEGER);"
LIMITS = dict(
    rpm_limit=None,
    tpm_limit=None,
    price_per_1k_in=0.0,
    price_per_1k_out=0.0,
    only_execution_failures=False,
)
# params.yaml's judge block against the fake server: no limits or prices, short timeouts.
CFG = load_params().evaluate.judge.model_copy(
    update=dict(model="fake-judge", max_concurrency=4, max_retries=5, timeout_s=2.0, **LIMITS)
)
PRICED = CFG.model_copy(update={"price_per_1k_in": 10.0, "price_per_1k_out": 30.0})
FAST = {"backoff_base_s": 0.001, "backoff_max_s": 0.01}
SECRET = "sk-test-0123456789abcdef"


def make_items(n: int, tag: str = "") -> list[JudgeItem]:
    """Unique questions; every other generated SQL is the gold one in another spelling."""
    items = []
    for i in range(n):
        gold = f"SELECT username FROM players WHERE level > {i}"
        gen = f"select  username\nFROM players where LEVEL > {i};" if i % 2 else f"{gold} LIMIT 1"
        items.append(JudgeItem(f"ex-{i}", DDL, f"Players above level {i}?{tag}", gold, gen))
    return items


def expected(items: list[JudgeItem]) -> dict[str, bool]:
    return {i.id: expected_verdict(i.gt_sql, i.gen_sql) for i in items}


@pytest.fixture
def fake(monkeypatch):
    """A fault-free fake endpoint that the judge finds through the environment."""
    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        yield server


def test_prompt_carries_instruction_and_all_four_parts():
    p = judge_prompt(DDL, "Who is above level 3?", "SELECT 1", "SELECT 2")
    assert "resolve_yn" in p and '"yes"' in p and '"no"' in p
    positions = [p.index(s) for s in (DDL, "Who is above level 3?", "SELECT 1", "SELECT 2")]
    assert positions == sorted(positions)


@pytest.mark.parametrize(
    "content, verdict", [('{"resolve_yn": "yes"}', True), ('{"resolve_yn": " No"}', False)]
)
def test_parse_verdict(content, verdict):
    assert parse_verdict(content) is verdict


@pytest.mark.parametrize("content", ["maybe", '{"answer": 1}', '{"resolve_yn": 1}', "[]", None])
def test_parse_verdict_rejects_malformed(content):
    with pytest.raises(Malformed):
        parse_verdict(content)


def test_skipped_without_endpoint(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with caplog.at_level(logging.WARNING):
        report = judge(make_items(3), CFG, tmp_path / "cache.sqlite")
    assert report.status == "skipped" and report.model is None and report.calls == 0
    assert report.notice and "\n" not in report.notice
    assert report.verdicts == {"ex-0": None, "ex-1": None, "ex-2": None}
    assert report.notice in caplog.text
    assert not (tmp_path / "cache.sqlite").exists()


def test_verdicts_cost_and_cache(fake, tmp_path):
    items = make_items(20)
    cache = tmp_path / "judge" / "cache.sqlite"
    report = judge(items, PRICED, cache, **FAST)
    assert report.status == "ok" and report.model == "fake-judge" and not report.errors
    assert report.verdicts == expected(items) and sum(report.verdicts.values()) == 10
    assert report.calls == 20 and report.prompt_tokens > 0 and report.completion_tokens > 0
    want = (report.prompt_tokens * 10.0 + report.completion_tokens * 30.0) / 1000
    assert report.cost_usd == pytest.approx(want)
    assert {
        (p["model"], p["temperature"], p["response_format"]["type"]) for p in fake.request_params
    } == {("fake-judge", 0, "json_object")}

    again = judge(items, PRICED, cache, **FAST)
    assert again.calls == 0 and again.cost_usd == 0.0 and again.cached == 20
    assert again.verdicts == report.verdicts and again.status == "ok"
    assert sum(fake.served.values()) == 20


def test_client_passed_in(fake, tmp_path):
    import openai

    items = make_items(4)
    client = openai.AsyncOpenAI(api_key="EMPTY", base_url=fake.base_url)
    report = judge(items, CFG, tmp_path / "c.sqlite", client=client, **FAST)
    assert report.verdicts == expected(items) and report.calls == 4


def test_endpoint_nobody_answers_is_counted_unanswered(tmp_path, monkeypatch):
    """Refused connections are calls without a reply: counted, retried, then reported."""
    with socket.socket() as held:  # bound, never listening: connections to it are refused
        held.bind(("127.0.0.1", 0))
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{held.getsockname()[1]}/v1")
        cfg = CFG.model_copy(update={"max_retries": 3})
        report = judge(make_items(2), cfg, tmp_path / "c.sqlite", **FAST)
    assert report.status == "partial" and set(report.verdicts.values()) == {None}
    assert report.calls == report.unanswered == 2 * 3
    assert all("APIConnectionError" in e for e in report.errors.values())


def assert_calls_are_counted(report, server):
    """Every request the server saw was counted, and every reply counted is one it sent.

    A request the client gave up on before the server read it (a loaded machine, a keep-alive
    connection closed under it) is a counted call the server never saw: it is `unanswered`,
    like the ones the server answered after the client's timeout.
    """
    served = sum(server.served.values())
    answered = report.calls - report.unanswered
    assert served <= report.calls
    assert answered <= served - server.served["slow"]
    assert report.unanswered >= server.served["slow"]  # slow replies come after the timeout


@pytest.mark.parametrize(
    "faults",
    [
        Faults(rate_429=0.5),
        Faults(rate_500=0.5),
        Faults(rate_malformed=0.5),
        Faults(rate_slow=0.3, slow_s=1.0),
    ],
    ids=["429", "500", "malformed", "timeout"],
)
def test_each_fault_recovers(faults, tmp_path, monkeypatch):
    items = make_items(12)
    cfg = CFG.model_copy(update={"timeout_s": 0.4, "max_retries": 10})
    with FakeOpenAI(faults) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        report = judge(items, cfg, tmp_path / "c.sqlite", **FAST)
    assert report.status == "ok" and report.verdicts == expected(items)
    faulted = sum(n for k, n in server.served.items() if k != "ok")
    assert faulted > 0
    assert_calls_are_counted(report, server)
    assert len(server.ok_by_prompt) == 12 and set(server.ok_by_prompt.values()) == {1}


def test_exhausted_retries_then_rerun_judges_only_the_rest(fake, tmp_path):
    items = make_items(10) + make_items(3, tag=" [flaky]")
    for i, it in enumerate(items[10:]):
        it.id = f"flaky-{i}"
    cfg = CFG.model_copy(update={"max_retries": 3})
    fake.faults.fail_marker = "[flaky]"
    report = judge(items, cfg, tmp_path / "c.sqlite", **FAST)
    assert report.status == "partial" and report.notice
    assert set(report.errors) == {"flaky-0", "flaky-1", "flaky-2"}
    assert "500" in report.errors["flaky-0"]
    assert all(report.verdicts[k] is None for k in report.errors)
    assert report.calls == 10 + 3 * 3

    fake.faults.fail_marker = None
    before = sum(fake.served.values())
    again = judge(items, cfg, tmp_path / "c.sqlite", **FAST)
    assert again.status == "ok" and again.calls == 3 and again.cached == 10
    assert again.verdicts == expected(items)
    assert sum(fake.served.values()) - before == 3


def test_rate_limit_pauses_for_retry_after(tmp_path, monkeypatch):
    with FakeOpenAI(Faults(rate_429=0.5, retry_after_s=0.3)) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        t0 = time.monotonic()
        report = judge(make_items(4), CFG, tmp_path / "c.sqlite", **FAST)
        elapsed = time.monotonic() - t0
    assert report.status == "ok" and server.served["429"] > 0
    assert elapsed >= 0.3  # the backoff alone would be milliseconds


def test_wrong_key_aborts_and_is_never_logged(tmp_path, monkeypatch, caplog):
    with FakeOpenAI(Faults(api_key="the-right-key")) as server, caplog.at_level(logging.DEBUG):
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        report = judge(make_items(30), CFG, tmp_path / "c.sqlite", **FAST)
    assert report.status == "partial" and len(report.errors) == 30
    assert report.calls <= CFG.max_concurrency  # the first 401 stops the rest
    assert "401" in report.errors["ex-0"]
    assert SECRET not in caplog.text and not any(SECRET in e for e in report.errors.values())


def test_token_bucket_throttles_after_the_burst():
    async def timed() -> float:
        bucket = TokenBucket(per_minute=1200)  # 20 a second once the minute's burst is spent
        await bucket.take(1200)
        t0 = time.monotonic()
        await bucket.take(10)
        return time.monotonic() - t0

    assert 0.4 < asyncio.run(timed()) < 1.0


def test_rpm_limit_paces_requests(fake, tmp_path):
    t0 = time.monotonic()
    report = judge(
        make_items(8),
        CFG.model_copy(update={"rpm_limit": 240, "tpm_limit": 10**6}),
        tmp_path / "c.sqlite",
    )
    assert report.status == "ok" and report.calls == 8
    assert time.monotonic() - t0 < 5  # within the burst allowance: no pause


@pytest.mark.slow
def test_thousand_items_with_twenty_percent_faults(tmp_path, monkeypatch):
    """The issue's load test: every example judged once, correctly, and nothing re-paid."""
    faults = Faults(rate_429=0.06, rate_500=0.06, rate_malformed=0.06, rate_slow=0.02, slow_s=2.0)
    items = make_items(1000)
    cfg = CFG.model_copy(update={"max_concurrency": 16, "max_retries": 8, "timeout_s": 1.0})
    with FakeOpenAI(faults) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        t0 = time.monotonic()
        report = judge(items, cfg, tmp_path / "c.sqlite", **FAST)
        elapsed = time.monotonic() - t0
        again = judge(items, cfg, tmp_path / "c.sqlite", **FAST)
    print(f"1000 judged in {elapsed:.1f}s, {report.calls} calls, served {dict(server.served)}")
    assert report.status == "ok" and not report.errors
    assert report.verdicts == expected(items)
    assert len(server.ok_by_prompt) == 1000 and set(server.ok_by_prompt.values()) == {1}
    assert_calls_are_counted(report, server)
    faulted = report.calls - server.served["ok"]
    assert 0.15 < faulted / report.calls < 0.25
    assert again.calls == 0 and again.verdicts == report.verdicts
