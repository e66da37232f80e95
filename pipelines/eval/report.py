"""The files of an evaluation report, written by the `evaluate` stage and by `sqlops eval`.

- metrics (`metrics/eval.json`): the output contract in DESIGN.md, one `M` block per model;
- predictions: one JSON line per example and model (question, gold, predicted, verdicts, the
  `failure` class of a wrong answer, the `dataset`: eval, selection or real_schema);
- breakdown (CSV, DVC plots): `dataset, model, dimension, value, group, execution_accuracy, n`
  and the wrong answers per failure class (`failures_<class>`) for the whole set and every
  domain, difficulty and language of each dataset; `dvc plots show` draws base vs tuned;
- disagreements (markdown): every example where the LLM judge and execution disagree, for a
  person to review (which of the two was wrong?).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.data.records import write_jsonl
from pipelines.eval import failures
from pipelines.eval.metrics import disagreements

DIMENSIONS = {"by_domain": "domain", "by_difficulty": "difficulty", "by_lang": "lang"}
EXTRA_SPLITS = ("selection", "real_schema")  # eval.json keys scored beside the reported split
BREAKDOWN_COLUMNS = [
    "dataset",
    "model",
    "dimension",
    "value",
    "group",
    "execution_accuracy",
    "n",
    *(f"failures_{c}" for c in failures.CLASSES),
]


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


def datasets(metrics: dict) -> list[tuple[str, dict]]:
    """(name, block with the models' M blocks and `n_examples`) of every scored split: the
    reported `eval` (the top level of eval.json), then `selection` and `real_schema`."""
    return [("eval", metrics)] + [(k, metrics[k]) for k in EXTRA_SPLITS if metrics.get(k)]


def breakdown_rows(metrics: dict, rows: list[dict]) -> list[dict]:
    """Long-format execution accuracy and failure classes per dataset, model and group (DVC
    plots want one row per bar); `rows`: the scored predictions the figures came from."""
    out = []
    for dataset, block in datasets(metrics):
        for name in model_names(block):
            m = block[name]
            mine = [r for r in rows if r["model"] == name and r.get("dataset", "eval") == dataset]
            groups = [("overall", "all", m["execution_accuracy"], block["n_examples"], mine)]
            for key, dim in DIMENSIONS.items():
                groups += [
                    (dim, v, g["execution_accuracy"], g["n"], [r for r in mine if str(r[dim]) == v])
                    for v, g in m[key].items()
                ]
            for dimension, value, accuracy, n, part in groups:
                label = f"{dimension}: {value}"  # the reported split keeps its earlier names
                found = failures.counts(part)
                out.append(
                    {
                        "dataset": dataset,
                        "model": name,
                        "dimension": dimension,
                        "value": value,
                        "group": label if dataset == "eval" else f"{dataset} {label}",
                        "execution_accuracy": round(accuracy, 4),
                        "n": n,
                        **{f"failures_{c}": found[c] for c in failures.CLASSES},
                    }
                )
    return out


def _cell(value: object, limit: int = 300) -> str:
    text = "" if value is None else " ".join(str(value).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def disagreements_markdown(metrics: dict, rows: list[dict]) -> str:
    """A reviewable table of the examples where judge and execution disagree."""
    found = disagreements([r for r in rows if r.get("dataset", "eval") == "eval"])
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
        writer.writerows(breakdown_rows(metrics, rows))
    paths.disagreements.write_text(disagreements_markdown(metrics, rows), encoding="utf-8")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def real_schema_line(metrics: dict) -> str | None:
    """The real-schema set's row of `sqlops summary` (None when it was not scored)."""
    real = metrics.get("real_schema")
    if not real:
        return None
    figures = ", ".join(
        f"{name} {_pct(real[name]['execution_accuracy'])}" for name in model_names(real)
    )
    tuned = real.get("tuned") or {}
    valid = f", valid SQL {_pct(tuned['valid_sql_rate'])}" if tuned else ""
    return (
        f"real-schema set ({', '.join(real['domains'])}; {real['n_examples']} examples): "
        f"execution accuracy {figures}{valid}"
    )


def failure_lines(metrics: dict, model: str = "tuned") -> list[str]:
    """One line per scored dataset: `model`'s wrong answers by failure class, most first."""
    return [
        f"{dataset}: {failures.summary_line(block[model]['failures'])}"
        for dataset, block in datasets(metrics)
        if "failures" in (block.get(model) or {})
    ]
