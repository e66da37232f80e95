"""Feedback records that used to poison or halt retraining, through the real gateway (vLLM
stand-in on loopback) and the real export: each is refused at the door or quarantined, and
what the export writes always passes `validate`."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.config import load_params
from pipelines.data import validate
from pipelines.data.records import read_jsonl
from pipelines.monitoring.feedback import export
from pipelines.serving.backend import VLLMCompletions
from pipelines.serving.gateway import create_app, key_id
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import Route, RouteWatcher, write_route
from pipelines.serving.service import Text2SQL
from tests.fake_vllm import FakeVLLM
from tests.inference_logs import OLD_REQUESTS_DDL

P = load_params()
RULES = P.validate_
ANSWERS = {
    "How many customers are there?": "SELECT COUNT(*) FROM customers",
    "What is the largest order amount?": "SELECT MAX(amount) FROM orders",
    "Show infinity and a blob": "SELECT 1e999, x'00ff', -1e999",
}
KEY = "s3cret"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tok():
    """The fixture-trained tokenizer: the prompt's text is all these tests need (fast)."""
    from tests.conftest import _fixture_tokenizer

    return _fixture_tokenizer()


@pytest.fixture
def gw(tmp_path: Path, prepared_dir: Path, tok):
    """(client, inference log, databases) with the API key set and 3 feedback posts a minute."""
    cfg = P.serving.model_copy(update={"feedback_per_minute": 3, "max_feedback_sql_chars": 2000})
    routing = tmp_path / "routing.json"
    write_route(routing, Route("text2sql-v1", 1))
    with FakeVLLM(dict(ANSWERS)) as vllm:
        vllm.adapters["text2sql-v1"] = "/adapters/v1"
        backend = VLLMCompletions(vllm.base_url, 2.0, 32)
        service = Text2SQL(cfg, prepared_dir / "databases", tok, backend)
        ilog = InferenceLog(f"sqlite:///{tmp_path}/inference.db", lock_timeout_s=0.2)
        app = create_app(service, ilog, RouteWatcher(routing), api_key=KEY)
        with TestClient(app) as client:
            yield client, ilog, prepared_dir / "databases"


def ask(client, question: str, db_id: str = "shop") -> dict:
    r = client.post(
        "/v1/sql", json={"question": question, "db_id": db_id, "execute": True}, headers=HEADERS
    )
    return {"status_code": r.status_code, **r.json()}


def feedback(client, **body) -> int:
    return client.post("/v1/feedback", json=body, headers=HEADERS).status_code


def test_feedback_on_a_refused_request_is_refused(gw):
    client, ilog, _ = gw
    long = ask(client, "x" * 600)
    traversal = ask(client, "How many customers are there?", db_id="../../../cache/judge")
    assert (long["status_code"], traversal["status_code"]) == (400, 404)
    for refused in (long, traversal):
        assert ilog.get(refused["request_id"])["status"] == "bad_request"
        fix = "SELECT COUNT(*) FROM customers"
        assert feedback(client, request_id=refused["request_id"], correct_sql=fix) == 409
        assert ilog.get(refused["request_id"])["feedback_sql"] is None


def test_feedback_records_the_key_id_and_is_rate_limited(gw):
    client, ilog, _ = gw
    rid = ask(client, "How many customers are there?")["request_id"]
    assert feedback(client, request_id=rid, verdict="correct") == 200
    row = ilog.get(rid)
    assert row["feedback_by"] == key_id(KEY) and KEY not in row["feedback_by"]
    assert feedback(client, request_id=rid, verdict="correct") == 200
    assert feedback(client, request_id=rid, verdict="correct") == 200
    assert feedback(client, request_id=rid, verdict="correct") == 429  # 3 a minute


def test_oversized_correction_is_refused_without_blocking(gw):
    client, ilog, _ = gw
    rid = ask(client, "How many customers are there?")["request_id"]
    huge = "SELECT " + " + ".join(["amount"] * 100_000) + " FROM orders"  # ~900 kB
    start = time.monotonic()
    assert feedback(client, request_id=rid, correct_sql=huge) == 400
    assert time.monotonic() - start < 1.0
    assert ilog.get(rid)["feedback_sql"] is None


def test_lone_surrogates_get_a_4xx_and_a_log_row(gw):
    client, ilog, _ = gw
    # JSON can carry a lone surrogate (\\ud800); Python decodes it into the str as it is
    raw = '{"question": "How many \\ud800 customers?", "db_id": "shop", "execute": true}'
    r = client.post("/v1/sql", content=raw, headers={**HEADERS, "Content-Type": "application/json"})
    body = {"status_code": r.status_code, **r.json()}
    assert body["status_code"] == 400 and "surrogate" in body["error"]
    row = ilog.get(body["request_id"])
    assert row["status"] == "bad_request" and "\\ud800" in row["question"]
    rid = ask(client, "How many customers are there?")["request_id"]
    for raw in (
        f'{{"request_id": "{rid}", "correct_sql": "SELECT \'\\udfff\'"}}',
        '{"request_id": "\\ud800", "verdict": "wrong"}',
    ):
        headers = {**HEADERS, "Content-Type": "application/json"}
        assert client.post("/v1/feedback", content=raw, headers=headers).status_code == 400


