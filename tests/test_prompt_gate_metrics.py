"""Pure functions: the one prompt, the promotion gate, the evaluation metrics."""

from __future__ import annotations

import pytest

from pipelines.config import load_params
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


def test_prompt_without_a_chat_template_starts_with_the_bos_token():
    """A pretrained model (Gemma 3) reads its prompt after BOS; tokenization adds no special
    tokens anywhere, so the prompt text carries it, and it tokenizes to the BOS id."""
    from conftest import _fixture_tokenizer

    tok = _fixture_tokenizer()
    assert not getattr(tok, "chat_template", None)
    p = build_prompt("CREATE TABLE t (a INT);", "How many rows?", tok)
    assert p.startswith(tok.bos_token + INSTRUCTION)
    assert tok(p, add_special_tokens=False).input_ids[0] == tok.bos_token_id


M = {"execution_accuracy": 0.5}


# params.yaml's gate, with a valid-SQL floor the cases below are written around.
GATE = load_params().registry.model_copy(
    update={"bootstrap_samples": 500, "min_valid_sql_rate": 0.3}
)


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

    decision = should_promote(m(challenger), m(champion), m(base), GATE)
    assert decision.promote is promote and decision.reasons


def test_min_delta_is_respected():
    d = should_promote(
        {"execution_accuracy": 0.52}, M, M, GATE.model_copy(update={"min_delta": 0.05})
    )
    assert not d.promote and "min_delta 0.05" in d.reasons[0]


def test_paired_bootstrap_needs_a_gain_beyond_luck():
    # +2 points on 100 examples: 3 wins, 1 loss. Higher on average, but not reliably.
    ref = [True] * 40 + [False] * 60
    lucky = ref[:]
    lucky[40:43] = [True] * 3
    lucky[0] = False
    d = should_promote(
        {"execution_accuracy": 0.42}, {"execution_accuracy": 0.40}, M, GATE, paired=(lucky, ref)
    )
    assert not d.promote and any("lower bound" in r for r in d.reasons)
    clear = [True] * 60 + [False] * 40  # +20 points, never worse
    d = should_promote(
        {"execution_accuracy": 0.60}, {"execution_accuracy": 0.40}, M, GATE, paired=(clear, ref)
    )
    assert d.promote


def test_domain_regression_valid_sql_floor_and_judge():
    champ = {
        "execution_accuracy": 0.5,
        "by_domain": {"game": {"execution_accuracy": 0.5}, "shop": {"execution_accuracy": 0.5}},
        "judge_accuracy": 0.6,
    }
    good = {
        "execution_accuracy": 0.6,
        "valid_sql_rate": 0.9,
        "judge_accuracy": 0.6,
        "by_domain": {"game": {"execution_accuracy": 0.75}, "shop": {"execution_accuracy": 0.46}},
    }
    assert should_promote(good, champ, M, GATE).promote
    worse_shop = {**good, "by_domain": {**good["by_domain"], "shop": {"execution_accuracy": 0.3}}}
    d = should_promote(worse_shop, champ, M, GATE)
    assert not d.promote and any(r.startswith("domain shop regresses") for r in d.reasons)
    assert not should_promote({**good, "valid_sql_rate": 0.2}, champ, M, GATE).promote
    assert not should_promote({**good, "judge_accuracy": 0.5}, champ, M, GATE).promote


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
