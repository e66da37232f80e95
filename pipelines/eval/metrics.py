"""Pure metric functions for Text2SQL evaluation: per-example verdicts and their summaries.

`score_example` decides valid / execution match / exact match for one prediction; `summarize`
turns scored rows into the `M` block of metrics/eval.json (DESIGN.md, output contract), judge
figures and failure classes (`failures.py`) included; `disagreements` picks the rows where the
judge and execution disagree.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from pipelines import sql as sqlmod
from pipelines.eval import failures


def score_example(
    gold_sql: str,
    gold: sqlmod.ExecResult,
    pred_sql: str,
    pred: sqlmod.ExecResult,
    tol: float,
) -> dict:
    """valid: the prediction is one read-only statement that executes; execution_match: its
    result equals the gold result (Spider semantics); exact_match: same normalised text.
    Whatever model output does to the comparison, it is "not a match", never an exception."""
    try:
        ordered = sqlmod.has_order_by(gold_sql)
        match = pred.ok and gold.ok and sqlmod.results_match(gold.rows, pred.rows, ordered, tol)
    except Exception:
        match = False
    return {
        "valid": pred.ok,
        "execution_match": bool(match),
        "exact_match": sqlmod.normalize(gold_sql) == sqlmod.normalize(pred_sql),
        "gold_nonempty": bool(gold.rows),
        "error": pred.error,
    }


def bootstrap_ci(values: Sequence[int], samples: int, seed: int) -> list[float]:
    """95% percentile interval of the mean of 0/1 values (or paired -1/0/1 differences)."""
    if not values:
        return [0.0, 0.0]
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return [means[int(0.025 * (samples - 1))], means[int(0.975 * (samples - 1))]]


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Agreement between two yes/no raters beyond chance; None when undefined."""
    n = len(a)
    if n == 0 or n != len(b):
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    if expected == 1:
        return 1.0 if observed == 1 else None
    return (observed - expected) / (1 - expected)


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def breakdown(rows: list[dict], key: str) -> dict[str, dict]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        groups[str(r[key])].append(r["execution_match"])
    return {k: {"execution_accuracy": _mean(v), "n": len(v)} for k, v in sorted(groups.items())}


def pooled_accuracy(by_domain: dict[str, dict], domains: Sequence[str]) -> float | None:
    """Execution accuracy over `domains` pooled by example count (a `by_domain` breakdown);
    None when none of them was evaluated."""
    parts = [by_domain[d] for d in domains if d in by_domain]
    n = sum(x["n"] for x in parts)
    return sum(x["execution_accuracy"] * x["n"] for x in parts) / n if n else None


def judge_figures(rows: list[dict], failures_only: bool) -> tuple[float | None, float | None]:
    """(judge accuracy, judge-vs-execution kappa) over the rows that have a verdict.

    With `failures_only` the judge saw only the examples execution marks wrong: the ones that
    execute correctly count as correct, and kappa is undefined (the judge never saw a match)."""
    if failures_only:
        decided = [r for r in rows if r["execution_match"] or r.get("judge") is not None]
        if not any(r.get("judge") is not None for r in decided):
            return None, None
        return _mean([r["execution_match"] or r["judge"] for r in decided]), None
    judged = [r for r in rows if r.get("judge") is not None]
    if not judged:
        return None, None
    verdicts = [r["judge"] for r in judged]
    return _mean(verdicts), cohen_kappa(verdicts, [r["execution_match"] for r in judged])


def disagreements(rows: list[dict]) -> list[dict]:
    """Rows where the judge and execution disagree, each with a `disagreement` label."""
    out = []
    for r in rows:
        if r.get("judge") is None or r["judge"] == r["execution_match"]:
            continue
        kind = "judge yes, execution no" if r["judge"] else "judge no, execution yes"
        out.append({"disagreement": kind, **r})
    return out


def summarize(
    rows: list[dict],
    bootstrap_samples: int,
    seed: int,
    tokens_per_s: float,
    judged_failures_only: bool = False,
) -> dict:
    """The metrics block of one model over its scored rows (fractions in [0, 1])."""
    ex = [r["execution_match"] for r in rows]
    nonempty = [r["execution_match"] for r in rows if r["gold_nonempty"]]
    judge_accuracy, kappa = judge_figures(rows, judged_failures_only)
    return {
        "execution_accuracy": _mean(ex),
        "execution_accuracy_nonempty": _mean(nonempty),
        "exact_match": _mean([r["exact_match"] for r in rows]),
        "valid_sql_rate": _mean([r["valid"] for r in rows]),
        "execution_accuracy_ci95": bootstrap_ci(ex, bootstrap_samples, seed),
        "judge_accuracy": judge_accuracy,
        "judge_execution_kappa": kappa,
        "by_domain": breakdown(rows, "domain"),
        "by_difficulty": breakdown(rows, "difficulty"),
        "by_lang": breakdown(rows, "lang"),
        "failures": failures.counts(rows),  # wrong answers per failure class
        "generation_tokens_per_s": tokens_per_s,
    }
