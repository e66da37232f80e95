"""The demo's simulated users: fresh questions that are not the prepared examples, sent through
a real gateway on loopback (vLLM stand-in behind it), corrections recorded in the inference log
and exported as verified feedback."""

from __future__ import annotations

import contextlib
from pathlib import Path

from transformers import AutoTokenizer

from pipelines.config import load_params
from pipelines.data.domains import DOMAINS
from pipelines.data.records import question_key
from pipelines.data.synth import generate_examples, generate_rows, write_database
from pipelines.monitoring import feedback, simulate
from pipelines.serving.backend import VLLMCompletions
from pipelines.serving.gateway import create_app
from pipelines.serving.inference_log import InferenceLog
from pipelines.serving.routing import Route, RouteWatcher, write_route
from pipelines.serving.service import Text2SQL
from pipelines.sql import execute
from tests.fake_vllm import FakeVLLM
from tests.loopback import LoopbackServer

SEED = 7
SYNTH = load_params().synth.model_copy(update={"langs": ["en", "ko"]})


def game_db(tmp_path: Path) -> tuple[Path, list[dict]]:
    """The synthetic game database and 60 of its examples (the "prepared" ones)."""
    game = DOMAINS["game"]
    rows = generate_rows(game, SEED)
    databases = tmp_path / "databases"
    write_database(game, rows, databases / "game.sqlite")
    known, _ = generate_examples(game, rows, databases / "game.sqlite", 60, SYNTH, SEED)
    return databases, known


def test_fresh_questions_are_new_executable_and_seeded(tmp_path: Path):
    databases, known = game_db(tmp_path)
    args = (["game"], 40, SYNTH, SEED, SEED + 1, databases, known)
    fresh = simulate.fresh_questions(*args)
    assert len(fresh) == 40
    assert simulate.fresh_questions(*args) == fresh
    known_q = {question_key(r["question"]) for r in known}
    assert not known_q & {question_key(r["question"]) for r in fresh}
    assert {r["lang"] for r in fresh} == {"en", "ko"}
    assert all(execute(databases / "game.sqlite", r["sql"], 2.0).ok for r in fresh)


@contextlib.contextmanager
def served_gateway(tmp_path: Path, databases: Path, base_dir: Path, answers: dict, ilog):
    """The gateway on loopback in front of a stand-in vLLM that answers `answers` as
    text2sql-v1, logging to `ilog`."""
    cfg = load_params().serving.model_copy(update={"request_timeout_s": 5.0})
    routing = tmp_path / "routing.json"
    write_route(routing, Route("text2sql-v1", 1))
    with FakeVLLM(answers) as vllm:
        vllm.adapters["text2sql-v1"] = "/adapters/v1"
        service = Text2SQL(
            cfg,
            databases,
            AutoTokenizer.from_pretrained(base_dir),
            VLLMCompletions(vllm.base_url, cfg.request_timeout_s, cfg.max_new_tokens),
        )
        with LoopbackServer(create_app(service, ilog, RouteWatcher(routing))) as gateway:
            yield gateway


def test_traffic_and_corrections_through_the_gateway(tmp_path: Path, tiny_base_dir: Path):
    databases, known = game_db(tmp_path)
    questions = simulate.fresh_questions(["game"], 12, SYNTH, SEED, SEED + 1, databases, known)
    # The served model answers half of them correctly, the rest with a wrong table.
    answers = {
        q["question"]: q["sql"] if i % 2 else "SELECT * FROM no_such_table"
        for i, q in enumerate(questions)
    }
    ilog = InferenceLog(f"sqlite:///{tmp_path}/inference.db")
    with served_gateway(tmp_path, databases, tiny_base_dir, answers, ilog) as gateway:
        answered = simulate.ask(gateway.url, questions, concurrency=3)
        recorded = simulate.give_feedback(gateway.url, answered, 0.5, SEED)

    assert [a["question"] for a in answered] == [q["question"] for q in questions]
    statuses = [a["response"]["status"] for a in answered]
    assert statuses.count("ok") == 6 and statuses.count("exec_error") == 6
    assert recorded == 6
    logged = ilog.window()
    assert len(logged) == 12 and logged["feedback_sql"].notna().sum() == 6
    exported = feedback.export(
        logged, databases, tmp_path / "feedback", load_params().validate_, sample_values=0
    )
    assert exported.n_verified == 6  # every correction is the gold SQL: all verify


