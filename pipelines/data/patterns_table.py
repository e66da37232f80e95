"""Question/SQL patterns over a single table: projection, filters, aggregates, grouping, ordering,
date ranges and scalar subqueries. Each pattern has at least three paraphrases per language.

Slots in templates: {t} the table's thing ({ts} English plural, {t_u} Korean counter word),
{d} the column that names a row, {c}/{g} columns, {v}/{a}/{b}/{x} values, {k} a count,
{agg}/{aggn} aggregate adjective/noun, {op} a comparison, {hl} an extreme ("높은", "most recent").
Used by `pipelines.data.synth`; see `pipelines.data.patterns` for the machinery.
"""

from __future__ import annotations

from collections import Counter

from pipelines.data.patterns import (
    COMPARISONS,
    MONTHS_EN,
    Draft,
    Label,
    Pattern,
    Sampler,
    extreme,
    joined,
    lit,
    particle,
    pattern,
    pick_aggregate,
)

TABLE_PATTERNS: list[Pattern] = []


# --- easy ----------------------------------------------------------------------------------------


@pattern(TABLE_PATTERNS, "easy",
    ko=("모든 {t} 정보를 조회해 줘", "{t} 테이블의 데이터를 전부 보여줘",
        "등록된 {t} 목록을 모든 항목과 함께 보여 줄래?", "{t} 전체 정보가 필요해"),
    en=("Show all information about every {t}.", "List everything in the {ts} table.",
        "Give me all the {ts} with every detail.", "I need the full {t} data."))
def all_rows(s: Sampler) -> Draft | None:
    t = s.table()
    return Draft(f"SELECT * FROM {t.name}", s.slots(t), t.person)


@pattern(TABLE_PATTERNS, "easy",
    ko=("모든 {t}의 {cols:을} 보여줘",
        "{t}별 {cols:을} 조회해 줘",
        "각 {t}의 {cols} 목록을 알려줘"),
    en=("Show the {cols} of every {t}.", "List each {t}'s {cols}.",
        "What are the {cols} of all {ts}?"))
def project(s: Sampler) -> Draft | None:
    t = s.table()
    d = t.display
    c = s.col(t, "name", "text", "cat", "num", "date", exclude=(d,))
    if c is None:
        return None
    cols = joined(s.label(t, d), s.label(t, c))
    return Draft(f"SELECT {d.name}, {c.name} FROM {t.name}", s.slots(t, cols=cols), t.person)


@pattern(TABLE_PATTERNS, "easy",
    ko=("{c:이} '{v}'인 {t}의 {d:을} 모두 보여줘", "{c} '{v}'에 해당하는 {t} {d} 목록을 알려줘",
        "{c:이} '{v}'인 {t}에는 어떤 것들이 있어? {d:으로} 보여줘",
        "@{c:이} '{v}'인 {t:은} 누구야?"),
    en=("Which {ts} have {c} '{v}'? Show their {d}.", "List the {d} of {ts} whose {c} is '{v}'.",
        "Show the {d} for every {t} with {c_a} of '{v}'.",
        "@Who are the {ts} with {c} '{v}'?"))
def where_eq(s: Sampler) -> Draft | None:
    t = s.table("cat")
    if t is None:
        return None
    c, d = s.col(t, "cat"), t.display
    v = s.value(t, c)
    sql = f"SELECT {d.name} FROM {t.name} WHERE {c.name} = {lit(v)}"
    return Draft(sql, s.slots(t, c=c, d=d, v=v), t.person)


@pattern(TABLE_PATTERNS, "easy",
    ko=("{c:이} {v}{op} {t}의 {d:과} {c:을} 보여줘", "{c:이} {v}{op} {t:을} 찾아 줘",
        "{t} 중 {c:이} {v}{op} 경우의 {d:과} {c} 목록을 알려줘"),
    en=("Show the {d} and {c} of {ts} whose {c} is {op} {v}.", "Which {ts} have {c} {op} {v}?",
        "Find every {t} with {c} {op} {v} and list its {d} and {c}."))
def where_cmp(s: Sampler) -> Draft | None:
    t = s.table("num")
    if t is None:
        return None
    c, d = s.col(t, "num"), t.display
    op = s.rng.choice(list(COMPARISONS))
    v = s.quantile(t, c)
    sql = f"SELECT {d.name}, {c.name} FROM {t.name} WHERE {c.name} {op} {lit(v)}"
    return Draft(sql, s.slots(t, c=c, d=d, v=v, op=COMPARISONS[op]), t.person)


