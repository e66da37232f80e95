"""Simulated users for the closed-loop demo (`make demo`): fresh questions, traffic, feedback.

Questions come from the synthetic generator with a seed of their own, over the databases the
pipeline prepared, so they are new questions and queries, not copies of training or evaluation
examples: those are filtered out, as `prepare`'s leakage guard would drop them from training
anyway. The generator's gold SQL plays the part of a user's correction, sent through the
gateway's `/v1/feedback` like a person would, and measures the teacher's labels
(`label_precision`).
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from pipelines.config import SynthConfig
from pipelines.data.domains import DOMAINS
from pipelines.data.records import question_key
from pipelines.data.synth import generate_examples, generate_rows
from pipelines.sql import execute, has_order_by, normalize, results_match

log = logging.getLogger(__name__)


def fresh_questions(
    domains: list[str],
    n_per_domain: int,
    cfg: SynthConfig,
    data_seed: int,
    question_seed: int,
    databases: Path,
    known: list[dict],
) -> list[dict]:
    """Up to `n_per_domain` questions per domain with gold SQL, none of whose wording or SQL
    occurs in `known` (the prepared examples), in the languages and mix of `cfg` (params.yaml
    `synth:`). `data_seed` must be the seed that built the databases (values are drawn from
    the same rows); `question_seed` makes them new."""
    seen_q = {question_key(r["question"]) for r in known}
    seen_sql = {normalize(r["sql"]) for r in known}
    out: list[dict] = []
    for name in domains:
        domain = DOMAINS[name]
        # Draw more than needed: templated SQL often repeats a known query.
        drafts, _ = generate_examples(
            domain,
            generate_rows(domain, data_seed),
            databases / f"{name}.sqlite",
            4 * n_per_domain,
            cfg,
            question_seed,
        )
        fresh = (d for d in drafts if question_key(d["question"]) not in seen_q)
        new = [d for d in fresh if normalize(d["sql"]) not in seen_sql][:n_per_domain]
        if len(new) < n_per_domain:
            log.warning("%s: only %d fresh questions of %d", name, len(new), n_per_domain)
        out += new
    random.Random(question_seed).shuffle(out)
    return out


def _client(gateway: str, api_key: str | None, timeout_s: float) -> httpx.Client:
    headers = {"X-API-Key": api_key} if api_key else {}
    return httpx.Client(base_url=gateway, headers=headers, timeout=timeout_s)


def ask(
    gateway: str,
    questions: list[dict],
    concurrency: int,
    api_key: str | None = None,
    timeout_s: float = 120.0,
) -> list[dict]:
    """Send every question to `POST /v1/sql` (executing the SQL, as a user reading rows
    would); returns one answer per question: the request's gold fields plus the response."""

    def one(q: dict) -> dict:
        payload = {"question": q["question"], "db_id": q["db_id"], "execute": True}
        try:
            r = client.post("/v1/sql", json=payload)
        except httpx.HTTPError as e:
            return {**q, "http_status": None, "response": {"error": str(e)}}
        try:
            body = r.json()
        except ValueError:  # a proxy's error page, say
            body = {"error": r.text[:200]}
        return {**q, "http_status": r.status_code, "response": body}

    with _client(gateway, api_key, timeout_s) as client, ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, questions))
    failed = sum(a["http_status"] is None or a["http_status"] >= 500 for a in answers)
    log.info("%d questions sent, %d failed at the server", len(answers), failed)
    return answers


def give_feedback(
    gateway: str, answers: list[dict], share: float, seed: int, api_key: str | None = None
) -> int:
    """A seeded `share` of the answered requests gets a correction (the gold SQL) through
    `POST /v1/feedback`; returns how many the gateway recorded."""
    logged = [a for a in answers if a["response"].get("request_id")]
    chosen = random.Random(seed).sample(logged, round(share * len(logged)))
    recorded = 0
    with _client(gateway, api_key, 30.0) as client:
        for a in chosen:
            r = client.post(
                "/v1/feedback",
                json={"request_id": a["response"]["request_id"], "correct_sql": a["sql"]},
            )
            recorded += r.status_code == 200
    log.info("feedback: %d corrections recorded of %d requests", recorded, len(logged))
    return recorded


def label_precision(
    labels: list[dict], answers: list[dict], databases: Path, timeout_s: float
) -> tuple[int, int]:
    """(labels whose result matches the gold SQL of the request they label, labels of a request
    whose gold SQL is known): the demo's traffic knows the gold SQL of every question, so the
    teacher's accepted labels can be checked the way evaluation checks predictions."""
    gold = {a["response"].get("request_id"): a for a in answers if a["response"].get("request_id")}
    matched = known = 0
    for label in labels:
        asked = gold.get(label["provenance"]["request_id"])
        if asked is None:
            continue
        known += 1
        db = databases / f"{asked['db_id']}.sqlite"
        want, got = execute(db, asked["sql"], timeout_s), execute(db, label["sql"], timeout_s)
        ordered = has_order_by(asked["sql"])
        matched += want.ok and got.ok and results_match(want.rows, got.rows, ordered)
    return matched, known
