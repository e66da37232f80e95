"""The inference log: record, feedback, time windows."""

from pipelines.data.records import detect_lang
from pipelines.serving.inference_log import InferenceLog


def test_record_feedback_window(tmp_path):
    log = InferenceLog(f"sqlite:///{tmp_path}/log.db")
    first = log.record(
        ts=100.0, db_id="shop", question="How many orders?", status="ok", latency_ms=12.0
    )
    log.record_many(
        [
            {
                "ts": 200.0,
                "db_id": "shop",
                "question": "주문은 몇 건?",
                "status": "ok",
                "latency_ms": 9.0,
            },
            {
                "ts": 300.0,
                "db_id": "game",
                "question": "Top players",
                "status": "guard_rejected",
                "latency_ms": 5.0,
                "feedback_verdict": "wrong",  # a column the first row lacks
            },
        ]
    )
    assert log.add_feedback(first, verdict="wrong", correct_sql="SELECT COUNT(*) FROM orders")
    assert not log.add_feedback("nope", verdict="correct")
    row = log.get(first)
    assert row["lang"] == "en" and row["feedback_verdict"] == "wrong"
    w = log.window(since=150.0, until=300.0)
    assert list(w["lang"]) == ["ko"]
    assert len(log.window()) == 3
    assert log.window(since=300.0)["feedback_verdict"].tolist() == ["wrong"]


def test_detect_lang():
    assert detect_lang("플레이어 수는?") == "ko"
    assert detect_lang("how many players") == "en"
