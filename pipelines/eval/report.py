"""The files of an evaluation report, written by the `evaluate` stage and by `sqlops eval`.

- metrics (`metrics/eval.json`): the output contract in DESIGN.md, one `M` block per model;
- predictions: one JSON line per example and model (question, gold, predicted, verdicts);
- breakdown (CSV, DVC plots): `model, dimension, value, group, execution_accuracy, n` for the
  whole set and every domain, difficulty and language; `dvc plots show` draws base vs tuned;
- disagreements (markdown): every example where the LLM judge and execution disagree, for a
  person to review (which of the two was wrong?).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.data.records import write_jsonl
from pipelines.eval.metrics import disagreements

DIMENSIONS = {"by_domain": "domain", "by_difficulty": "difficulty", "by_lang": "lang"}
BREAKDOWN_COLUMNS = ["model", "dimension", "value", "group", "execution_accuracy", "n"]


@dataclass(frozen=True)
class ReportPaths:
    metrics: Path  # eval.json (output contract)
    predictions: Path  # JSONL, one line per example and model
    breakdown: Path  # CSV for DVC plots
    disagreements: Path  # markdown table of judge-vs-execution disagreements

    @classmethod
    def under(cls, out_dir: Path) -> ReportPaths:
        """The report's files in one folder (`sqlops eval --out DIR`)."""
        return cls(
            out_dir / "eval.json",
            out_dir / "predictions.jsonl",
            out_dir / "breakdown.csv",
            out_dir / "disagreements.md",
        )


def model_names(metrics: dict) -> list[str]:
    """The evaluated models of an eval.json, in order ("base", "tuned", ...)."""
    return [k for k, v in metrics.items() if isinstance(v, dict) and "execution_accuracy" in v]


def breakdown_rows(metrics: dict) -> list[dict]:
    """Long-format execution accuracy per model and group (DVC plots want one row per bar)."""
    rows = []
    for name in model_names(metrics):
        m = metrics[name]
        groups = [("overall", "all", m["execution_accuracy"], metrics["n_examples"])]
        for key, dimension in DIMENSIONS.items():
            groups += [(dimension, v, g["execution_accuracy"], g["n"]) for v, g in m[key].items()]
        for dimension, value, accuracy, n in groups:
            rows.append(
                {
                    "model": name,
                    "dimension": dimension,
                    "value": value,
                    "group": f"{dimension}: {value}",
                    "execution_accuracy": round(accuracy, 4),
                    "n": n,
                }
            )
    return rows


def _cell(value: object, limit: int = 300) -> str:
    text = "" if value is None else " ".join(str(value).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def disagreements_markdown(metrics: dict, rows: list[dict]) -> str:
    """A reviewable table of the examples where judge and execution disagree."""
    found = disagreements(rows)
    judge = metrics["judge"]
    lines = ["# Judge vs execution: disagreements", ""]
    if judge["status"] == "skipped":
        lines.append("The LLM judge was skipped (no endpoint configured): nothing to compare.")
        return "\n".join(lines) + "\n"
    for name in model_names(metrics):
        kappa = metrics[name]["judge_execution_kappa"]
        mine = [r for r in found if r["model"] == name]
        yes_no = sum(r["judge"] for r in mine)
        lines.append(
            f"- **{name}**: {len(mine)} disagreements ({yes_no} judge yes / execution no, "
            f"{len(mine) - yes_no} judge no / execution yes); Cohen's kappa "
            + ("n/a" if kappa is None else f"{kappa:.3f}")
        )
    if judge.get("scope") == "execution_failures":
        lines.append(
            "- the judge saw only the examples execution marks wrong "
            "(`evaluate.judge.only_execution_failures`)"
        )
    lines += [
        "",
        f"Judge model `{judge['model']}`, {metrics['n_examples']} examples per model. Execution: "
        "the predicted query's result equals the gold result (Spider semantics).",
        "",
        "| model | id | disagreement | question | gold SQL | predicted SQL | execution error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    if not found:
        lines.append("| (none) | | | | | | |")
    for r in found:
        cells = [
            r["model"],
            r["id"],
            r["disagreement"],
            r["question"],
            r["gold_sql"],
            r["pred_sql"],
            r.get("error"),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(paths: ReportPaths, metrics: dict, rows: list[dict]) -> None:
    for path in (paths.metrics, paths.predictions, paths.breakdown, paths.disagreements):
        path.parent.mkdir(parents=True, exist_ok=True)
    paths.metrics.write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    write_jsonl(paths.predictions, rows)
    with paths.breakdown.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=BREAKDOWN_COLUMNS)
        writer.writeheader()
        writer.writerows(breakdown_rows(metrics))
    paths.disagreements.write_text(disagreements_markdown(metrics, rows), encoding="utf-8")
