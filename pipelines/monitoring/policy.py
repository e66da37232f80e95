"""When drift should start a retraining run: a pure decision over a drift check and history.

Retrain only when the window holds enough requests, a signal listed in `monitoring.retrain_on`
drifted (health signals such as latency report but do not retrain: a new adapter would not fix
them), the last retrain is older than the cooldown, and fewer than `max_retrains_per_day`
retrains started in the last 24 hours. Every decision comes with its reasons, for the flow log.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pipelines.config import MonitoringConfig

if TYPE_CHECKING:
    from pipelines.monitoring.drift import DriftResult

DAY_S = 24 * 3600


def history_horizon_s(cfg: MonitoringConfig) -> float:
    """How far back the retrain history must reach for `should_retrain` to judge both the
    cooldown and the daily limit."""
    return max(DAY_S, cfg.cooldown_hours * 3600)


def should_retrain(
    drift: DriftResult, now: float, history: Iterable[float], cfg: MonitoringConfig
) -> tuple[bool, list[str]]:
    """(retrain?, reasons). `now` and `history` (start times of earlier drift-triggered
    retrains) are unix seconds."""
    if drift.n_current < cfg.min_samples:
        return False, [f"only {drift.n_current} requests in the window (minimum {cfg.min_samples})"]
    triggering = [name for name in drift.drifted_signals if name in cfg.retrain_on]
    if not triggering:
        others = ", ".join(drift.drifted_signals) or "none"
        return False, [f"no retraining signal drifted (drifted, reported only: {others})"]
    reasons = [
        f"{name} drifted: {drift.signals[name]['score']} > {drift.signals[name]['threshold']}"
        for name in triggering
    ]
    past = sorted(t for t in history if t <= now)
    if past and now - past[-1] < cfg.cooldown_hours * 3600:
        ago = (now - past[-1]) / 3600
        cooldown = f"cooldown: last retrain {ago:.1f} h ago (< {cfg.cooldown_hours} h)"
        return False, [*reasons, cooldown]
    last_day = [t for t in past if now - t < DAY_S]
    if len(last_day) >= cfg.max_retrains_per_day:
        return False, [
            *reasons,
            f"daily limit: {len(last_day)} retrains in the last 24 h "
            f"(max {cfg.max_retrains_per_day})",
        ]
    return True, reasons
