"""The demo's simulated users: fresh questions that are not the prepared examples, sent through
a real gateway on loopback (vLLM stand-in behind it), corrections recorded in the inference log
and exported as verified feedback."""

from __future__ import annotations

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


def test_traffic_and_corrections_through_the_gateway(tmp_path: Path, tiny_base_dir: Path):
    databases, known = game_db(tmp_path)
    questions = simulate.fresh_questions(["game"], 12, SYNTH, SEED, SEED + 1, databases, known)
    # The served model answers half of them correctly, the rest with a wrong table.
    answers = {
        q["question"]: q["sql"] if i % 2 else "SELECT * FROM no_such_table"
        for i, q in enumerate(questions)
    }
    cfg = load_params().serving.model_copy(update={"request_timeout_s": 5.0})
    ilog = InferenceLog(f"sqlite:///{tmp_path}/inference.db")
    routing = tmp_path / "routing.json"
    write_route(routing, Route("text2sql-v1", 1))
    with FakeVLLM(answers) as vllm:
        vllm.adapters["text2sql-v1"] = "/adapters/v1"
        service = Text2SQL(
            cfg,
            databases,
            AutoTokenizer.from_pretrained(tiny_base_dir),
            VLLMCompletions(vllm.base_url, cfg.request_timeout_s, cfg.max_new_tokens),
        )
        with LoopbackServer(create_app(service, ilog, RouteWatcher(routing))) as gateway:
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