@pattern(TABLE_PATTERNS, "easy",
    ko=("{c:이} {a}에서 {b} 사이인 {t}의 {d:을} 알려줘", "{c:이} {a} 이상 {b} 이하인 {t:을} 보여줘",
        "{c:이} {a}부터 {b}까지인 {t}의 {d:과} {c:을} 조회해 줘"),
    en=("Which {ts} have {c_a} between {a} and {b}?",
        "List the {d} and {c} of {ts} with {c} from {a} to {b}.",
        "Show {ts} whose {c} is between {a} and {b}, inclusive."))
def where_between(s: Sampler) -> Draft | None:
    t = s.table("num")
    if t is None:
        return None
    c, d = s.col(t, "num"), t.display
    a, b = s.quantile(t, c, 0.1, 0.45), s.quantile(t, c, 0.55, 0.9)
    if a == b or (a, b) == (s.values(t, c)[0], s.values(t, c)[-1]):
        return None  # a range that selects everything is not a filter
    sql = f"SELECT {d.name}, {c.name} FROM {t.name} WHERE {c.name} BETWEEN {lit(a)} AND {lit(b)}"
    return Draft(sql, s.slots(t, c=c, d=d, a=a, b=b), t.person)


@pattern(TABLE_PATTERNS, "easy",
    ko=("{c:이} '{a}' 또는 '{b}'인 {t}의 {d:을} 보여줘",
        "{c:이} '{a}'나 '{b}'인 {t:을} 모두 찾아 줘",
        "{c} 값이 '{a}', '{b}' 중 하나인 {t} 목록을 알려줘"),
    en=("Show the {d} of {ts} whose {c} is '{a}' or '{b}'.",
        "Which {ts} have {c_a} of either '{a}' or '{b}'?",
        "List all {ts} where the {c} is one of '{a}' and '{b}'."))
def where_in(s: Sampler) -> Draft | None:
    t = s.table("cat")
    if t is None:
        return None
    c, d = s.col(t, "cat"), t.display
    options = s.distinct(t, c)
    if len(options) < 3:
        return None
    a, b = sorted(s.rng.sample(options, 2))
    sql = f"SELECT {d.name}, {c.name} FROM {t.name} WHERE {c.name} IN ({lit(a)}, {lit(b)})"
    return Draft(sql, s.slots(t, c=c, d=d, a=a, b=b), t.person)


@pattern(TABLE_PATTERNS, "easy",
    ko=("{d:이} {how} {t:을} 찾아 줘", "{d:이} {how} {t} 목록을 보여줘",
        "{t} 중 {d:이} {how} 것만 알려줘", "@{d:이} {how} {t:은} 누구야?"),
    en=("Find {ts} whose {d} {how}.", "Which {ts} have {d_a} that {how}?",
        "List every {t} whose {d} {how}.", "@Who are the {ts} whose {d} {how}?"))
def where_like(s: Sampler) -> Draft | None:
    t = s.table("name")
    if t is None:
        return None
    d = t.cols("name")[0]
    v = str(s.value(t, d))
    words = [w for w in v.split() if len(w) > 1 and w.isalpha()] if " " in v else []
    if words and s.rng.random() < 0.6:
        x = s.rng.choice(words)
        how = Label(f"'{x}'{particle(x, '을')} 포함하는", f"contains '{x}'")
        like = f"%{x}%"
    else:
        x = v[:1] if "가" <= v[:1] <= "힣" else v[:2]
        if not x.isalpha():
            return None
        how = Label(f"'{x}'{particle(x, '으로')} 시작하는", f"starts with '{x}'")
        like = f"{x}%"
    sql = f"SELECT {d.name} FROM {t.name} WHERE {d.name} LIKE {lit(like)}"
    return Draft(sql, s.slots(t, d=d, how=how), t.person)


@pattern(TABLE_PATTERNS, "easy",
    ko=("{c:이} {state} {t:을} 찾아 줘", "{c:이} {state} {t}의 {d:을} 보여줘",
        "{t} 중에서 {c:이} {state} 경우를 모두 알려줘"),
    en=("Which {ts} have their {c} {state}?", "Show the {d} of {ts} whose {c} is {state}.",
        "List every {t} with the {c} {state}."))