def test_teacher_labels_of_demo_traffic_are_checked_against_the_gold_sql(
    tmp_path: Path, tiny_base_dir: Path, monkeypatch
):
    """The teacher arm's measurement: the served model fails every question, the teacher
    (a local OpenAI-compatible server) answers two in three right and the third with answers
    that disagree; what lands is right (precision 1.0), the rest is quarantined."""
    import openai

    from pipelines.monitoring import teacher
    from pipelines.monitoring.teachers import ApiTeacher
    from tests.fake_openai import FakeOpenAI

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    databases, known = game_db(tmp_path)
    questions = simulate.fresh_questions(["game"], 9, SYNTH, SEED, SEED + 1, databases, known)
    ilog = InferenceLog(f"sqlite:///{tmp_path}/inference.db")
    wrong = {q["question"]: "SELECT * FROM no_such_table" for q in questions}
    with served_gateway(tmp_path, databases, tiny_base_dir, wrong, ilog) as gateway:
        answered = simulate.ask(gateway.url, questions, concurrency=3)
    spread = [
        "SELECT COUNT(*) FROM players",
        "SELECT MAX(level) FROM players",
        "SELECT 7 FROM items",
    ]
    answers = {q["question"]: [q["sql"]] * 5 if i % 3 else spread for i, q in enumerate(questions)}
    p = load_params()
    tcfg = p.teacher.model_copy(update={"model": "fake-teacher", "rpm_limit": None,
                                        "tpm_limit": None, "timeout_s": 5.0})  # fmt: skip
    with FakeOpenAI(teacher=answers) as server:
        client = openai.AsyncOpenAI(api_key="EMPTY", base_url=server.base_url)
        out = teacher.label(
            ilog.window(), teacher=ApiTeacher(tcfg, client), databases=databases,
            out_dir=tmp_path / "teacher", cfg=tcfg, rules=p.validate_, vocab=set(),
            human=set(), cache_path=tmp_path / "t.sqlite", sample_values=0,
            max_ddl_chars=p.serving.max_ddl_chars,
        )  # fmt: skip
    assert out.picked == 9 and out.accepted == 6 and out.quarantined == 3
    matched, known_gold = simulate.label_precision(out.labels, answered, databases, 2.0)
    assert (matched, known_gold) == (6, 6)
    assert all(r["provenance"]["picked_for"] for r in out.labels)


def test_demo_arms_table_and_paired_gain():
    from flows.demo import arms_table, paired_gain

    before = {f"e{i}": i < 4 for i in range(20)}
    after = {f"e{i}": i < 12 for i in range(20)}
    gain = paired_gain(before, after, 500, 0)
    assert gain["n"] == 20 and gain["gain"] == 0.4 and 0 < gain["ci95"][0] <= 0.4 <= gain["ci95"][1]
    assert paired_gain(before, {"x": True}, 500, 0) is None
    rows = [
        {"arm": "none", "drifted_domain_ex_before": 0.2, "drifted_domain_ex_after": 0.2,
         "paired_gain": None, "labels": None, "seconds": 600.0},
        {"arm": "teacher", "drifted_domain_ex_before": 0.2, "drifted_domain_ex_after": 0.6,
         "paired_gain": gain, "labels": {"picked": 10, "accepted": 8, "quarantined": 2,
         "label_precision": 0.875, "cost_usd": 0.0}, "seconds": 1800.0},
    ]  # fmt: skip
    table = arms_table(rows).splitlines()
    assert len(table) == 4 and "| none | 20.0% | 20.0% | n/a | 0 |" in table[2]
    assert "+40.0 pts [" in table[3] and "| 8 | 2 | 87.5% | $0.00 | 30.0 |" in table[3]
