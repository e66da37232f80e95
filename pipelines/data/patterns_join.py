"""Question/SQL patterns with joins or subqueries: scalar subqueries on one table, joins along
foreign keys, grouping over a parent, IN / NOT IN subqueries, two-join paths, and the "extra"
combinations (join + group + order + limit, ...).

Slots in templates (single-table ones as in `patterns_table`): {p} the parent table ({ps} plural,
{p_u} counter), {ch} the child table, {pd} the parent's naming column, {cc} a child column, {g} a
category column, {v} a value, {k} a count, {agg}/{aggn} aggregate words, {y} a year. For two
joins, {a} and {b} are the two parents of {ch}. Used by `pipelines.data.synth`; the machinery is
in `pipelines.data.patterns`.
"""

from __future__ import annotations

from collections import Counter

from pipelines.data.patterns import (
    AGGREGATES,
    Draft,
    Edge,
    Label,
    Pattern,
    Sampler,
    aliases,
    lit,
    pattern,
    pick_aggregate,
)

JOIN_PATTERNS: list[Pattern] = []


def edge_join(e: Edge) -> tuple[str, str, str]:
    """`child AS c JOIN parent AS p ON ...` and the two aliases."""
    ca, pa = aliases(e.child, e.parent)
    clause = (
        f"FROM {e.child.name} AS {ca} JOIN {e.parent.name} AS {pa} "
        f"ON {ca}.{e.fk.name} = {pa}.{e.parent.pk.name}"
    )
    return clause, ca, pa


def edge_slots(s: Sampler, e: Edge, **extra: object) -> dict[str, object]:
    return {"p": e.parent, "ch": e.child, "pd": s.label(e.parent, e.parent.display), **extra}


# --- medium --------------------------------------------------------------------------------------


@pattern(JOIN_PATTERNS, "medium",
    ko=("각 {ch}의 {cc:과} {p} {pd:을} 보여줘", "{ch}별 {cc:과} 해당 {p}의 {pd:을} 함께 알려줘",
        "{ch} {cc:과} 그 {ch}의 {p} {pd:을} 조회해 줘"),
    en=("Show the {cc} of each {ch} together with the {p}'s {pd}.",
        "List every {ch} with its {cc} and the {pd} of its {p}.",
        "For all {chs}, give the {cc} and the related {p} {pd}."))
def join_project(s: Sampler) -> Draft | None:
    e = s.edge(child=lambda t: bool(t.cols("num", "cat", "date")))
    if e is None:
        return None
    cc = s.col(e.child, "num", "cat", "date")
    frm, ca, pa = edge_join(e)
    sql = f"SELECT {ca}.{cc.name}, {pa}.{e.parent.display.name} {frm}"
    return Draft(sql, edge_slots(s, e, cc=s.label(e.child, cc)))


@pattern(JOIN_PATTERNS, "medium",
    ko=("{pd:이} '{v}'인 {p}의 {ch} {cc:을} 모두 보여줘", "'{v}' {p}의 {ch} {cc} 목록을 알려줘",
        "{p} '{v}'에 연결된 {ch}의 {cc:은} 뭐야?"),
    en=("Show the {cc} of {chs} for the {p} '{v}'.",
        "What are the {cc} values of the {chs} linked to {p} '{v}'?",
        "List the {ch} {cc} where the {p}'s {pd} is '{v}'."))
def join_where(s: Sampler) -> Draft | None:
    e = s.edge(child=lambda t: bool(t.cols("num", "cat", "date")),
               parent=lambda t: bool(t.cols("name")))
    if e is None:
        return None
    cc, pd = s.col(e.child, "num", "cat", "date"), e.parent.display
    # A parent that has children, so the answer is not empty (row i has primary key i + 1).
    parent_id = s.rng.choice(s.rows[e.child.name])[e.fk.name]
    v = s.rows[e.parent.name][parent_id - 1][pd.name]
    frm, ca, pa = edge_join(e)
    sql = f"SELECT {ca}.{cc.name} {frm} WHERE {pa}.{pd.name} = {lit(v)}"
    return Draft(sql, edge_slots(s, e, cc=s.label(e.child, cc), v=v))