def where_null(s: Sampler) -> Draft | None:
    roles = ("text", "cat", "num", "date")  # a table whose only NULLs are in other roles is skipped
    t = s.table(pred=lambda t: any(c.null > 0 for c in t.cols(*roles)))
    if t is None:
        return None
    c, d = s.col(t, *roles, nullable=True), t.display
    missing = s.rng.random() < 0.5
    state = Label("비어 있는", "missing") if missing else Label("입력되어 있는", "filled in")
    cond = "IS NULL" if missing else "IS NOT NULL"
    sql = f"SELECT {d.name} FROM {t.name} WHERE {c.name} {cond}"
    return Draft(sql, s.slots(t, c=c, d=d, state=state), t.person)


@pattern(TABLE_PATTERNS, "easy",
    ko=("{c:이} {when}인 {t}의 {d:을} 모두 보여줘", "{c:이} {when}인 {t} 목록을 알려줘",
        "{c} 기준으로 {when}의 {t:을} 찾아 줘"),
    en=("Show the {d} of {ts} whose {c} is {when}.", "Which {ts} have {c_a} {when}?",
        "List the {ts} with {c_a} {when}."))
def date_cmp(s: Sampler) -> Draft | None:
    t = s.table("date")
    if t is None:
        return None
    c, d = s.col(t, "date"), t.display
    years = sorted({int(str(v)[:4]) for v in s.values(t, c)})
    if len(years) < 2:
        return None
    y = s.rng.choice(years[1:])
    if s.rng.random() < 0.5:
        op, when = ">=", Label(f"{y}년 이후", f"in {y} or later")
    else:
        op, when = "<", Label(f"{y}년 이전", f"before {y}")
    sql = f"SELECT {d.name}, {c.name} FROM {t.name} WHERE {c.name} {op} '{y}-01-01'"
    return Draft(sql, s.slots(t, c=c, d=d, when=when), t.person)


@pattern(TABLE_PATTERNS, "easy",
    ko=("{t}의 {c}에는 어떤 값들이 있어?", "{t} 테이블의 {c:을} 중복 없이 보여줘",
        "서로 다른 {t} {c} 목록을 알려줘"),
    en=("What different {c} values do the {ts} have?",
        "List the distinct {c} values in the {ts} table.",
        "Show each {c} that appears among the {ts}, without duplicates."))
def distinct(s: Sampler) -> Draft | None:
    t = s.table("cat")
    if t is None:
        return None
    c = s.col(t, "cat")
    return Draft(f"SELECT DISTINCT {c.name} FROM {t.name}", s.slots(t, c=c))


@pattern(TABLE_PATTERNS, "easy",
    ko=("{t:은} 모두 몇 {t_u:이야}?",
        "전체 {t} 수를 알려줘",
        "등록된 {t:이} 총 몇 {t_u}인지 세어 줘"),
    en=("How many {ts} are there?", "Count all {ts}.",
        "What is the total number of {ts}?"))
def count_all(s: Sampler) -> Draft | None:
    t = s.table()
    return Draft(f"SELECT COUNT(*) FROM {t.name}", s.slots(t))


# --- medium --------------------------------------------------------------------------------------


@pattern(TABLE_PATTERNS, "medium",
    ko=("{t}의 {agg} {c:은} 얼마야?",
        "{t} {c}의 {aggn:을} 구해 줘",
        "전체 {t}의 {agg} {c:을} 알려줘"),
    en=("What is the {agg} {c} of all {ts}?", "Compute the {agg} {c} across {ts}.",
        "Tell me the {agg} {c} among the {ts}."))
def aggregate(s: Sampler) -> Draft | None:
    t = s.table("num")
    if t is None:
        return None
    c = s.col(t, "num")
    fn, agg, aggn = pick_aggregate(s, c)
    return Draft(f"SELECT {fn}({c.name}) FROM {t.name}", s.slots(t, c=c, agg=agg, aggn=aggn))


@pattern(TABLE_PATTERNS, "medium",
    ko=("{g:이} '{v}'인 {t}의 {agg} {c:은} 얼마야?", "{g} '{v}' {t}의 {c} {aggn:을} 구해 줘",
        "{g:이} '{v}'인 {t:을} 대상으로 {agg} {c:을} 알려줘"),
    en=("What is the {agg} {c} of {ts} whose {g} is '{v}'?",
        "Compute the {agg} {c} for {ts} with {g} '{v}'.",
        "Among {ts} with {g_a} of '{v}', what is the {agg} {c}?"))
