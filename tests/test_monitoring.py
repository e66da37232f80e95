"""Monitoring: drift of logged traffic against the training questions, the retraining policy,
feedback corrections verified into a data source. Data comes from the synth generator (three
trained domains, `game` unseen), split into reference questions and new traffic."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from pipelines.config import load_params
from pipelines.data import synth
from pipelines.data.records import read_jsonl, write_jsonl
from pipelines.monitoring import drift
from pipelines.monitoring.feedback import export
from pipelines.monitoring.policy import should_retrain
from pipelines.serving.inference_log import InferenceLog

TRAINED = ("shop", "school", "hr")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """Reference file (half of the trained domains' questions), the other half as in-domain
    traffic, the unseen domain's questions, and the databases."""
    out = tmp_path_factory.mktemp("synthetic")
    cfg = load_params().synth.model_copy(
        update={"domains": [*TRAINED, "game"], "examples_per_domain": 160}
    )
    synth.run(cfg, seed=7, out_dir=out)
    examples = read_jsonl(out / "examples.jsonl")
    random.Random(0).shuffle(examples)
    trained = [e for e in examples if e["domain"] in TRAINED]
    write_jsonl(out / "train.jsonl", trained[::2])
    return {
        "train": out / "train.jsonl",
        "in_domain": trained[1::2],
        "unseen": [e for e in examples if e["domain"] == "game"],
        "databases": out / "databases",
    }


@pytest.fixture(scope="module")
def reference(synthetic) -> drift.Reference:
    return drift.load_reference(synthetic["train"], 42)


@pytest.fixture
def cfg():
    return load_params().monitoring


def traffic(examples: list[dict], n: int, seed: int = 0, start: float = 1000.0) -> list[dict]:
    """`n` logged requests asking the examples' questions; the model answered with their SQL."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        e = rng.choice(examples)
        rows.append(
            {
                "ts": start + i,
                "db_id": e["db_id"],
                "question": e["question"],
                "lang": e["lang"],
                "model_version": "text2sql-v1",
                "sql": e["sql"],
                "status": "ok",
                "executed": True,
                "n_rows": rng.choice([1, 3, 10]),
                "latency_ms": rng.uniform(200, 900),
                "feedback_verdict": None,  # record_many inserts the first row's keys only
            }
        )
    return rows


def window_of(rows: list[dict], tmp_path: Path) -> InferenceLog:
    log = InferenceLog(f"sqlite:///{tmp_path}/inference.db")
    log.record_many(rows)
    return log


def test_in_domain_traffic_does_not_drift(synthetic, reference, cfg, tmp_path):
    window = window_of(traffic(synthetic["in_domain"], 400), tmp_path).window()
    result = drift.check(cfg, reference, window, tmp_path / "reports", seed=0)
    assert not result.drifted, result.drifted_signals
    assert result.n_current == 400 and result.report_path.is_file()
    assert result.report_path.with_suffix(".json").is_file()


def test_unseen_domain_drifts(synthetic, reference, cfg, tmp_path):
    window = window_of(traffic(synthetic["unseen"], 400), tmp_path).window()
    result = drift.check(cfg, reference, window, None, seed=0)
    assert result.drifted
    assert {"domain", "question_text", "oov_rate"} <= set(result.drifted_signals)
    assert result.signals["domain"]["score"] > cfg.cat_threshold


def test_other_language_drifts(synthetic, reference, cfg, tmp_path):
    korean = [e for e in synthetic["in_domain"] if e["lang"] == "ko"]
    window = window_of(traffic(korean, 400), tmp_path).window()
    result = drift.check(cfg, reference, window, None, seed=0)
    assert "lang" in result.drifted_signals
    assert "domain" not in result.drifted_signals


def test_health_signals_flag_failing_traffic(synthetic, reference, cfg, tmp_path):
    rows = traffic(synthetic["in_domain"], 300)
    for r in rows[:60]:
        r.update(status="guard_rejected", executed=False, n_rows=None, sql="DROP TABLE x")
    for r in rows[60:90]:
        r.update(feedback_verdict="wrong")
    window = window_of(rows, tmp_path).window()
    result = drift.check(cfg, reference, window, None, seed=0)
    assert result.signals["guard_rejection_rate"] == pytest.approx(
        {
            "score": 0.2,
            "threshold": cfg.max_guard_rejection_rate,
            "drifted": True,
            "method": "mean <= limit",
        }
    )
    assert result.signals["negative_feedback_rate"]["score"] == 1.0
    assert not result.signals["exec_error_rate"]["drifted"]
    assert result.signals["question_text"]["score"] is not None


def test_signals_without_values_are_reported_unmeasured(synthetic, reference, cfg, tmp_path):
    window = window_of(traffic(synthetic["in_domain"], 50), tmp_path).window()
    result = drift.check(cfg, reference, window, None, seed=0)
    assert result.signals["negative_feedback_rate"] == {
        "score": None,
        "threshold": cfg.max_negative_feedback_rate,
        "drifted": False,
        "method": "mean <= limit",
    }


def test_empty_window(reference, cfg):
    import pandas as pd

    result = drift.check(cfg, reference, pd.DataFrame(), None, seed=0)
    assert not result.drifted and result.n_current == 0 and result.signals == {}


@pytest.mark.slow
def test_drift_check_over_100k_requests_within_60s(synthetic, cfg, tmp_path):
    rows = traffic(synthetic["in_domain"] + synthetic["unseen"], 100_000, start=0.0)
    log = window_of(rows, tmp_path)
    start = time.monotonic()
    result = drift.run(
        cfg.model_copy(update={"window_hours": 1e6}),
        synthetic["train"],
        f"sqlite:///{tmp_path}/inference.db",
        tmp_path / "reports",
        seed=0,
        now=1e6,
    )
    seconds = time.monotonic() - start
    print(f"drift check over {result.n_current} requests: {seconds:.1f} s")
    assert result.n_current == 100_000 and log is not None
    assert seconds <= 60


# --- retraining policy -------------------------------------------------------------------------

HOUR = 3600.0
NOW = 1_000_000.0


def drifted(n: int = 500, *signals: str) -> drift.DriftResult:
    names = signals or ("domain",)
    return drift.DriftResult(
        drifted=True,
        n_current=n,
        signals={
            s: {"score": 0.8, "threshold": 0.1, "drifted": True, "method": "m"} for s in names
        },
    )


def test_policy_retrains_on_drift_with_enough_samples(cfg):
    retrain, reasons = should_retrain(drifted(), NOW, [], cfg)
    assert retrain and reasons == ["domain drifted: 0.8 > 0.1"]


def test_policy_needs_minimum_sample_size(cfg):
    retrain, reasons = should_retrain(drifted(cfg.min_samples - 1), NOW, [], cfg)
    assert not retrain and "minimum" in reasons[0]


def test_policy_ignores_report_only_signals(cfg):
    assert "latency_p95_ms" not in cfg.retrain_on
    retrain, reasons = should_retrain(drifted(500, "latency_p95_ms"), NOW, [], cfg)
    assert not retrain and "latency_p95_ms" in reasons[0]
    assert not should_retrain(drift.DriftResult(drifted=False, n_current=500), NOW, [], cfg)[0]


def test_policy_cooldown(cfg):
    c = cfg.model_copy(update={"cooldown_hours": 6.0, "max_retrains_per_day": 10})
    assert not should_retrain(drifted(), NOW, [NOW - 5.9 * HOUR], c)[0]
    retrain, reasons = should_retrain(drifted(), NOW, [NOW - 5.9 * HOUR], c)
    assert "cooldown" in reasons[-1]
    assert should_retrain(drifted(), NOW, [NOW - 6.1 * HOUR], c)[0]
    # the most recent retrain counts, whatever order the history comes in
    assert not should_retrain(drifted(), NOW, [NOW - 1 * HOUR, NOW - 30 * HOUR], c)[0]


def test_policy_daily_limit(cfg):
    c = cfg.model_copy(update={"cooldown_hours": 1.0, "max_retrains_per_day": 2})
    two_today = [NOW - 20 * HOUR, NOW - 3 * HOUR]
    retrain, reasons = should_retrain(drifted(), NOW, two_today, c)
    assert not retrain and "daily limit: 2" in reasons[-1]
    # the older one leaves the 24-hour window: one today, room for another
    assert should_retrain(drifted(), NOW + 5 * HOUR, two_today, c)[0]
    assert should_retrain(drifted(), NOW, [NOW - 3 * HOUR], c)[0]
    assert not should_retrain(drifted(), NOW, [], c.model_copy(update={"max_retrains_per_day": 0}))[
        0
    ]


# --- feedback corrections -> data source -------------------------------------------------------


def test_feedback_corrections_are_verified_into_a_data_source(synthetic, cfg, tmp_path):
    from pipelines.config import SourceConfig
    from pipelines.data.sources import load

    good = synthetic["unseen"][0]
    confirmed = synthetic["unseen"][1]
    rows = traffic([good], 1) + traffic([confirmed], 1)
    rows[0]["sql"] = "SELECT 1"  # the model was wrong; a user corrects it
    rows += [
        {**rows[0], "question": "drop it", "ts": 5.0},
        {**rows[0], "question": "made-up column", "ts": 6.0},
        {**rows[0], "question": "no such database", "db_id": "nope", "ts": 7.0},
    ]
    log = window_of(rows, tmp_path)
    window = log.window()
    ids = dict(zip(window["question"], window["request_id"], strict=True))
    log.add_feedback(ids[good["question"]], "wrong", good["sql"] + ";")
    log.add_feedback(ids[confirmed["question"]], "correct")
    log.add_feedback(ids["drop it"], "wrong", "DROP TABLE players")
    log.add_feedback(ids["made-up column"], "wrong", 'SELECT "no_such_column" FROM players')
    log.add_feedback(ids["no such database"], "wrong", "SELECT 1")

    out = tmp_path / "feedback"
    quarantine = tmp_path / "quarantine.json"
    rules = load_params().validate_
    res = export(
        log.window(), synthetic["databases"], out, rules, None, quarantine, sample_values=0
    )
    assert res.n_labelled == 5 and res.n_verified == 2
    # the validation contract's own rule names; a database that is missing also has no DDL
    assert res.rejected == {
        "sql_read_only": 1,
        "sql_refs_exist": 1,
        "db_exists": 1,
        "ddl_present": 1,
    }
    report = json.loads(quarantine.read_text())
    assert {q["question"] for q in report["quarantined"]} == {
        "drop it",
        "made-up column",
        "no such database",
    }
    records = read_jsonl(out / "feedback.jsonl")
    assert [r["sql"] for r in records] == [good["sql"], confirmed["sql"]]
    assert all(r["source"] == "feedback" and r["ddl"].startswith("CREATE TABLE") for r in records)
    assert sorted(p.name for p in (out / "databases").iterdir()) == ["game.sqlite"]

    imported = load(SourceConfig(type="feedback", path=out), synthetic["databases"])
    assert [r["question"] for r in imported.records] == [good["question"], confirmed["question"]]
    assert imported.databases == {"game": out / "databases" / "game.sqlite"}
    assert load(SourceConfig(type="feedback", path=tmp_path / "none"), out).records == []


# --- the monitoring flow (Prefect test harness) ------------------------------------------------


@pytest.mark.slow
def test_monitoring_flow_retrains_on_drift_then_cools_down(
    synthetic, tmp_path, mlflow_cfg, monkeypatch
):
    import os
    import shutil

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    import flows.monitoring as monitoring_flow

    prepared = tmp_path / "prepared"
    shutil.copytree(synthetic["databases"], prepared / "databases")
    shutil.copy(synthetic["train"], prepared / "train.jsonl")
    p = load_params()
    p = p.model_copy(
        update={
            "paths": p.paths.model_copy(
                update={
                    "prepared": prepared,
                    "monitoring": tmp_path / "reports",
                    "feedback": tmp_path / "feedback",
                    "teacher": tmp_path / "teacher",
                    "teacher_report": tmp_path / "teacher.json",
                    "teacher_cache": tmp_path / "teacher.sqlite",
                    "judge_cache": tmp_path / "judge.sqlite",
                }
            ),
            "serving": p.serving.model_copy(
                update={"inference_log_url": f"sqlite:///{tmp_path}/inference.db"}
            ),
            "mlflow": mlflow_cfg,
        }
    )
    monkeypatch.setattr(monitoring_flow, "load_params", lambda: p)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    trainings = []

    @flow(name="training")
    def fake_training(run_release: bool = True) -> None:
        trainings.append(run_release)

    monkeypatch.setattr(monitoring_flow, "training", fake_training)
    now = 1_000_000.0
    window_of(traffic(synthetic["unseen"], 400, start=now - 3600), tmp_path)

    import mlflow
    from tests.fake_openai import FakeOpenAI

    # The teacher (an OpenAI-compatible stand-in) labels the doubtful traffic before the
    # retraining; its answer to every question is `SELECT 1`, which verification refuses.
    with prefect_test_harness(server_startup_timeout=90), FakeOpenAI() as teacher_api:
        monkeypatch.setenv("OPENAI_BASE_URL", teacher_api.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
        first = monitoring_flow.monitoring(now=now)
        assert first["should_retrain"] and first["retrain"] == "subflow"
        assert "domain" in first["drifted_signals"] and trainings == [True]
        assert (tmp_path / "feedback" / "feedback.jsonl").is_file()
        labelled = first["teacher"]
        assert labelled["picked"] > 0 and labelled["accepted"] == 0
        assert labelled["quarantined"] == labelled["picked"] and labelled["cost_usd"] > 0
        assert (tmp_path / "teacher" / "teacher.jsonl").read_text() == ""
        logged = mlflow.get_run(labelled["mlflow_run_id"]).data.metrics
        assert logged["teacher.picked"] == labelled["picked"]
        # an hour later the traffic still drifts, but the cooldown holds retraining back
        second = monitoring_flow.monitoring(now=now + 1800)
        assert not second["should_retrain"] and "cooldown" in second["reasons"][-1]
        assert trainings == [True]