# --- hard: subqueries and HAVING + ORDER BY on one table -----------------------------------------


@pattern(JOIN_PATTERNS, "hard",
    ko=("{c:이} 평균보다 {hl} {t}의 {d:을} 보여줘",
        "{t} 중 {c:이} 전체 평균보다 {hl} 것들의 {d:과} {c:을} 알려줘",
        "평균 {c}보다 {c:이} {hl} {t} 목록을 보여줘", "@{c:이} 평균보다 {hl} {t:은} 누구야?"),
    en=("Which {ts} have {c_a} {hl} the average?",
        "Show the {d} and {c} of {ts} whose {c} is {hl} the average {c}.",
        "List {ts} with {c} {hl} the overall average.",
        "@Who are the {ts} with {c_a} {hl} the average?"))
def above_average(s: Sampler) -> Draft | None:
    t = s.table("num")
    if t is None:
        return None
    c, d = s.col(t, "num"), t.display
    op = s.rng.choice([">", "<"])
    hl = Label("높은", "above") if op == ">" else Label("낮은", "below")
    sql = (
        f"SELECT {d.name}, {c.name} FROM {t.name} "
        f"WHERE {c.name} {op} (SELECT AVG({c.name}) FROM {t.name})"
    )
    return Draft(sql, s.slots(t, c=c, d=d, hl=hl), t.person)


@pattern(JOIN_PATTERNS, "hard",
    ko=("{c:이} 가장 {hl} {t}의 {d:을} 알려줘", "{c:이} {ext}인 {t:을} 찾아 줘",
        "{t} 중에서 {c:이} 제일 {hl} 건 뭐야?", "@{c:이} 가장 {hl} {t:은} 누구야?"),
    en=("Which {t} has the {hl} {c}?", "Find the {t} with the {ext} {c} and show its {d}.",
        "Show the {d} of the {t} whose {c} equals the {ext} {c}.",
        "@Who is the {t} with the {hl} {c}?"))
def extreme_row(s: Sampler) -> Draft | None:
    t = s.table("num")
    if t is None:
        return None
    c, d = s.col(t, "num"), t.display
    fn = s.rng.choice(["MAX", "MIN"])
    hl = Label("높은", "highest") if fn == "MAX" else Label("낮은", "lowest")
    sql = (
        f"SELECT {d.name}, {c.name} FROM {t.name} "
        f"WHERE {c.name} = (SELECT {fn}({c.name}) FROM {t.name})"
    )
    return Draft(sql, s.slots(t, c=c, d=d, hl=hl, ext=AGGREGATES[fn][1]), t.person)


@pattern(JOIN_PATTERNS, "hard",
    ko=("{t:이} {k}{t_u} 이상인 {g}별 평균 {c:을} 높은 순으로 보여줘",
        "{g}별 평균 {c:을} 구하되 {t:이} {k}{t_u} 이상인 {g}만 평균이 높은 순서로 보여줘",
        "{k}{t_u} 이상의 {t:을} 가진 {g}에 대해 평균 {c:을} 큰 것부터 나열해 줘"),
    en=("For each {g} with at least {k} {ts}, show the average {c}, highest first.",
        "List {g} values having {k} or more {ts} with their average {c}, sorted descending.",
        "Among {g} groups with at least {k} {ts}, rank them by average {c}."))
def group_having_order(s: Sampler) -> Draft | None:
    t = s.table("num", "cat")
    if t is None:
        return None
    c, g = s.col(t, "num"), s.col(t, "cat")
    k = s.min_group(Counter(s.values(t, g)))
    sql = (
        f"SELECT {g.name}, AVG({c.name}) FROM {t.name} GROUP BY {g.name} "
        f"HAVING COUNT(*) >= {k} ORDER BY AVG({c.name}) DESC"
    )
    return Draft(sql, s.slots(t, c=c, g=g, k=k))


# --- hard: along foreign keys --------------------------------------------------------------------


