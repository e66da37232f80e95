"""Why an answer is wrong: one failure class per wrong prediction, from the parsed predicted and
gold SQL (sqlglot), so that a report says what to fix rather than only how often.

The first test that tells the two queries apart names the class (this order is the precedence;
the shape of the query before the rows it reads, the rows before the values it returns):

1. `not_executable`: the prediction does not parse, is refused by the guard, or fails to run;
2. `set_operation`: other UNION / INTERSECT / EXCEPT operators (or none where gold has one);
3. `nesting`: another number of subqueries;
4. `wrong_table`: other tables, none shared (or one table each, a different one);
5. `join_path`: tables shared, but more, fewer or other tables joined, or joined on other columns;
6. `missing_condition`: fewer WHERE conditions than gold (a filter dropped);
7. `extra_condition`: more WHERE conditions than gold;
8. `wrong_column`: as many conditions, on other columns;
9. `wrong_literal`: the same conditions on the same columns, another value or comparison;
10. `grouping`: other GROUP BY columns or HAVING conditions;
11. `wrong_aggregate`: other aggregate functions (COUNT, SUM, AVG, MIN, MAX, DISTINCT in them);
12. `wrong_column` (again): other selected columns;
13. `order_limit`: another ORDER BY (columns, direction) or LIMIT;
14. `other`: none of these differ (DISTINCT, arithmetic, AND vs OR, a value's case...).

Conditions are the comparisons in every WHERE clause (`a = 1`, `b LIKE '%x%'`, `c IN (...)`,
`d BETWEEN ...`, `e IS NULL`, negated or not); names compare case-insensitively, without their
table qualifier, and numbers by value.
"""

from __future__ import annotations

from collections import Counter

from sqlglot import exp

from pipelines import sql as sqlmod

CLASSES = (
    "not_executable",
    "set_operation",
    "nesting",
    "wrong_table",
    "join_path",
    "missing_condition",
    "extra_condition",
    "wrong_column",
    "wrong_literal",
    "grouping",
    "wrong_aggregate",
    "order_limit",
    "other",
)
LABELS = {c: c.replace("_", " ") for c in CLASSES}  # how reports write them
_PREDICATES = (
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.Like,
    exp.ILike,
    exp.In,
    exp.Between,
    exp.Is,
)


def _own(node: exp.Expression):
    """The nodes of `node` outside its subqueries."""
    return node.walk(prune=lambda n: n is not node and isinstance(n, exp.Query))


def _name(col: exp.Expression) -> str:
    return col.name.lower() if isinstance(col, exp.Column) else col.sql(dialect="sqlite").lower()


def _value(lit: exp.Expression) -> str:
    if isinstance(lit, exp.Literal) and not lit.is_string:
        try:
            return repr(float(lit.this))
        except ValueError:
            return lit.this
    return lit.name if isinstance(lit, exp.Literal) else lit.sql(dialect="sqlite").lower()


def _selects(tree: exp.Expression) -> list[exp.Select]:
    return list(tree.find_all(exp.Select))


def _tables(tree: exp.Expression) -> set[str]:
    ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    return {
        t.name.lower()
        for t in tree.find_all(exp.Table)
        if isinstance(t.this, exp.Identifier) and t.name.lower() not in ctes
    }


def _joins(tree: exp.Expression) -> Counter:
    """Each join's ON columns (unqualified, as a set) or `cross` / `using`: the join path."""
    out: Counter = Counter()
    for j in tree.find_all(exp.Join):
        on, using = j.args.get("on"), j.args.get("using")
        if on is not None:
            key = frozenset(_name(c) for c in on.find_all(exp.Column))
        else:
            key = frozenset(_name(c) for c in using or []) or frozenset({"cross"})
        out[key] += 1
    return out


def _nesting(tree: exp.Expression) -> int:
    """Subqueries: in parentheses (IN, a comparison, FROM), EXISTS, or a CTE."""
    nested = (exp.Subquery, exp.CTE, exp.Exists)
    return sum(isinstance(q.parent, nested) for q in tree.find_all(exp.Select, exp.SetOperation))


def _conditions(tree: exp.Expression, clause: str = "where") -> list[tuple]:
    """(column names, operator, values) of each comparison in every `clause` of the query."""
    out = []
    for s in _selects(tree):
        node = s.args.get(clause)
        if node is None:
            continue
        for pred in _own(node):
            if not isinstance(pred, _PREDICATES):
                continue
            op = ("not " if isinstance(pred.parent, exp.Not) else "") + pred.key
            cols = sorted(_name(c) for c in _own(pred) if isinstance(c, exp.Column))
            aggs = sorted(a.key for a in _own(pred) if isinstance(a, exp.AggFunc))
            values = sorted(_value(v) for v in _own(pred) if isinstance(v, (exp.Literal, exp.Null)))
            has_query = any(isinstance(n, exp.Query) for n in pred.iter_expressions())
            out.append((tuple(cols + aggs), op, tuple(values), has_query))
    return sorted(out)


