"""Drift check: the training questions (reference) against a time window of the inference log.

No labels needed. Input signals compare the two with Evidently (`ValueDrift`): question length
in characters and word tokens, the out-of-vocabulary rate against the training vocabulary, the
language and domain mix, the question text itself (a domain classifier: can a model tell traffic
from training questions?) and the shape of the SQL (joins, GROUP BY, nested queries; generated
SQL for traffic, gold SQL for the reference). Health signals are rates of the window checked
against limits: guard rejections, execution errors, empty results, p95 latency, "wrong" feedback.

Text drift and SQL parsing run on a seeded sample of `monitoring.sample_size` requests; every
other signal uses the whole window. The Evidently report is saved as
`<paths.monitoring>/drift-<stamp>.html`, the `DriftResult` next to it as `.json`.

Run: `python -m pipelines.monitoring.drift [--hours N]` (exit code 1 when drift is found).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import sqlglot
from sqlglot import exp

from pipelines.config import MonitoringConfig, load_params, setup_entry_point
from pipelines.sql import parse

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")
_DIGITS = re.compile(r"\d+")
SQL_SIGNALS = ("sql_joins", "sql_group_by", "sql_nesting")
NUM_SIGNALS = ("question_chars", "question_tokens", *SQL_SIGNALS)
CAT_SIGNALS = ("lang", "domain")
# signal tested against a limit → (column, aggregate, config field of the limit)
LIMITS = {
    "oov_rate": ("oov_rate", "mean", "max_oov_increase"),  # limit: reference mean + this
    "guard_rejection_rate": ("guard_rejected", "mean", "max_guard_rejection_rate"),
    "exec_error_rate": ("exec_error", "mean", "max_exec_error_rate"),
    "empty_result_rate": ("empty_result", "mean", "max_empty_result_rate"),
    "latency_p95_ms": ("latency_ms", "p95", "max_latency_p95_ms"),
    "negative_feedback_rate": ("negative_feedback", "mean", "max_negative_feedback_rate"),
}


@dataclass
class DriftResult:
    drifted: bool  # any signal drifted
    # name → {"score", "threshold", "drifted", "method"}; score None when not measurable
    signals: dict[str, dict] = field(default_factory=dict)
    n_current: int = 0  # requests in the window
    n_reference: int = 0  # training questions
    since: float | None = None  # window bounds (unix seconds)
    until: float | None = None
    report_path: Path | None = None  # Evidently HTML report
    seconds: float = 0.0  # wall time of the check

    @property
    def drifted_signals(self) -> list[str]:
        return [name for name, s in self.signals.items() if s["drifted"]]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["report_path"] = str(self.report_path) if self.report_path else None
        d["drifted_signals"] = self.drifted_signals
        return d


def words(texts: pd.Series) -> pd.Series:
    """Lower-cased word tokens, every digit run the same token (values are not vocabulary)."""
    return texts.str.lower().str.replace(_DIGITS, "0", regex=True).str.findall(_WORD)


def oov_rate(tokens: pd.Series, vocab: set[str]) -> np.ndarray:
    """Per question, the share of its tokens that never occur in `vocab` (0 for no tokens)."""
    return np.fromiter(
        (sum(t not in vocab for t in ts) / len(ts) if ts else 0.0 for ts in tokens),
        dtype=float,
        count=len(tokens),
    )


def sql_shape(sql: str | None) -> tuple[int, int, int] | None:
    """(joins, has GROUP BY, nested query blocks) of a query; None when it does not parse."""
    if not sql:
        return None
    try:
        tree = parse(sql)
    except (sqlglot.errors.SqlglotError, ValueError):
        return None
    joins = sum(1 for _ in tree.find_all(exp.Join))
    grouped = int(next(tree.find_all(exp.Group), None) is not None)
    nesting = max(sum(1 for _ in tree.find_all(exp.Select)) - 1, 0)
    return joins, grouped, nesting


def _sql_columns(sqls: pd.Series) -> pd.DataFrame:
    shapes = {s: sql_shape(s) for s in sqls.dropna().unique()}
    rows = [shapes.get(s) if isinstance(s, str) else None for s in sqls]
    return pd.DataFrame(
        [r if r is not None else (np.nan,) * 3 for r in rows],
        columns=list(SQL_SIGNALS),
        index=sqls.index,
        dtype=float,
    )


@dataclass
class Reference:
    frame: pd.DataFrame  # one row per training question, the signal columns
    vocab: set[str]  # every training question token
    domains: dict[str, str]  # db_id → domain


def load_reference(train_path: Path, seed: int) -> Reference:
    """Signal columns of the training questions. Their OOV rate is cross-fitted (each half
    against the other half's vocabulary), so that new in-distribution questions, which carry
    unseen values and names too, do not look drifted."""
    train = pd.read_json(train_path, lines=True, dtype=False)
    tokens = words(train["question"])
    # Random halves: the file's order is structured (languages alternate row by row).
    halves = np.random.default_rng(seed).permutation(len(train)) % 2
    vocab_of = [{t for ts in tokens[halves == h] for t in ts} for h in (0, 1)]
    oov = np.empty(len(train))
    for h in (0, 1):
        oov[halves == h] = oov_rate(tokens[halves == h], vocab_of[1 - h])
    frame = pd.DataFrame(
        {
            "question": train["question"],
            "question_chars": train["question"].str.len().astype(float),
            "question_tokens": tokens.str.len().astype(float),
            "oov_rate": oov,
            "lang": train["lang"],
            "domain": train["domain"],
        }
    )
    frame = pd.concat([frame, _sql_columns(train["sql"])], axis=1)
    for column, _, _ in LIMITS.values():
        if column not in frame:
            frame[column] = np.nan  # no production outcomes for training questions
    domains = dict(zip(train["db_id"].astype(str), train["domain"].astype(str), strict=True))
    return Reference(frame, vocab_of[0] | vocab_of[1], domains)


def traffic_frame(
    window: pd.DataFrame, ref: Reference, sample_size: int, seed: int
) -> pd.DataFrame:
    """Signal columns of logged requests (the inference log's `window()`). Text and SQL columns
    are filled only for a seeded sample of `sample_size` rows (NaN elsewhere)."""
    tokens = words(window["question"].fillna(""))
    executed = window["executed"].astype(bool)
    verdict = window["feedback_verdict"]
    frame = pd.DataFrame(
        {
            "question_chars": window["question"].str.len().astype(float),
            "question_tokens": tokens.str.len().astype(float),
            "oov_rate": oov_rate(tokens, ref.vocab),
            "lang": window["lang"].fillna("unknown"),
            "domain": window["db_id"].map(lambda d: ref.domains.get(d, d)),
            "guard_rejected": (window["status"] == "guard_rejected").astype(float),
            "exec_error": (window["status"] == "exec_error").astype(float),
            "empty_result": (window["n_rows"].fillna(0) == 0).astype(float).where(executed),
            "latency_ms": window["latency_ms"].astype(float),
            "negative_feedback": (verdict == "wrong").astype(float).where(verdict.notna()),
        }
    ).reset_index(drop=True)
    n = len(frame)
    sample = np.random.default_rng(seed).choice(n, size=min(sample_size, n), replace=False)
    sampled = pd.Series(False, index=frame.index)
    sampled.iloc[sample] = True
    frame["question"] = window["question"].reset_index(drop=True).where(sampled)
    sqls = window["sql"].reset_index(drop=True).where(sampled)
    return pd.concat([frame, _sql_columns(sqls)], axis=1)


def limits_of(cfg: MonitoringConfig, ref: pd.DataFrame) -> dict[str, float]:
    """Upper limit per tested signal. Unknown words are judged against the training questions'
    own cross-fitted rate; the health rates against fixed limits."""
    limits = {name: getattr(cfg, field) for name, (_, _, field) in LIMITS.items()}
    limits["oov_rate"] += float(ref["oov_rate"].mean())
    return limits


def _evidently_report(ref: pd.DataFrame, cur: pd.DataFrame, cfg: MonitoringConfig):
    """Run one Evidently report: ValueDrift per input signal, a tested limit per rate.
    Returns (snapshot, signal names in metric order, {signal: (method, threshold)})."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue, QuantileValue, ValueDrift
    from evidently.tests import lte

    drift_cols = [*NUM_SIGNALS, *CAT_SIGNALS] + (["question"] if cfg.text_drift else [])
    # A signal with no values on either side (e.g. no SQL generated) cannot be compared.
    drift_cols = [c for c in drift_cols if cur[c].notna().any() and ref[c].notna().any()]
    methods = {c: ("wasserstein", cfg.num_threshold) for c in NUM_SIGNALS}
    methods |= {c: ("jensenshannon", cfg.cat_threshold) for c in CAT_SIGNALS}
    methods["question"] = ("abs_text_content_drift", cfg.text_threshold)
    metrics = {
        c: ValueDrift(column=c, method=methods[c][0], threshold=methods[c][1]) for c in drift_cols
    }
    for name, limit in limits_of(cfg, ref).items():
        column, how, _ = LIMITS[name]
        methods[name] = (f"{how} <= limit", limit)
        if cur[column].notna().any():
            test = [lte(limit)]
            metrics[name] = (
                QuantileValue(column=column, quantile=0.95, tests=test)
                if how == "p95"
                else MeanValue(column=column, tests=test)
            )
    numeric = [*NUM_SIGNALS] + list(dict.fromkeys(column for column, _, _ in LIMITS.values()))
    definition = DataDefinition(
        numerical_columns=numeric, categorical_columns=list(CAT_SIGNALS), text_columns=["question"]
    )
    columns = [*numeric, *CAT_SIGNALS, "question"]
    with warnings.catch_warnings():
        # Noise, not news: the reference's all-NaN outcome columns, the text classifier's
        # convergence and its undefined AUC on tiny windows.
        warnings.simplefilter("ignore")
        snapshot = Report(list(metrics.values()), include_tests=True).run(
            current_data=Dataset.from_pandas(cur[columns], data_definition=definition),
            reference_data=Dataset.from_pandas(ref[columns], data_definition=definition),
        )
    return snapshot, list(metrics), methods


def check(
    cfg: MonitoringConfig,
    ref: Reference,
    window: pd.DataFrame,
    report_dir: Path | None,
    seed: int,
    since: float | None = None,
    until: float | None = None,
) -> DriftResult:
    """Compare a window of logged requests with the training questions."""
    start = time.monotonic()
    result = DriftResult(
        drifted=False, n_current=len(window), n_reference=len(ref.frame), since=since, until=until
    )
    if window.empty:
        log.info("no requests in the window: nothing to compare")
        return result
    if len(window) < cfg.min_samples:
        log.warning(
            "only %d requests: drift scores are noisy below %d", len(window), cfg.min_samples
        )
    cur = traffic_frame(window, ref, cfg.sample_size, seed)
    snapshot, names, methods = _evidently_report(ref.frame, cur, cfg)
    data = snapshot.dict()
    failed = {t["metric_config"]["metric_id"] for t in data["tests"] if t["status"] == "FAIL"}
    measured = dict(zip(names, data["metrics"], strict=True))
    for name, (method, threshold) in methods.items():
        if name == "question" and not cfg.text_drift:
            continue
        metric = measured.get(name, {"id": None, "value": None})  # None: nothing to measure
        score = metric["value"]
        measurable = score is not None and not np.isnan(score)
        result.signals["question_text" if name == "question" else name] = {
            "score": round(float(score), 6) if measurable else None,
            "threshold": round(float(threshold), 6),
            "drifted": metric["id"] in failed,
            "method": method,
        }
    result.drifted = bool(result.drifted_signals)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(until or time.time()))
        result.report_path = report_dir / f"drift-{stamp}.html"
        snapshot.save_html(str(result.report_path))
    result.seconds = round(time.monotonic() - start, 3)
    if result.report_path is not None:
        result.report_path.with_suffix(".json").write_text(
            json.dumps(result.to_dict(), indent=2) + "\n"
        )
    return result


def run(
    cfg: MonitoringConfig,
    train_path: Path,
    log_url: str,
    report_dir: Path | None,
    seed: int,
    now: float | None = None,
) -> DriftResult:
    """Drift of the last `cfg.window_hours` of the inference log against the training set."""
    from pipelines.serving.inference_log import InferenceLog

    start = time.monotonic()
    until = time.time() if now is None else now
    since = until - cfg.window_hours * 3600
    window = InferenceLog(log_url).window(since, until)
    ref = load_reference(train_path, seed)
    result = check(cfg, ref, window, report_dir, seed, since, until)
    result.seconds = round(time.monotonic() - start, 3)
    log.info(
        "drift check over %d requests in %.1f s: %s",
        result.n_current,
        result.seconds,
        ", ".join(result.drifted_signals) or "no drift",
    )
    return result


def main(argv: list[str] | None = None) -> int:
    setup_entry_point()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, help="window length (default: params.yaml)")
    args = parser.parse_args(argv)
    p = load_params()
    cfg = p.monitoring
    if args.hours:
        cfg = cfg.model_copy(update={"window_hours": args.hours})
    result = run(
        cfg,
        p.path("prepared") / "train.jsonl",
        p.serving.inference_log_url,
        p.path("monitoring"),
        p.seed,
    )
    for name, s in result.signals.items():
        mark = "DRIFT" if s["drifted"] else "ok"
        print(f"  {name:<24} {s['score']!s:>10}  (threshold {s['threshold']})  {mark}")
    print(f"{result.n_current} requests; report: {result.report_path}")
    return 1 if result.drifted else 0


if __name__ == "__main__":
    sys.exit(main())