@pattern(JOIN_PATTERNS, "hard",
    ko=("{p}별 {ch} 수를 보여줘", "각 {p}의 {pd:과} {ch} 수를 알려줘",
        "{p}마다 {ch:이} 몇 {ch_u}인지 {pd:과} 함께 보여줘"),
    en=("How many {chs} does each {p} have?", "Count the {chs} per {p} and show the {p}'s {pd}.",
        "For each {p}, list its {pd} and number of {chs}."))
def join_group_count(s: Sampler) -> Draft | None:
    e = s.edge()
    if e is None:
        return None
    frm, _, pa = edge_join(e)
    sql = f"SELECT {pa}.{e.parent.display.name}, COUNT(*) {frm} GROUP BY {pa}.{e.parent.pk.name}"
    return Draft(sql, edge_slots(s, e))


@pattern(JOIN_PATTERNS, "hard",
    ko=("{p}별 {ch}의 {agg} {cc:을} 보여줘", "각 {p}의 {pd:과} {ch} {cc} {aggn:을} 알려줘",
        "{p}마다 {ch} {cc}의 {aggn:을} 구해 줘"),
    en=("What is the {agg} {ch} {cc} for each {p}?",
        "Show each {p}'s {pd} with the {agg} {cc} of its {chs}.",
        "For every {p}, compute the {agg} {cc} across its {chs}."))
def join_group_aggregate(s: Sampler) -> Draft | None:
    e = s.edge(child=lambda t: bool(t.cols("num")))
    if e is None:
        return None
    cc = s.col(e.child, "num")
    fn, agg, aggn = pick_aggregate(s, cc)
    frm, ca, pa = edge_join(e)
    sql = (
        f"SELECT {pa}.{e.parent.display.name}, {fn}({ca}.{cc.name}) {frm} "
        f"GROUP BY {pa}.{e.parent.pk.name}"
    )
    return Draft(sql, edge_slots(s, e, cc=s.label(e.child, cc), agg=agg, aggn=aggn))


@pattern(JOIN_PATTERNS, "hard",
    ko=("{p} {g}별 {ch}의 {agg} {cc:을} 알려줘", "{p}의 {g}마다 {ch} {cc}의 {aggn:을} 구해 줘",
        "{p} {g}에 따라 {ch} {cc} {aggn:을} 보여줘"),
    en=("What is the {agg} {ch} {cc} for each {p} {g}?",
        "Group {chs} by their {p}'s {g} and show the {agg} {cc}.",
        "For every {p} {g}, give the {agg} {cc} of the related {chs}."))
def join_category_aggregate(s: Sampler) -> Draft | None:
    e = s.edge(child=lambda t: bool(t.cols("num")), parent=lambda t: bool(t.cols("cat")))
    if e is None:
        return None
    cc, g = s.col(e.child, "num"), s.col(e.parent, "cat")
    fn, agg, aggn = pick_aggregate(s, cc, ("AVG", "SUM", "MAX"))
    frm, ca, pa = edge_join(e)
    sql = f"SELECT {pa}.{g.name}, {fn}({ca}.{cc.name}) {frm} GROUP BY {pa}.{g.name}"
    slots = edge_slots(s, e, cc=s.label(e.child, cc), g=s.label(e.parent, g), agg=agg, aggn=aggn)
    return Draft(sql, slots)


@pattern(JOIN_PATTERNS, "hard",
    ko=("{g:이} '{v}'인 {ch:이} 있는 {p}의 {pd:을} 보여줘",
        "'{v}' {g}의 {ch} 기록이 있는 {p:을} 찾아 줘",
        "{ch} 중 {g:이} '{v}'인 것과 연결된 {p} 목록을 알려줘"),
    en=("Show the {pd} of {ps} that have {ch_a} with {g} '{v}'.",
        "Which {ps} have at least one {ch} whose {g} is '{v}'?",
        "Find {ps} linked to {chs} with {g_a} of '{v}'."))