def _aggregates(tree: exp.Expression) -> Counter:
    return Counter(
        (a.key, isinstance(a.this, exp.Distinct))
        for s in _selects(tree)
        for p in s.expressions
        for a in _own(p)
        if isinstance(a, exp.AggFunc)
    )


def _projection(tree: exp.Expression) -> Counter:
    return Counter(
        "*" if isinstance(c, exp.Star) or isinstance(c.this, exp.Star) else _name(c)
        for s in _selects(tree)
        for p in s.expressions
        for c in _own(p)
        if isinstance(c, (exp.Column, exp.Star)) and not isinstance(c.parent, exp.Column)
    )


def _grouping(tree: exp.Expression) -> tuple:
    groups = sorted(
        _name(g) for s in _selects(tree) if s.args.get("group") for g in s.args["group"].expressions
    )
    return tuple(groups), tuple(_conditions(tree, "having"))


def _order_limit(tree: exp.Expression) -> tuple:
    orders, limits = [], []
    for q in [tree, *tree.find_all(exp.Select)]:
        if q.args.get("order"):
            orders += [
                (o.this.sql(dialect="sqlite").lower(), bool(o.args.get("desc")))
                for o in q.args["order"].expressions
            ]
        if q.args.get("limit"):
            limits.append(q.args["limit"].sql(dialect="sqlite").lower())
    return tuple(sorted(set(orders))), tuple(sorted(set(limits)))


def _set_ops(tree: exp.Expression) -> list[str]:
    return sorted(
        f"{s.key}{'' if s.args.get('distinct', True) else ' all'}"
        for s in tree.find_all(exp.SetOperation)
    )


def classify(gold_sql: str, pred_sql: str, executed: bool) -> str:
    """The failure class of a wrong prediction (CLASSES, in the module docstring's precedence);
    `executed`: whether the prediction ran (the row's `valid`)."""
    if not executed:
        return "not_executable"
    try:
        gold, pred = sqlmod.parse(gold_sql), sqlmod.parse(pred_sql)
    except Exception:  # executed but not parsed here: no structure to compare
        return "other"
    if _set_ops(gold) != _set_ops(pred):
        return "set_operation"
    if _nesting(gold) != _nesting(pred):
        return "nesting"
    g_tables, p_tables = _tables(gold), _tables(pred)
    if g_tables != p_tables:
        joined = len(g_tables) > 1 or len(p_tables) > 1
        return "join_path" if joined and g_tables & p_tables else "wrong_table"
    if _joins(gold) != _joins(pred):
        return "join_path"
    g_cond, p_cond = _conditions(gold), _conditions(pred)
    if len(p_cond) < len(g_cond):
        return "missing_condition"
    if len(p_cond) > len(g_cond):
        return "extra_condition"
    if sorted(c[0] for c in g_cond) != sorted(c[0] for c in p_cond):
        return "wrong_column"
    if g_cond != p_cond:
        return "wrong_literal"
    if _grouping(gold) != _grouping(pred):
        return "grouping"
    if _aggregates(gold) != _aggregates(pred):
        return "wrong_aggregate"
    if _projection(gold) != _projection(pred):
        return "wrong_column"
    if _order_limit(gold) != _order_limit(pred):
        return "order_limit"
    return "other"


def failure_of(row: dict) -> str | None:
    """A scored prediction row's failure class; None when its answer is right."""
    if row["execution_match"]:
        return None
    return classify(row["gold_sql"], row["pred_sql"], bool(row["valid"]))


def counts(rows: list[dict]) -> dict[str, int]:
    """Wrong answers per failure class, every class listed (a row's `failure`, or classified
    here when it has none but has the SQL)."""
    found = Counter(
        r["failure"] if "failure" in r else failure_of(r) if "gold_sql" in r else None for r in rows
    )
    return {c: found.get(c, 0) for c in CLASSES}


def summary_line(failures: dict[str, int], top: int = 5) -> str:
    """The most frequent classes in words: `missing condition 12, wrong table 7, ...`."""
    ranked = sorted(
        ((n, c) for c, n in failures.items() if n), key=lambda x: (-x[0], CLASSES.index(x[1]))
    )
    return ", ".join(f"{LABELS[c]} {n}" for n, c in ranked[:top]) or "none"
