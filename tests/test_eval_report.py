"""Judge-vs-execution figures, the disagreements table, the DVC plots breakdown, and the
"judge only what execution marks wrong" mode against the local OpenAI-compatible server."""

from __future__ import annotations

import csv

import pytest

from pipelines.config import load_params
from pipelines.eval import metrics
from pipelines.eval.evaluate import apply_judge
from pipelines.eval.report import ReportPaths, breakdown_rows, write_report
from tests.fake_openai import FakeOpenAI

GOLD = "SELECT COUNT(*) FROM players"


def _row(i: int, execution_match: bool, pred_sql: str, judge: bool | None = None) -> dict:
    return {
        "model": "tuned",
        "id": f"ex-{i}",
        "domain": "game",
        "lang": "en",
        "difficulty": "easy",
        "question": f"How many players? | #{i}",
        "gold_sql": GOLD,
        "pred_sql": pred_sql,
        "valid": True,
        "execution_match": execution_match,
        "exact_match": pred_sql == GOLD,
        "gold_nonempty": True,
        "error": None,
        "judge": judge,
    }


# The fake judge says yes iff the SQL text equals the gold SQL, so each row below is one case:
# both agree yes, judge no / execution yes, judge yes / execution no, both agree no.
ROWS = [
    _row(0, True, GOLD),
    _row(1, True, "SELECT COUNT(player_id) FROM players"),
    _row(2, False, GOLD),
    _row(3, False, "SELECT 1"),
]


def test_disagreements_and_kappa():
    rows = [{**r, "judge": r["pred_sql"] == GOLD} for r in ROWS]
    found = metrics.disagreements(rows)
    assert [(r["id"], r["disagreement"]) for r in found] == [
        ("ex-1", "judge no, execution yes"),
        ("ex-2", "judge yes, execution no"),
    ]
    assert metrics.judge_figures(rows, failures_only=False) == (0.5, 0.0)
    assert metrics.judge_figures([{**r, "judge": None} for r in rows], False) == (None, None)


def test_failures_only_counts_execution_matches_as_correct():
    # Only the two execution failures were judged; one of them the judge accepts.
    rows = [{**r, "judge": None if r["execution_match"] else r["pred_sql"] == GOLD} for r in ROWS]
    assert metrics.judge_figures(rows, failures_only=True) == (0.75, None)
    s = metrics.summarize(rows, 10, 0, 1.0, judged_failures_only=True)
    assert s["judge_accuracy"] == 0.75 and s["judge_execution_kappa"] is None


def _metrics(rows: list[dict], judge: dict) -> dict:
    return {
        "n_examples": len(rows),
        "judge": judge,
        "tuned": metrics.summarize(rows, 10, 0, 1.0, judge.get("scope") == "execution_failures"),
    }


def test_report_files(tmp_path):
    rows = [{**r, "judge": r["pred_sql"] == GOLD} for r in ROWS]
    m = _metrics(rows, {"status": "ok", "model": "fake-judge", "calls": 4, "cost_usd": 0.0})
    paths = ReportPaths.under(tmp_path)
    write_report(paths, m, rows)
    md = paths.disagreements.read_text()
    assert "**tuned**: 2 disagreements (1 judge yes / execution no" in md
    table = [line for line in md.splitlines() if line.startswith("| tuned")]
    assert len(table) == 2 and "How many players? \\| #1" in table[0]  # `|` escaped
    with paths.breakdown.open() as f:
        bars = list(csv.DictReader(f))
    assert bars == [{k: str(v) for k, v in b.items()} for b in breakdown_rows(m, rows)]
    assert {b["dataset"] for b in bars} == {"eval"}
    # the wrong answers: ex-2 repeats the gold SQL (nothing differs), ex-3 reads no table
    assert bars[0]["failures_other"] == bars[0]["failures_wrong_table"] == "1"
    assert {b["group"] for b in bars} == {
        "overall: all",
        "domain: game",
        "difficulty: easy",
        "lang: en",
    }
    assert bars[0]["execution_accuracy"] == "0.5" and bars[0]["n"] == "4"


@pytest.mark.parametrize("failures_only", [False, True])
def test_apply_judge_only_asks_about_execution_failures(tmp_path, monkeypatch, failures_only):
    evaluate_cfg = load_params().evaluate
    cfg = evaluate_cfg.model_copy(
        update={
            "judge": evaluate_cfg.judge.model_copy(
                update=dict(
                    model="fake-judge",
                    max_concurrency=2,
                    max_retries=2,
                    timeout_s=5.0,
                    rpm_limit=None,
                    tpm_limit=None,
                    price_per_1k_in=0.0,
                    price_per_1k_out=0.0,
                    only_execution_failures=failures_only,
                )
            )
        }
    )
    rows = [dict(r) for r in ROWS]
    records = [{"id": r["id"], "ddl": "CREATE TABLE players (player_id INTEGER);"} for r in rows]
    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
        report = apply_judge(rows, records, cfg, tmp_path / "judge.sqlite")
    assert report.status == "ok" and report.calls == (2 if failures_only else 4)
    assert server.served["ok"] == report.calls
    verdicts = [r["judge"] for r in rows]
    assert verdicts == ([None, None, True, False] if failures_only else [True, False, True, False])
    found = [r["id"] for r in metrics.disagreements(rows)]
    assert found == (["ex-2"] if failures_only else ["ex-1", "ex-2"])