def parent_in_subquery(s: Sampler) -> Draft | None:
    e = s.edge(child=lambda t: bool(t.cols("cat")))
    if e is None:
        return None
    g = s.col(e.child, "cat")
    v = s.value(e.child, g)
    p = e.parent
    sql = (
        f"SELECT {p.display.name} FROM {p.name} WHERE {p.pk.name} IN "
        f"(SELECT {e.fk.name} FROM {e.child.name} WHERE {g.name} = {lit(v)})"
    )
    return Draft(sql, edge_slots(s, e, g=s.label(e.child, g), v=v), p.person)


@pattern(JOIN_PATTERNS, "hard",
    ko=("{ch:이} 하나도 없는 {p}의 {pd:을} 보여줘", "{ch} 기록이 없는 {p:을} 찾아 줘",
        "한 번도 {ch}에 나오지 않은 {p} 목록을 알려줘"),
    en=("Which {ps} have no {chs}?", "List the {pd} of {ps} without any {ch}.",
        "Find {ps} that never appear in the {chs} table."))
def parent_without_child(s: Sampler) -> Draft | None:
    e = s.edge()
    if e is None:
        return None
    p = e.parent
    sql = (
        f"SELECT {p.display.name} FROM {p.name} WHERE {p.pk.name} NOT IN "
        f"(SELECT {e.fk.name} FROM {e.child.name})"
    )
    return Draft(sql, edge_slots(s, e), p.person)


@pattern(JOIN_PATTERNS, "hard",
    ko=("{ch:이} {k}{ch_u} 이상인 {p}의 {pd:을} 보여줘",
        "{ch} 기록이 {k}{ch_u} 이상 있는 {p:을} 찾아 줘",
        "{k}{ch_u} 이상의 {ch:을} 가진 {p} 목록을 알려줘"),
    en=("Which {ps} have at least {k} {chs}?", "List the {pd} of {ps} with {k} or more {chs}.",
        "Find {ps} that appear in at least {k} {chs}."))
def parent_with_many(s: Sampler) -> Draft | None:
    e = s.edge()
    if e is None:
        return None
    p = e.parent
    k = s.min_group(Counter(r[e.fk.name] for r in s.rows[e.child.name]))
    sql = (
        f"SELECT {p.display.name} FROM {p.name} WHERE {p.pk.name} IN "
        f"(SELECT {e.fk.name} FROM {e.child.name} GROUP BY {e.fk.name} "
        f"HAVING COUNT(*) >= {k})"
    )
    return Draft(sql, edge_slots(s, e, k=k), p.person)


def _two_parents(s: Sampler) -> tuple | None:
    """A child with two foreign keys, joined to both parents a and b, and a value of a category
    of a: (FROM clause, alias of a, alias of b, a, b, the category, its value, slots)."""
    t = s.table("fk", "fk")
    if t is None:
        return None
    fa, fb = s.rng.sample(t.cols("fk"), 2)
    a, b = s.domain.table(fa.ref), s.domain.table(fb.ref)
    if not a.cols("cat"):
        fa, fb, a, b = fb, fa, b, a
        if not a.cols("cat"):
            return None
    ca, aa, ba = aliases(t, a, b)
    frm = (
        f"FROM {t.name} AS {ca} JOIN {a.name} AS {aa} ON {ca}.{fa.name} = {aa}.{a.pk.name} "
        f"JOIN {b.name} AS {ba} ON {ca}.{fb.name} = {ba}.{b.pk.name}"
    )
    g = s.col(a, "cat")
    v = s.value(a, g)
    slots = {"ch": t, "a": a, "b": b, "ag": s.label(a, g), "bd": s.label(b, b.display), "v": v}
    return frm, aa, ba, a, b, g, v, slots


@pattern(JOIN_PATTERNS, "hard",
    ko=("{a} {ag:이} '{v}'인 {ch} 기록이 있는 {b}의 {bd:을} 중복 없이 보여줘",
        "{ag:이} '{v}'인 {a}의 {ch:이} 있는 {b:을} 모두 찾아 줘",
        "{ag:이} '{v}'인 {a:과} 관련된 {ch:이} 있는 {b} 목록을 알려줘"),
    en=("Which {bs} have {ch_a} of {a_a} whose {ag} is '{v}'?",
        "List the distinct {bd} of {bs} with {chs} involving {as} of {ag} '{v}'.",
        "Show {bs} linked through {chs} to {a_a} with {ag} '{v}'."))
