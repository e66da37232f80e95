"""Question/SQL patterns with set operations: UNION of two conditions on one table, INTERSECT
of two child conditions over a parent ("both"), EXCEPT of a parent's rows that have a child
with a condition ("never").

Slots as in `patterns_join`: {p}/{ps} the parent, {ch}/{chs} the child, {pd} the parent's
naming column, {g} a category column, {v}/{w} two of its values, {c} a numeric column, {n} a
threshold. Used by `pipelines.data.synth`; the machinery is in `pipelines.data.patterns`.
"""

from __future__ import annotations

from pipelines.data.patterns import Draft, Label, Pattern, Sampler, lit, pattern
from pipelines.data.patterns_join import edge_join, edge_slots

SET_PATTERNS: list[Pattern] = []


@pattern(
    SET_PATTERNS,
    "hard",
    ko=(
        "{g:이} '{v}'이거나 {c:이} {n}보다 {hl} {t}의 {d:을} 보여줘",
        "{g:이} '{v}'인 {t:과} {c:이} {n}보다 {hl} {t}의 {d:을} 합쳐서 알려줘",
        "{c:이} {n}보다 {hl} {t} 또는 {g:이} '{v}'인 {t}의 {d} 목록을 보여줘",
    ),
    en=(
        "List the {d} of {ts} whose {g} is '{v}' or whose {c} is {hl} {n}.",
        "Show the {d} of {ts} with {g} '{v}', together with those with {c} {hl} {n}.",
        "Which {ts} either have {g} '{v}' or {c_a} {hl} {n}? Give their {d}.",
    ),
)
def union_of_conditions(s: Sampler) -> Draft | None:
    t = s.table("num", "cat")
    if t is None:
        return None
    c, g, d = s.col(t, "num"), s.col(t, "cat"), t.display
    v, n = s.value(t, g), s.quantile(t, c, 0.6, 0.9)
    op = s.rng.choice([">", "<"])
    hl = Label("큰", "above") if op == ">" else Label("작은", "below")
    sql = (
        f"SELECT {d.name} FROM {t.name} WHERE {g.name} = {lit(v)} "
        f"UNION SELECT {d.name} FROM {t.name} WHERE {c.name} {op} {lit(n)}"
    )
    return Draft(sql, s.slots(t, c=c, g=g, d=d, v=v, n=n, hl=hl), t.person)


@pattern(
    SET_PATTERNS,
    "extra",
    ko=(
        "{g:이} '{v}'인 {ch:과} '{w}'인 {ch:이} 모두 있는 {p}의 {pd:을} 보여줘",
        "'{v}' {ch:과} '{w}' {ch:을} 둘 다 가진 {p:을} 찾아 줘",
        "{ch} {g:이} '{v}'인 것과 '{w}'인 것이 모두 있는 {p} 목록을 알려줘",
    ),
    en=(
        "Which {ps} have both {chs} with {g} '{v}' and {chs} with {g} '{w}'?",
        "List the {pd} of {ps} that have {ch_a} of {g} '{v}' and also one of {g} '{w}'.",
        "Find {ps} with {chs} in both {g} '{v}' and '{w}'.",
    ),
)
def parents_with_both(s: Sampler) -> Draft | None:
    e = s.edge(child=lambda t: bool(t.cols("cat")))
    if e is None:
        return None
    g = s.col(e.child, "cat")
    values = s.distinct(e.child, g)
    if len(values) < 2:
        return None
    v, w = s.rng.sample(values, 2)
    frm, ca, pa = edge_join(e)
    pick = f"SELECT {pa}.{e.parent.display.name} {frm} WHERE {ca}.{g.name} = "
    sql = f"{pick}{lit(v)} INTERSECT {pick}{lit(w)}"
    return Draft(sql, edge_slots(s, e, g=s.label(e.child, g), v=v, w=w), e.parent.person)


@pattern(
    SET_PATTERNS,
    "extra",
    ko=(
        "{g:이} '{v}'인 {ch:이} 한 번도 없는 {p}의 {pd:을} 보여줘",
        "'{v}' {ch} 기록이 없는 {p:을} 모두 찾아 줘",
        "{ch} {g:이} '{v}'인 적이 없는 {p} 목록을 알려줘",
    ),
    en=(
        "Which {ps} have never had {ch_a} with {g} '{v}'?",
        "List the {pd} of {ps} without any {ch} of {g} '{v}'.",
        "Show all {ps} except those with {chs} whose {g} is '{v}'.",
    ),
)
def parents_except(s: Sampler) -> Draft | None:
    e = s.edge(child=lambda t: bool(t.cols("cat")))
    if e is None:
        return None
    g = s.col(e.child, "cat")
    v = s.value(e.child, g)
    frm, ca, pa = edge_join(e)
    p, pd = e.parent, e.parent.display
    sql = (
        f"SELECT {pd.name} FROM {p.name} EXCEPT "
        f"SELECT {pa}.{pd.name} {frm} WHERE {ca}.{g.name} = {lit(v)}"
    )
    return Draft(sql, edge_slots(s, e, g=s.label(e.child, g), v=v), p.person)