def aggregate_where(s: Sampler) -> Draft | None:
    t = s.table("num", "cat")
    if t is None:
        return None
    c, g = s.col(t, "num"), s.col(t, "cat")
    v = s.value(t, g)
    fn, agg, aggn = pick_aggregate(s, c)
    sql = f"SELECT {fn}({c.name}) FROM {t.name} WHERE {g.name} = {lit(v)}"
    return Draft(sql, s.slots(t, c=c, g=g, v=v, agg=agg, aggn=aggn))


@pattern(TABLE_PATTERNS, "medium",
    ko=("{g:이} '{v}'인 {t:은} 몇 {t_u:이야}?", "{g} '{v}'에 해당하는 {t} 수를 알려줘",
        "{g:이} '{v}'인 {t:이} 몇 {t_u}인지 세어 줘"),
    en=("How many {ts} have {g} '{v}'?", "Count the {ts} whose {g} is '{v}'.",
        "What is the number of {ts} with {g_a} of '{v}'?"))
def count_where(s: Sampler) -> Draft | None:
    t = s.table("cat")
    if t is None:
        return None
    g = s.col(t, "cat")
    v = s.value(t, g)
    sql = f"SELECT COUNT(*) FROM {t.name} WHERE {g.name} = {lit(v)}"
    return Draft(sql, s.slots(t, g=g, v=v))


@pattern(TABLE_PATTERNS, "medium",
    ko=("{g:이} '{v}'이고 {c:이} {x}{op} {t}의 {d:을} 보여줘",
        "{g} '{v}' {t} 중에서 {c:이} {x}{op} 것을 찾아 줘",
        "{c:이} {x}{op} '{v}' {g}의 {t} 목록을 알려줘"),
    en=("Show the {d} of {ts} with {g} '{v}' and {c} {op} {x}.",
        "Which {ts} have {g_a} of '{v}' and {c_a} {op} {x}?",
        "List {ts} whose {g} is '{v}' and whose {c} is {op} {x}."))
def where_and(s: Sampler) -> Draft | None:
    t = s.table("num", "cat")
    if t is None:
        return None
    c, g, d = s.col(t, "num"), s.col(t, "cat"), t.display
    rows = [r for r in s.rows[t.name] if r[c.name] is not None and r[g.name]]
    if not rows:
        return None
    row = s.rng.choice(rows)
    op = s.rng.choice([">=", "<="])
    v, x = row[g.name], row[c.name]
    sql = f"SELECT {d.name} FROM {t.name} WHERE {g.name} = {lit(v)} AND {c.name} {op} {lit(x)}"
    return Draft(sql, s.slots(t, c=c, g=g, d=d, v=v, x=x, op=COMPARISONS[op]))


@pattern(TABLE_PATTERNS, "medium",
    ko=("{g}별 {t} 수를 알려줘", "{g}마다 {t:이} 몇 {t_u}인지 보여줘",
        "{t:을} {g} 기준으로 묶어서 개수를 세어 줘"),
    en=("How many {ts} are there for each {g}?", "Count the {ts} by {g}.",
        "Show the number of {ts} per {g}."))
def group_count(s: Sampler) -> Draft | None:
    t = s.table("cat")
    if t is None:
        return None
    g = s.col(t, "cat")
    sql = f"SELECT {g.name}, COUNT(*) FROM {t.name} GROUP BY {g.name}"
    return Draft(sql, s.slots(t, g=g))


@pattern(TABLE_PATTERNS, "medium",
    ko=("{g}별 {t}의 {agg} {c:을} 보여줘", "{g}마다 {agg} {c:이} 얼마인지 알려줘",
        "{t} {c}의 {aggn:을} {g}별로 구해 줘"),
    en=("What is the {agg} {c} of {ts} for each {g}?", "Show the {agg} {c} per {g}.",
        "For every {g}, give the {agg} {c} of its {ts}."))
def group_aggregate(s: Sampler) -> Draft | None:
    t = s.table("num", "cat")
    if t is None:
        return None
    c, g = s.col(t, "num"), s.col(t, "cat")
    fn, agg, aggn = pick_aggregate(s, c)
    sql = f"SELECT {g.name}, {fn}({c.name}) FROM {t.name} GROUP BY {g.name}"
    return Draft(sql, s.slots(t, c=c, g=g, agg=agg, aggn=aggn))


