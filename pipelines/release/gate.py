"""The promotion decision: a pure function of the challenger's, champion's and base metrics.

Inputs are `M` blocks of metrics/eval.json (and, for the paired test, per-example execution
verdicts on the same examples). The first model is measured against the base model, later ones
against the current champion. Every check adds a reason; all must pass:

- execution accuracy beats the reference by more than `min_delta`;
- the paired bootstrap 95% lower bound of that gain is above 0 (when both were scored on the
  same examples), so a lucky draw of the eval sample does not promote;
- no domain loses more than `domain_tolerance` of execution accuracy;
- the valid-SQL rate is at least `min_valid_sql_rate`;
- judge accuracy, when both have one, is not worse by more than `judge_tolerance`;
- on the real-schema set (metrics/eval.json `real_schema`, databases people built), execution
  accuracy does not drop more than `real_schema_tolerance` below the reference's (reported
  either way; not compared when the reference has no such figure);
- on live traffic (shadow answers, `serving.shadow_share`), when both have at least
  `live_min_rows`, the challenger's execution-error rate is not above the champion's by more
  than `live_error_tolerance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pipelines.config import RegistryConfig
from pipelines.eval.metrics import bootstrap_ci


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        verdict = "promote" if self.promote else "keep the champion"
        return f"**Decision: {verdict}**\n\n" + "\n".join(f"- {r}" for r in self.reasons) + "\n"


def paired_bootstrap_lower(
    challenger: Sequence[bool], reference: Sequence[bool], samples: int, seed: int
) -> float:
    """2.5th percentile of the mean per-example gain (challenger - reference) over resamples."""
    diffs = [int(a) - int(b) for a, b in zip(challenger, reference, strict=True)]
    return bootstrap_ci(diffs, samples, seed)[0]


@dataclass(frozen=True)
class LiveErrors:
    """One version's shadow answers: how many, and how many failed to give SQL that runs."""

    n: int
    errors: int

    @property
    def rate(self) -> float:
        return self.errors / self.n if self.n else 0.0


def live_errors(statuses: Sequence[str]) -> LiveErrors:
    """Execution-error rate of shadow answers by status (guard rejections count as errors:
    the user would have had no result either)."""
    return LiveErrors(len(statuses), sum(s in ("exec_error", "guard_rejected") for s in statuses))


def live_check(
    challenger: LiveErrors, champion: LiveErrors, cfg: RegistryConfig
) -> tuple[bool, str] | None:
    """The live-traffic check, or None while either side has too few shadow answers."""
    if min(challenger.n, champion.n) < cfg.live_min_rows:
        return None
    ok = challenger.rate <= champion.rate + cfg.live_error_tolerance
    return (
        ok,
        f"live execution-error rate {challenger.rate:.3f} ({challenger.n} shadow answers) vs "
        f"champion {champion.rate:.3f} ({champion.n}) (tolerance {cfg.live_error_tolerance})",
    )


def should_promote(
    challenger: dict,
    champion: dict | None,
    base: dict,
    cfg: RegistryConfig,
    paired: tuple[Sequence[bool], Sequence[bool]] | None = None,
    seed: int = 0,
    live: tuple[LiveErrors, LiveErrors] | None = None,
    real_schema: tuple[dict | None, dict | None] | None = None,
) -> Decision:
    """`paired`: (challenger, reference) execution verdicts on the same examples, or None when
    they were not scored on the same examples (the bootstrap check is then skipped). `live`:
    (challenger, champion) shadow answers on live traffic, or None when there are none.
    `real_schema`: (challenger, reference) `M` blocks on the real-schema set, either None
    where it was not scored."""
    ref, ref_name = (base, "base model") if champion is None else (champion, "champion")
    checks: list[tuple[bool, str]] = []

    ex, ref_ex = challenger["execution_accuracy"], ref["execution_accuracy"]
    delta = ex - ref_ex
    ok = delta > cfg.min_delta
    checks.append(
        (
            ok,
            f"execution accuracy {ex:.3f} vs {ref_name} {ref_ex:.3f}: {delta:+.3f} "
            f"({'>' if ok else '<='} min_delta {cfg.min_delta})",
        )
    )
    if paired is not None and len(paired[0]):
        lower = paired_bootstrap_lower(*paired, cfg.bootstrap_samples, seed)
        checks.append(
            (
                lower > 0,
                f"paired bootstrap on {len(paired[0])} examples: 95% lower bound of the gain "
                f"{lower:+.3f} ({'>' if lower > 0 else '<='} 0)",
            )
        )
    else:
        checks.append(
            (True, f"paired bootstrap skipped: not scored on the same examples as the {ref_name}")
        )

    ref_domains = ref.get("by_domain") or {}
    for domain, m in sorted((challenger.get("by_domain") or {}).items()):
        if domain in ref_domains:
            drop = ref_domains[domain]["execution_accuracy"] - m["execution_accuracy"]
            if drop > cfg.domain_tolerance:
                checks.append(
                    (False, f"domain {domain} regresses by {drop:.3f} (> {cfg.domain_tolerance})")
                )
    if not any(r.startswith("domain ") for _, r in checks):
        checks.append((True, f"no domain regresses by more than {cfg.domain_tolerance}"))

    valid = challenger.get("valid_sql_rate")
    if valid is not None:
        ok = valid >= cfg.min_valid_sql_rate
        checks.append(
            (ok, f"valid SQL rate {valid:.3f} ({'>=' if ok else '<'} {cfg.min_valid_sql_rate})")
        )

    judge, ref_judge = challenger.get("judge_accuracy"), ref.get("judge_accuracy")
    if judge is not None and ref_judge is not None:
        ok = judge >= ref_judge - cfg.judge_tolerance
        checks.append(
            (
                ok,
                f"judge accuracy {judge:.3f} vs {ref_name} {ref_judge:.3f} "
                f"(tolerance {cfg.judge_tolerance})",
            )
        )
    checks.append(real_schema_check(*(real_schema or (None, None)), ref_name, cfg))
    if live is not None and champion is not None and (check := live_check(*live, cfg)):
        checks.append(check)
    return Decision(all(ok for ok, _ in checks), [r for _, r in checks])


def real_schema_check(
    challenger: dict | None, reference: dict | None, ref_name: str, cfg: RegistryConfig
) -> tuple[bool, str]:
    """The real-schema figure in the decision: a drop beyond `real_schema_tolerance` refuses;
    without a figure on either side it is reported, not compared."""
    if challenger is None:
        return True, "real-schema set: not evaluated (data.real_schema empty)"
    ex = challenger["execution_accuracy"]
    if reference is None:
        return True, f"real-schema set: execution accuracy {ex:.3f} ({ref_name}: no figure)"
    ref_ex = reference["execution_accuracy"]
    ok = ex >= ref_ex - cfg.real_schema_tolerance
    return (
        ok,
        f"real-schema set: execution accuracy {ex:.3f} vs {ref_name} {ref_ex:.3f} "
        f"({'within' if ok else 'drops beyond'} tolerance {cfg.real_schema_tolerance})",
    )


def promoted_version(release: dict, champion_before: int | None) -> int | None:
    """The version a release made champion (`release`: {version, champion}), or None when the
    gate kept the champion it found."""
    if release["champion"] != release["version"] or release["version"] == champion_before:
        return None
    return release["version"]


def improved(before: float | None, after: float | None) -> bool:
    """Whether a retrained version beats the accuracy it replaced (`make demo`'s verdict);
    no accuracy before counts as 0."""
    return after is not None and after > (before or 0.0)