def two_joins_where(s: Sampler) -> Draft | None:
    found = _two_parents(s)
    if found is None:
        return None
    frm, aa, ba, a, b, g, v, slots = found
    sql = f"SELECT DISTINCT {ba}.{b.display.name} {frm} WHERE {aa}.{g.name} = {lit(v)}"
    return Draft(sql, slots, b.person)


# --- extra ---------------------------------------------------------------------------------------


@pattern(JOIN_PATTERNS, "extra",
    ko=("{ch:이} 가장 많은 {p} {k}{p_u:을} 보여줘",
        "{ch} 수 기준 상위 {k}{p_u} {p}의 {pd:과} {ch} 수를 알려줘",
        "{ch:을} 가장 많이 가진 {p} {k}{p_u}의 {pd:은} 뭐야?",
        "@{ch:이} 가장 많은 {p} {k}{p_u:은} 누구야?"),
    en=("Which {k} {ps} have the most {chs}?",
        "Show the top {k} {ps} by number of {chs}, with their {pd}.",
        "List the {pd} and {ch} count of the {k} {ps} with the most {chs}.",
        "@Who are the {k} {ps} with the most {chs}?"))
def top_parents_by_count(s: Sampler) -> Draft | None:
    e = s.edge()
    if e is None:
        return None
    k = s.rng.choice([3, 5])
    frm, _, pa = edge_join(e)
    sql = (
        f"SELECT {pa}.{e.parent.display.name}, COUNT(*) {frm} GROUP BY {pa}.{e.parent.pk.name} "
        f"ORDER BY COUNT(*) DESC LIMIT {k}"
    )
    return Draft(sql, edge_slots(s, e, k=k), e.parent.person)


@pattern(JOIN_PATTERNS, "extra",
    ko=("{y}년 {ch} {cc} 합계가 가장 큰 {p} {k}{p_u:을} 보여줘",
        "{dc:이} {y}년인 {ch}만 놓고 {cc} 합계 상위 {k}{p_u} {p}의 {pd:을} 알려줘",
        "{y}년 기준으로 {ch} {cc:이} 가장 많은 {p} {k}{p_u:과} 그 합계를 보여줘"),
    en=("Which {k} {ps} had the largest total {ch} {cc} in {y}?",
        "Show the top {k} {ps} by total {cc} of their {chs} with {dc_a} in {y}.",
        "For {chs} in {y}, list the {k} {ps} with the highest summed {cc}."))
def top_parents_in_year(s: Sampler) -> Draft | None:
    e = s.edge(child=lambda t: any(c.summable for c in t.cols("num")) and bool(t.cols("date")))
    if e is None:
        return None
    cc = s.rng.choice([c for c in e.child.cols("num") if c.summable])
    dc = s.col(e.child, "date", nullable=False)
    if dc is None:
        return None
    y, k = s.year(e.child, dc), s.rng.choice([3, 5])
    frm, ca, pa = edge_join(e)
    sql = (
        f"SELECT {pa}.{e.parent.display.name}, SUM({ca}.{cc.name}) {frm} "
        f"WHERE {ca}.{dc.name} >= '{y}-01-01' AND {ca}.{dc.name} < '{y + 1}-01-01' "
        f"GROUP BY {pa}.{e.parent.pk.name} ORDER BY SUM({ca}.{cc.name}) DESC LIMIT {k}"
    )
    slots = edge_slots(s, e, cc=s.label(e.child, cc), dc=s.label(e.child, dc), y=y, k=k)
    return Draft(sql, slots, e.parent.person)


