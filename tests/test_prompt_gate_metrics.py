"""Pure functions: the one prompt, the promotion gate, the evaluation metrics."""

from __future__ import annotations

import pytest

from pipelines.eval import metrics
from pipelines.model.prompt import INSTRUCTION, build_completion, build_prompt
from pipelines.release.gate import should_promote
from pipelines.sql import ExecResult


def test_prompt_has_the_book_sections_in_order():
    p = build_prompt("CREATE TABLE t (a INT);", "How many rows?")
    assert p.startswith(INSTRUCTION)
    assert p.index("### DDL:") < p.index("### Question:") < p.index("### SQL:")
    assert p.endswith("### SQL:\n")


def test_prompt_uses_the_chat_template(tiny_base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    p = build_prompt("CREATE TABLE t (a INT);", "How many rows?", tok)
    assert "<|im_start|>system\n" + INSTRUCTION in p and p.endswith("<|im_start|>assistant\n")
    assert build_completion("SELECT 1;", tok) == "SELECT 1;" + tok.eos_token


M = {"execution_accuracy": 0.5}


@pytest.mark.parametrize(
    ("challenger", "champion", "base", "promote"),
    [
        (0.5, None, 0.1, True),  # first model beats the base model
        (0.1, None, 0.1, False),  # ... or not
        (0.6, 0.5, 0.1, True),
        (0.5, 0.5, 0.1, False),  # a tie keeps the champion
        (0.4, 0.5, 0.1, False),
    ],
)
def test_should_promote(challenger, champion, base, promote):
    def m(x):
        return None if x is None else {"execution_accuracy": x}

    decision = should_promote(m(challenger), m(champion), m(base), min_delta=0.0)
    assert decision.promote is promote and decision.reasons


def test_min_delta_is_respected():
    d = should_promote({"execution_accuracy": 0.52}, M, M, min_delta=0.05)
    assert not d.promote and "min_delta 0.05" in d.reasons[0]


def test_score_example():
    gold = ExecResult(rows=[(1,), (2,)])
    row = metrics.score_example(
        "SELECT a FROM t", gold, "select a from t", ExecResult(rows=[(2,), (1,)]), 1e-6
    )  # noqa: E501
    assert row == {
        "valid": True,
        "execution_match": True,
        "exact_match": True,
        "gold_nonempty": True,
        "error": None,
    }
    bad = metrics.score_example("SELECT a FROM t", gold, "x", ExecResult(error="rejected"), 1e-6)
    assert not bad["valid"] and not bad["execution_match"]


def test_bootstrap_ci_brackets_the_mean():
    values = [True] * 30 + [False] * 70
    lo, hi = metrics.bootstrap_ci(values, 500, seed=0)
    assert lo < 0.3 < hi and lo > 0.15 and hi < 0.45
    assert metrics.bootstrap_ci([], 10, 0) == [0.0, 0.0]


def test_cohen_kappa():
    assert metrics.cohen_kappa([True, False, True, False], [True, False, True, False]) == 1.0
    assert metrics.cohen_kappa([True, True, False, False], [True, False, True, False]) == 0.0
    assert metrics.cohen_kappa([], []) is None


def test_summarize_shape():
    rows = [
        {
            "execution_match": True,
            "exact_match": False,
            "valid": True,
            "gold_nonempty": True,
            "domain": "game",
            "difficulty": "easy",
            "lang": "en",
            "judge": True,
        },
        {
            "execution_match": False,
            "exact_match": False,
            "valid": False,
            "gold_nonempty": False,
            "domain": "game",
            "difficulty": "hard",
            "lang": "ko",
            "judge": None,
        },
    ]
    s = metrics.summarize(rows, 100, 0, tokens_per_s=12.0)
    assert s["execution_accuracy"] == 0.5 and s["execution_accuracy_nonempty"] == 1.0
    assert s["valid_sql_rate"] == 0.5 and s["judge_accuracy"] == 1.0
    assert s["by_domain"] == {"game": {"execution_accuracy": 0.5, "n": 2}}
    assert set(s["by_lang"]) == {"en", "ko"} and s["generation_tokens_per_s"] == 12.0