def test_a_locked_log_gives_503_on_feedback_and_keeps_answers(gw, tmp_path):
    client, ilog, _ = gw
    rid = ask(client, "How many customers are there?")["request_id"]
    holder = sqlite3.connect(tmp_path / "inference.db", timeout=0.1)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        start = time.monotonic()
        assert feedback(client, request_id=rid, verdict="wrong") == 503
        assert time.monotonic() - start < 3.0
        answered = ask(client, "What is the largest order amount?")
        assert answered["status_code"] == 200 and answered["request_id"]
        assert ilog.backlog == 1
    finally:
        holder.rollback()
        holder.close()
    later = ask(client, "How many customers are there?")
    assert ilog.backlog == 0
    assert ilog.get(answered["request_id"])["status"] == "ok"  # written with the next row
    assert ilog.get(later["request_id"]) is not None
    assert feedback(client, request_id=rid, verdict="wrong") == 200


def test_results_json_cannot_carry_are_encoded(gw):
    client, ilog, _ = gw
    body = ask(client, "Show infinity and a blob")
    assert body["status_code"] == 200, body
    assert body["rows"] == [["inf", "00ff", "-inf"]]
    assert ilog.get(body["request_id"])["status"] == "ok"


def _log_with_feedback(tmp_path: Path, rows: list[tuple[dict, str]]) -> InferenceLog:
    """Requests as an older gateway logged them, each with a correction."""
    ilog = InferenceLog(f"sqlite:///{tmp_path}/old.db")
    base = {"model_version": "text2sql-v1", "status": "ok", "latency_ms": 1.0, "sql": "SELECT 1"}
    ids = []
    for i, (request, _) in enumerate(rows):
        ids.append(ilog.record(**{**base, "ts": float(i), **request}))
    for rid, (_, correction) in zip(ids, rows, strict=True):
        ilog.add_feedback(rid, "wrong", correction)
    return ilog


def test_export_quarantines_what_validate_would_refuse(tmp_path, prepared_dir):
    good = (
        {"question": "How many orders are there?", "db_id": "shop"},
        "SELECT COUNT(*) FROM orders",
    )
    rows = [
        good,
        ({"question": "x" * 600, "db_id": "shop"}, "SELECT COUNT(*) FROM orders"),
        ({"question": "What is the top score?", "db_id": "game"}, "SELECT 42"),
        ({"question": "What is the top score now?", "db_id": "game"}, "SELECT 42 FROM players"),
        ({"question": "Who is in Seoul?", "db_id": "../../../cache/judge"}, "SELECT 1"),
        ({"question": "What did you say?", "db_id": "shop", "status": "bad_request"}, "SELECT 1"),
        ({"question": "How many matches?", "db_id": "game"}, "SELECT COUNT(*) FROM nowhere"),
        ({"question": "Endless question?", "db_id": "game"}, "SELECT printf('%.*c', 1e9, 'x')"),
    ]
    ilog = _log_with_feedback(tmp_path, rows)
    out, quarantine = tmp_path / "feedback", tmp_path / "quarantine.json"
    rules = RULES.model_copy(update={"sql_timeout_s": 0.5})
    res = export(
        ilog.window(), prepared_dir / "databases", out, rules, None, quarantine, sample_values=0
    )
    assert res.n_labelled == len(rows) and res.n_verified == 1
    assert res.rejected == {
        "question_length": 1,
        "sql_reads_table": 4,  # SELECT 42 twice, a table that does not exist, printf
        "db_id_safe": 1,
        "request_refused": 1,
        "sql_refs_exist": 1,
        "sql_executes": 2,  # the missing table, and printf stopped at the time limit
    }
    report = json.loads(quarantine.read_text())
    assert len(report["quarantined"]) == len(rows) - 1
    endless = next(q for q in report["quarantined"] if q["question"] == "Endless question?")
    assert endless["why"]["sql_executes"] == "timeout"
    # Nothing outside the feedback folder, and what is there passes the stage's own contract.
    written = {p.name for p in tmp_path.iterdir() if not p.name.startswith("old.db")}
    assert written == {"feedback", "prepared", "quarantine.json"}
    assert not (tmp_path.parent / "cache").exists()  # where ../../../cache/judge points
    records = read_jsonl(out / "feedback.jsonl")
    assert [r["sql"] for r in records] == [good[1]]
    df = validate.check_records(records, out / "databases", 1.0)
    assert validate.failing_rules(df, RULES) == [[]]


def test_a_log_from_before_feedback_by_gets_the_column(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the requests table as earlier versions created it
        conn.execute(OLD_REQUESTS_DDL)
    ilog = InferenceLog(f"sqlite:///{path}")
    rid = ilog.record(db_id="shop", question="How many?", status="ok", latency_ms=1.0)
    assert ilog.add_feedback(rid, "correct", by=key_id(KEY))
    assert ilog.get(rid)["feedback_by"] == key_id(KEY)