@pattern(JOIN_PATTERNS, "extra",
    ko=("{ch:이} {k}{ch_u} 이상인 {p}의 {pd}, {ch} 수, 평균 {cc:을} 평균이 높은 순으로 보여줘",
        "{ch:을} {k}{ch_u} 이상 가진 {p:을} {ch} 수와 평균 {cc:과} 함께 평균이 큰 순서대로 알려줘",
        "{p}별 {ch} 수와 평균 {cc:을} 구해서 {ch:이} {k}{ch_u} 이상인 경우만 "
        "평균 내림차순으로 보여줘"),
    en=("For {ps} with at least {k} {chs}, show the {pd}, the count and the average {cc}, "
        "highest average first.",
        "List {ps} having {k} or more {chs} with the count and average {ch} {cc}, "
        "ranked by that average.",
        "Which {ps} have at least {k} {chs}? Show their {ch} count and average {cc}, "
        "sorted by the average in descending order."))
def parents_having_order(s: Sampler) -> Draft | None:
    e = s.edge(child=lambda t: bool(t.cols("num")))
    if e is None:
        return None
    cc = s.col(e.child, "num")
    k = s.min_group(Counter(r[e.fk.name] for r in s.rows[e.child.name]))
    frm, ca, pa = edge_join(e)
    sql = (
        f"SELECT {pa}.{e.parent.display.name}, COUNT(*), AVG({ca}.{cc.name}) {frm} "
        f"GROUP BY {pa}.{e.parent.pk.name} HAVING COUNT(*) >= {k} "
        f"ORDER BY AVG({ca}.{cc.name}) DESC"
    )
    return Draft(sql, edge_slots(s, e, cc=s.label(e.child, cc), k=k))


@pattern(JOIN_PATTERNS, "extra",
    ko=("{cc:이} 평균보다 큰 {ch:이} 있는 {p}의 {pd:을} 중복 없이 보여줘",
        "평균 {cc}보다 {cc:이} 높은 {ch} 기록을 가진 {p} 목록을 알려줘",
        "{ch} 중 {cc:이} 전체 평균을 넘는 것이 있는 {p:을} 찾아 줘"),
    en=("Which {ps} have {ch_a} with {cc} above the average?",
        "List the distinct {pd} of {ps} that have {ch_a} with an above-average {cc}.",
        "Find {ps} with at least one {ch} whose {cc} exceeds the average {ch} {cc}."))
def parents_above_average(s: Sampler) -> Draft | None:
    e = s.edge(child=lambda t: bool(t.cols("num")))
    if e is None:
        return None
    cc = s.col(e.child, "num")
    frm, ca, pa = edge_join(e)
    sql = (
        f"SELECT DISTINCT {pa}.{e.parent.display.name} {frm} "
        f"WHERE {ca}.{cc.name} > (SELECT AVG({cc.name}) FROM {e.child.name})"
    )
    return Draft(sql, edge_slots(s, e, cc=s.label(e.child, cc)), e.parent.person)


@pattern(JOIN_PATTERNS, "extra",
    ko=("{ag:이} '{v}'인 {a}에 대한 {ch:이} 가장 많은 {b} {k}{b_u:을} 보여줘",
        "'{v}' {a} 관련 {ch} 수 기준 상위 {k}{b_u} {b}의 {bd:을} 알려줘",
        "{b}별로 {ag:이} '{v}'인 {a}의 {ch} 수를 세서 많은 순으로 {k}{b_u}만 보여줘"),
    en=("Which {k} {bs} have the most {chs} of {as} with {ag} '{v}'?",
        "Show the top {k} {bs} by number of {chs} involving {a_a} whose {ag} is '{v}'.",
        "Count the {chs} of '{v}' {as} per {b} and list the top {k}."))
def two_joins_top(s: Sampler) -> Draft | None:
    found = _two_parents(s)
    if found is None:
        return None
    frm, aa, ba, a, b, g, v, slots = found
    k = s.rng.choice([3, 5])
    sql = (
        f"SELECT {ba}.{b.display.name}, COUNT(*) {frm} WHERE {aa}.{g.name} = {lit(v)} "
        f"GROUP BY {ba}.{b.pk.name} ORDER BY COUNT(*) DESC LIMIT {k}"
    )
    return Draft(sql, {**slots, "k": k}, b.person)
