"""A per-database SQL grammar (GBNF) that makes table–column mismatches impossible.

`schema_grammar(db_path, cfg)` returns GBNF text for xgrammar (vLLM's structured
outputs offline and served; xgrammar's logits processor on transformers), cached by the hash
of the schema. A context-free grammar cannot look up an alias bound later in the FROM clause,
so the grammar enumerates the FROM clauses a query can have instead, one *scope* each:

- a single table: `FROM t`, columns unqualified and only t's;
- a join of 2..`max_join_tables` tables, each next one linked by a foreign key to one before
  it (`FROM a AS x JOIN b AS y ON x.k = y.k`): the ON condition is one of the foreign keys
  between the joined table and an earlier one, never any two columns (`ON m.played_at =
  p.player_id` cannot be written); columns only `alias.column` with the alias of the table
  that has the column. Where a pair of tables declares no key, the keys `pipelines.
  inferred_joins` finds (same key-like names, `x_id` conventions, value overlap) count as
  foreign keys, the ones the prompt's DDL lists as `-- join (inferred): ...`; two columns
  that merely share a name (`name`, `year`) are never an ON condition. Aliases are derived
  from the table names by the synthetic data's own rule (`join_aliases`: initials first, then
  growing prefixes), so a scope fixes them.

A SELECT picks its scope at its first token; its select list, WHERE, GROUP BY, HAVING and
ORDER BY can then only name columns of the scope's tables under their own aliases, and a
subquery (IN, comparisons, set operations) is a SELECT with a scope of its own. `p.item_name`
where `p` is purchases, or a column of a table that is not in FROM, cannot be written.

The query's shape is bounded by params.yaml `decoding:` as the data bounds it: subqueries
nested `max_subquery_depth` deep, `max_set_ops` set operators per query, and no ORDER BY or
LIMIT inside a compound. A small model's broken SQL was mostly a loop (`IN (SELECT ... IN
(SELECT ...`) that the token budget cut off mid-query; within the bound it has to close.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import DecodingConfig
from pipelines.inferred_joins import inferred_joins
from pipelines.sql import connect_readonly

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Schema:
    tables: dict[str, tuple[str, ...]]  # table → columns, as the DDL spells them
    keys: frozenset[
        tuple[str, str, str, str]
    ]  # foreign keys: (table, column, ref table, ref column)
    inferred: frozenset[tuple[str, str, str, str]] = frozenset()  # undeclared keys, same form

    @property
    def links(self) -> frozenset[tuple[str, str]]:
        """Tables linked by a foreign key (declared or inferred), as unordered (sorted) pairs."""
        return frozenset(tuple(sorted((t, r))) for t, _, r, _ in self.keys | self.inferred)

    def key_columns(self, a: str, b: str) -> list[tuple[str, str]]:
        """The (column of a, column of b) pairs of the foreign keys between tables a and b."""
        keys = sorted(self.keys | self.inferred)
        pairs = [(c, rc) for t, c, r, rc in keys if (t, r) == (a, b)]
        return pairs + [(rc, c) for t, c, r, rc in keys if (t, r) == (b, a)]

    @property
    def digest(self) -> str:
        text = repr(sorted(self.tables.items())) + repr(sorted(self.keys))
        text += repr(sorted(self.inferred))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_schema(db_path: Path | str) -> Schema:
    """Tables, columns (case kept: the grammar writes them as the DDL does), foreign keys
    (single-column ones, each column pair of a composite key on its own; a key that names no
    column refers to the referenced table's primary key) and the keys inferred where a pair of
    tables declares none."""
    with closing(connect_readonly(db_path)) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
            )
        ]
        info = {t: list(conn.execute(f'PRAGMA table_info("{t}")')) for t in names}
        tables = {t: tuple(c[1] for c in cols) for t, cols in info.items()}
        keys = set()
        for t in names:
            for fk in conn.execute(f'PRAGMA foreign_key_list("{t}")'):
                ref = next((n for n in names if n.lower() == fk[2].lower()), None)
                if ref is None or ref == t:
                    continue
                ref_col = fk[4] or next((c[1] for c in info[ref] if c[5] == 1), None)
                col = _spelled(fk[3], tables[t])
                ref_col = ref_col and _spelled(ref_col, tables[ref])
                if col and ref_col:
                    keys.add((t, col, ref, ref_col))
    inferred = {(j.table, j.column, j.ref_table, j.ref_column) for j in inferred_joins(db_path)}
    return Schema(tables, frozenset(keys), frozenset(inferred))


def _spelled(name: str, columns: tuple[str, ...]) -> str | None:
    """The column `name` as the table's DDL spells it (SQLite matches names case-blind)."""
    return next((c for c in columns if c.lower() == name.lower()), None)


def join_aliases(tables: list[str]) -> list[str]:
    """The aliases of a join's tables, in FROM order: the same rule the synthetic data's
    `pipelines.data.patterns.aliases` writes (initials, e.g. oi for order_items; then prefixes
    of growing length until distinct), so the tuned model's aliases are the grammar's."""
    taken: list[str] = []
    for t in tables:
        initials = "".join(part[0] for part in t.split("_") if part)
        candidates = [initials] + [t[:n] for n in range(2, len(t) + 1)]
        taken.append(next(a for a in candidates if a not in taken))
    return taken


def scopes(schema: Schema, max_join_tables: int) -> list[tuple[str, ...]]:
    """Every FROM clause the grammar allows: single tables, then ordered joins where each next
    table has a foreign key to or from one before it (both directions, chains and stars)."""
    out: list[tuple[str, ...]] = [(t,) for t in schema.tables]
    frontier = list(out)
    for _ in range(max_join_tables - 1):
        grown = []
        for seq in frontier:
            for t in schema.tables:
                if t not in seq and any(tuple(sorted((t, s))) in schema.links for s in seq):
                    grown.append((*seq, t))
        out += grown
        frontier = grown
    return out


def _lit(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ident(name: str) -> str:
    return name if _PLAIN.match(name) else '"' + name.replace('"', '""') + '"'


# Shared rules: literals, operators, aggregates. Keywords upper-case and single spaces, as the
# training SQL writes them (the model learned that layout; the grammar keeps it).
COMMON = r"""
string ::= "'" ([^'\n] | "''")* "'"
number ::= "-"? [0-9]+ ("." [0-9]+)?
literal ::= string | number | "NULL"
cmp ::= " = " | " != " | " <> " | " < " | " <= " | " > " | " >= "
arith ::= " + " | " - " | " * " | " / "
agg ::= "COUNT" | "SUM" | "AVG" | "MIN" | "MAX"
limit ::= " LIMIT " [0-9]+
setop ::= " UNION " | " UNION ALL " | " INTERSECT " | " EXCEPT "
literals ::= literal (", " literal)*
""".strip()


def _scope_rules(k: int, tables: tuple[str, ...], schema: Schema, depth: int) -> list[str]:
    """Scope k's rules: its FROM clause and columns once, its clauses once per nesting level
    (`d{level}s{k}...`): a level below `depth` may hold a subquery of the next level."""
    s = f"s{k}"
    if len(tables) == 1:
        cols = [_ident(c) for c in schema.tables[tables[0]]]
        from_clause = _lit(_ident(tables[0]))
    else:
        names = join_aliases(list(tables))
        cols = [f"{a}.{_ident(c)}" for t, a in zip(tables, names, strict=True)
                for c in schema.tables[t]]  # fmt: skip
        parts = [_lit(f"{_ident(tables[0])} AS {names[0]}")]
        for i in range(1, len(tables)):
            on = [
                _lit(f"{x}.{_ident(cx)} = {y}.{_ident(cy)}")
                for j in range(i)
                for cj, ci in schema.key_columns(tables[j], tables[i])
                for (x, cx), (y, cy) in (
                    ((names[j], cj), (names[i], ci)),
                    ((names[i], ci), (names[j], cj)),
                )
            ]
            parts.append(
                _lit(f" JOIN {_ident(tables[i])} AS {names[i]} ON ") + " (" + " | ".join(on) + ")"
            )
        from_clause = " ".join(parts)
    col_alts = " | ".join(_lit(c) for c in cols)
    rules = [f"{s}from ::= {from_clause}", f"{s}col ::= {col_alts}"]
    for level in range(depth + 1):
        d = f"d{level}{s}"
        nested = level < depth
        rules += [
            f'{d}core ::= "SELECT " "DISTINCT "? {d}list " FROM " {s}from '
            f'(" WHERE " {d}cond)? (" GROUP BY " {s}col (", " {s}col)*)? (" HAVING " {d}cond)?',
            f'{d}sel ::= {d}core (" ORDER BY " {d}ord (", " {d}ord)*)? limit?',
            f'{d}list ::= "*" | {d}expr (", " {d}expr)*',
            f'{d}ord ::= {d}expr (" ASC" | " DESC")?',
            f"{d}expr ::= {d}term (arith {d}term)*",
            f'{d}term ::= {s}col | "COUNT(*)" | agg "(" "DISTINCT "? {d}expr ")" | literal'
            + (f' | "(" q{level + 1} ")"' if nested else ""),
            f'{d}cond ::= {d}pred ((" AND " | " OR ") {d}pred)*',
            f'{d}pred ::= "NOT "? ({d}expr {d}test | "(" {d}cond ")")',
            f'{d}test ::= cmp {d}expr | " IS NULL" | " IS NOT NULL" '
            f'| " NOT"? " IN (" '
            + (f"(q{level + 1} | literals)" if nested else "literals")
            + f' ")" | " NOT"? " BETWEEN " {d}expr " AND " {d}expr | " NOT"? " LIKE " string',
        ]
    return rules


def _query_rules(n_scopes: int, depth: int, set_ops: int) -> list[str]:
    """`q{level}`: one SELECT of any scope, or a compound of 2..set_ops + 1 SELECTs whose
    members carry no ORDER BY or LIMIT (SQLite refuses them before a set operator, and after
    the last one they would have to name the compound's result columns)."""
    rules = []
    for level in range(depth + 1):
        sel = " | ".join(f"d{level}s{k}sel" for k in range(n_scopes))
        core = " | ".join(f"d{level}s{k}core" for k in range(n_scopes))
        rules += [f"sel{level} ::= {sel}", f"core{level} ::= {core}"]
        tail = ""
        for _ in range(set_ops - 1):
            tail = f" (setop core{level}{tail})?"
        compound = f" | core{level} setop core{level}{tail}" if set_ops else ""
        rules.append(f"q{level} ::= sel{level}{compound}")
    return rules


def build_grammar(schema: Schema, cfg: DecodingConfig) -> str:
    """GBNF text: `root` is one query and its `;`, within cfg's joins, nesting and set ops."""
    found = scopes(schema, cfg.max_join_tables)
    rules = ['root ::= q0 ";"', COMMON]
    rules += _query_rules(len(found), cfg.max_subquery_depth, cfg.max_set_ops)
    for k, tables in enumerate(found):
        rules += _scope_rules(k, tables, schema, cfg.max_subquery_depth)
    return "\n".join(rules) + "\n"


_CACHE: dict[tuple, str] = {}  # (schema hash, joins, nesting, set ops) → grammar text


def schema_grammar(db_path: Path | str, cfg: DecodingConfig) -> str:
    """The grammar of a database, built once per schema (keyed by its hash: a database whose
    schema changed gets a new grammar, two databases with one schema share one)."""
    schema = read_schema(db_path)
    key = (schema.digest, cfg.max_join_tables, cfg.max_subquery_depth, cfg.max_set_ops)
    if key not in _CACHE:
        _CACHE[key] = build_grammar(schema, cfg)
    return _CACHE[key]
