"""A schema that fits: the tables of a DDL most related to a question, when all of them do not.

A prompt carries the whole DDL while it is at most `max_ddl_chars` long (every synthetic database
is). A longer one (a 30-table Spider database, a real warehouse) keeps the tables the question
names, then their foreign-key neighbourhood, in the DDL's own order, until the budget is spent:

1. each table scores by the question words it shares with its name and column names (identifiers
   split at `_` and camelCase, plural `s` dropped), values quoted in the question counting too;
2. tables are taken best first; after each, the tables that join it to one already taken (its
   foreign-key parents, or a table referencing both) come next, so a JOIN path never breaks;
3. whatever fits of the rest follows, so nothing is dropped that the budget could hold.

`prompt_ddl` is the one builder of a prompt's schema, run by `prepare` on every record's DDL,
by `sqlops eval` and by the gateway on each request's, so training, evaluation and serving see
the same text: the DDL, the join keys the database does not declare (`-- join (inferred):
orders.customer_id = customers.id`, `data.inferred_joins`; also paths for step 2), fitted as
above, then the values the question names (`-- matches: plants.Status = 'Operational'`,
`data.value_links`), whose tables count as named by the question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines.config import ValueLinksConfig
from pipelines.data.value_links import MATCH_PREFIX, link_values
from pipelines.inferred_joins import JOIN_PREFIX, inferred_joins

_TABLE = re.compile(r'CREATE TABLE\s+"?(\w+)"?\s*\((.*)\)\s*;?\s*$', re.IGNORECASE | re.DOTALL)
_REF = re.compile(r'REFERENCES\s+"?(\w+)"?', re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z]+|\d+|[^\W\d_A-Za-z]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"")
_JOIN_LINE = re.compile(r"^" + re.escape(JOIN_PREFIX) + r"(\w+)\.\w+ = (\w+)\.\w+$", re.M)


@dataclass(frozen=True)
class TableDDL:
    name: str
    statement: str  # one CREATE TABLE, as in the DDL
    words: frozenset[str]  # name and column names split into lower-case words
    parents: frozenset[str]  # tables its foreign keys reference


def _words(text: str) -> set[str]:
    out = set()
    for w in _WORD.findall(_CAMEL.sub(" ", text).replace("_", " ")):
        w = w.lower()
        out.add(w)
        if len(w) > 3 and w.endswith("s"):
            out.add(w[:-1])
    return out


def split_ddl(ddl: str) -> list[TableDDL]:
    """The CREATE TABLE statements of a DDL text (one per line, as `db_schema.ddl_of` writes
    them, or `;`-separated), parsed just enough to score and join them."""
    tables = []
    for statement in (s.strip() for s in ddl.split(";")):
        m = _TABLE.match(statement + ";") if statement else None
        if m is None:
            continue
        name, body = m.group(1), m.group(2)
        columns = [part.strip().split()[0].strip('"') for part in body.split(",") if part.strip()]
        words = _words(name) | {w for c in columns for w in _words(c)}
        parents = frozenset(r.lower() for r in _REF.findall(body)) - {name.lower()}
        tables.append(TableDDL(name.lower(), statement + ";", frozenset(words), parents))
    return tables


def _score(table: TableDDL, question_words: set[str], name_words: set[str]) -> float:
    shared = table.words & question_words
    # A hit on the table's own name says more than one on a column that many tables have.
    return len(shared) + 2 * len(name_words & question_words)


def fit_schema(ddl: str, question: str, max_chars: int, boost: frozenset[str] = frozenset()) -> str:
    """The DDL itself when it fits in `max_chars`, else the tables most related to the question
    (see the module docstring), one statement per line, in the DDL's order, then the inferred
    join lines between kept tables. `boost`: tables the question names by a value."""
    if len(ddl) <= max_chars:
        return ddl
    tables = split_ddl(ddl)
    if not tables:
        return ddl
    joins = [(m.group(0), m.group(1).lower(), m.group(2).lower()) for m in _JOIN_LINE.finditer(ddl)]
    extra: dict[str, set[str]] = {}
    for _, child, parent in joins:  # an inferred key is a path like a declared one
        extra.setdefault(child, set()).add(parent)
    tables = [replace(t, parents=t.parents | (extra.get(t.name, set()) - {t.name})) for t in tables]
    max_chars -= sum(len(line) + 1 for line, _, _ in joins)
    quoted = " ".join(a or b for a, b in _QUOTED.findall(question))
    asked = _words(question) | _words(quoted)
    by_name = {t.name: t for t in tables}
    ranked = sorted(
        tables, key=lambda t: -_score(t, asked, _words(t.name)) - 2 * (t.name in boost)
    )  # sorted is stable: ties keep the DDL's order
    kept: list[str] = []
    used = 0

    def take(name: str) -> None:
        nonlocal used
        cost = len(by_name[name].statement) + 1
        if name not in kept and used + cost <= max_chars:
            kept.append(name)
            used += cost

    for t in ranked:
        if t.name in kept:
            continue
        take(t.name)
        if t.name not in kept:
            continue
        for other in list(kept):
            for bridge in _bridges(t.name, other, by_name):
                take(bridge)
    order = {t.name: i for i, t in enumerate(tables)}
    lines = [by_name[n].statement for n in sorted(kept, key=order.__getitem__)]
    lines += [line for line, child, parent in joins if {child, parent} <= set(kept)]
    return "\n".join(lines)


def schema_key(ddl: str) -> str:
    """A prompt schema without its per-question value lines: the same for every question on one
    database, so training still batches (and renames) by schema when values are linked."""
    return "\n".join(x for x in ddl.split("\n") if not x.startswith(MATCH_PREFIX))


def _plain(ddl: str) -> str:
    """The DDL without lines this module adds (so a built DDL can be built again)."""
    lines = ddl.split("\n")
    return "\n".join(x for x in lines if not x.startswith((JOIN_PREFIX, MATCH_PREFIX)))


def prompt_ddl(
    ddl: str,
    question: str,
    max_chars: int,
    db_path: Path | str | None,
    *,
    inferred: bool,
    value_links: ValueLinksConfig,
) -> str:
    """The prompt's schema for `question`: `ddl` with the database's inferred join keys
    (`inferred`), fitted to `max_chars`, then the values the question names (`value_links`)
    on tables the fit kept. Without a database file (a DDL-only source) the fit alone."""
    ddl = _plain(ddl)
    links = []
    if db_path is not None and Path(db_path).is_file():
        names = {t.name for t in split_ddl(ddl)}
        if inferred:
            found = inferred_joins(db_path)
            ddl += "".join(
                "\n" + j.line() for j in found if {j.table.lower(), j.ref_table.lower()} <= names
            )
        if value_links.enabled:
            links = [
                x for x in link_values(db_path, question, value_links) if x.table.lower() in names
            ]
    budget = max_chars - sum(len(x.line()) + 1 for x in links)
    fitted = fit_schema(ddl, question, budget, frozenset(x.table.lower() for x in links))
    kept = {t.name for t in split_ddl(fitted)}
    return fitted + "".join("\n" + x.line() for x in links if x.table.lower() in kept)


def _bridges(a: str, b: str, by_name: dict[str, TableDDL]) -> list[str]:
    """Tables that join `a` and `b`: a's or b's parents among them, or one table referencing
    both (a link table)."""
    if a == b:
        return []
    ta, tb = by_name[a], by_name[b]
    direct = [p for p in (ta.parents | tb.parents) if p in by_name and p in (a, b)]
    if direct:
        return []
    shared_parent = [p for p in ta.parents & tb.parents if p in by_name]
    links = [t.name for t in by_name.values() if {a, b} <= t.parents]
    return shared_parent[:1] or links[:1]