@pattern(TABLE_PATTERNS, "medium",
    ko=("{t:이} {k}{t_u} 이상인 {g:과} 그 수를 보여줘",
        "{g}별로 {t} 수를 세고 {k}{t_u} 이상인 것만 알려줘",
        "{t:을} {k}{t_u} 이상 가진 {g:은} 뭐야?"),
    en=("Which {g} values have at least {k} {ts}? Show the counts.",
        "Count {ts} per {g} and keep only those with {k} or more.",
        "List each {g} with {k} or more {ts}, along with the number."))
def group_having(s: Sampler) -> Draft | None:
    t = s.table("cat")
    if t is None:
        return None
    g = s.col(t, "cat")
    k = s.min_group(Counter(s.values(t, g)))
    sql = f"SELECT {g.name}, COUNT(*) FROM {t.name} GROUP BY {g.name} HAVING COUNT(*) >= {k}"
    return Draft(sql, s.slots(t, g=g, k=k))


@pattern(TABLE_PATTERNS, "medium",
    ko=("{c:이} 가장 {hl} {t} {k}{t_u:을} 보여줘",
        "{c:이} {hl} 순으로 {t} {k}{t_u}의 {d:과} {c:을} 알려줘",
        "{t} 중 {c:이} 가장 {hl} {k}{t_u}의 {d:을} 뽑아 줘",
        "@{c:이} 가장 {hl} {t} {k}{t_u:은} 누구야?"),
    en=("Which {k} {ts} have the {hl} {c}?", "Show the {k} {ts} with the {hl} {c}.",
        "List the {d} and {c} of the {k} {ts} with the {hl} {c}.",
        "@Who are the {k} {ts} with the {hl} {c}?"))
def order_limit(s: Sampler) -> Draft | None:
    t = s.table(pred=lambda t: any(c.null == 0 for c in t.cols("num", "date")))
    if t is None:
        return None
    c, d = s.col(t, "num", "date", nullable=False), t.display
    desc = s.rng.random() < 0.6
    hl = extreme(c, desc)
    k = s.rng.choice([3, 5, 10])
    sql = f"SELECT {d.name}, {c.name} FROM {t.name} ORDER BY {c.name} {'DESC' if desc else 'ASC'}"
    return Draft(f"{sql} LIMIT {k}", s.slots(t, c=c, d=d, hl=hl, k=k), t.person)


@pattern(TABLE_PATTERNS, "medium",
    ko=("{c:이} {y}년인 {t:은} 몇 {t_u:이야}?", "{y}년 {c} 기준 {t} 수를 세어 줘",
        "{c:이} {y}년에 속하는 {t:이} 모두 몇 {t_u}인지 알려줘"),
    en=("How many {ts} have {c_a} in {y}?", "Count the {ts} whose {c} falls in {y}.",
        "What is the number of {ts} with {c_a} during {y}?"))
def date_year_count(s: Sampler) -> Draft | None:
    t = s.table("date")
    if t is None:
        return None
    c = s.col(t, "date")
    y = s.year(t, c)
    sql = (
        f"SELECT COUNT(*) FROM {t.name} "
        f"WHERE {c.name} >= '{y}-01-01' AND {c.name} < '{y + 1}-01-01'"
    )
    return Draft(sql, s.slots(t, c=c, y=y))


@pattern(TABLE_PATTERNS, "medium",
    ko=("{c:이} {y}년 {m}월인 {t:을} {c} 순으로 보여줘",
        "{y}년 {m}월 {t}의 {d:과} {c:을} {c} 순서대로 나열해 줘",
        "{c:이} {y}년 {m}월에 있는 {t}의 {d:을} 오래된 순으로 보여줘"),
    en=("Show {ts} whose {c} is in {mon} {y}, ordered by {c}.",
        "List the {d} and {c} of {ts} with {c_a} during {mon} {y}, earliest first.",
        "Which {ts} have {c_a} in {mon} {y}? Sort them by {c}."))
def date_month(s: Sampler) -> Draft | None:
    t = s.table("date")
    if t is None:
        return None
    c, d = s.col(t, "date"), t.display
    y, m = (int(x) for x in str(s.value(t, c))[:7].split("-"))
    end = f"{y + 1}-01-01" if m == 12 else f"{y}-{m + 1:02d}-01"
    sql = (
        f"SELECT {d.name}, {c.name} FROM {t.name} WHERE {c.name} >= '{y}-{m:02d}-01' "
        f"AND {c.name} < '{end}' ORDER BY {c.name}"
    )
    return Draft(sql, s.slots(t, c=c, d=d, y=y, m=m, mon=MONTHS_EN[m - 1]), t.person)
