"""The promotion decision: a pure function of the challenger's, champion's and base metrics.

Inputs are `M` blocks of metrics/eval.json. The first model is promoted when it beats the base
model; later ones when they beat the current champion by more than `min_delta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        verdict = "promote" if self.promote else "keep the champion"
        return f"**Decision: {verdict}**\n\n" + "\n".join(f"- {r}" for r in self.reasons) + "\n"


def should_promote(
    challenger: dict, champion: dict | None, base: dict, min_delta: float
) -> Decision:
    ex = challenger["execution_accuracy"]
    if champion is None:
        ref, ref_name = base["execution_accuracy"], "base model"
    else:
        ref, ref_name = champion["execution_accuracy"], "champion"
    delta = ex - ref
    ok = delta > min_delta
    reason = (
        f"execution accuracy {ex:.3f} vs {ref_name} {ref:.3f}: "
        f"{'+' if delta >= 0 else ''}{delta:.3f} ({'>' if ok else '<='} min_delta {min_delta})"
    )
    return Decision(ok, [reason])
