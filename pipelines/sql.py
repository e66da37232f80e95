"""The one SQL module: parse and normalise, guard, execute safely, compare results.

Evaluation, data validation, the synthetic generator and the gateway all go through here, so a
query is judged "read-only", "valid" or "correct" the same way everywhere.

- `guard(sql)` accepts exactly one SELECT/WITH statement and raises `UnsafeSQL` otherwise.
- `execute(db, sql, ...)` opens SQLite read-only with `query_only`, stops the query at a time
  limit (progress handler) and caps the rows returned.
- `results_match(gold, pred, ordered)` compares results Spider-style: a multiset of rows, order
  only when the gold query has ORDER BY, floats within a tolerance.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import sqlglot
from sqlglot import exp

DIALECT = "sqlite"
_WRITE_NODES = (
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Drop,
    exp.Create,
    exp.Alter,
    exp.Command,
    exp.Merge,
    exp.TruncateTable,
)
_READ_ROOTS = (exp.Select, exp.Union, exp.Intersect, exp.Except)


class UnsafeSQL(ValueError):
    """SQL that is not exactly one read-only statement; the message says why."""


@dataclass
class ExecResult:
    rows: list[tuple] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    error: str | None = None  # None when the query ran; else the reason (timeout, syntax, ...)
    truncated: bool = False  # more rows existed than the cap
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def parse(sql: str) -> exp.Expression:
    """Parse one statement; raises `sqlglot.errors.ParseError` (a ValueError) on bad SQL,
    including text that does not even tokenize (an unterminated string literal)."""
    try:
        parsed = sqlglot.parse(sql, read=DIALECT)
    except sqlglot.errors.TokenError as e:
        raise sqlglot.errors.ParseError(str(e)) from e
    statements = [s for s in parsed if s is not None]
    if len(statements) != 1:
        raise UnsafeSQL(f"expected exactly one statement, got {len(statements)}")
    return statements[0]


def normalize(sql: str) -> str:
    """Canonical text of a query for exact match: sqlglot round-trip, identifiers lower-cased."""
    try:
        tree = parse(sql)
    except (sqlglot.errors.ParseError, UnsafeSQL):
        return " ".join(sql.strip().rstrip(";").lower().split())
    return tree.sql(dialect=DIALECT, normalize=True, pretty=False)


def guard(sql: str) -> str:
    """Return the statement (no trailing `;`) if it is a single read-only query, else raise."""
    if not sql or not sql.strip():
        raise UnsafeSQL("empty SQL")
    try:
        tree = parse(sql)
    except sqlglot.errors.ParseError as e:
        raise UnsafeSQL(f"does not parse: {str(e).splitlines()[0]}") from e
    root = tree.this if isinstance(tree, exp.With) else tree
    if not isinstance(root, _READ_ROOTS):
        raise UnsafeSQL(f"only SELECT/WITH queries are allowed, got {tree.key.upper()}")
    for node in tree.walk():
        if isinstance(node, _WRITE_NODES):
            raise UnsafeSQL(f"{node.key.upper()} is not allowed in a read-only query")
    if re.search(r"\b(pragma|attach|detach|vacuum)\b", sql, re.IGNORECASE):
        raise UnsafeSQL("PRAGMA/ATTACH/DETACH/VACUUM are not allowed")
    return sql.strip().rstrip(";").strip()


def has_order_by(sql: str) -> bool:
    """Whether the outermost query orders its rows (then row order counts in comparison)."""
    try:
        tree = parse(sql)
    except (sqlglot.errors.ParseError, UnsafeSQL):
        return False
    root = tree.this if isinstance(tree, exp.With) else tree
    return root.args.get("order") is not None


def connect_readonly(db_path: Path | str) -> sqlite3.Connection:
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"database not found: {path}")
    conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, check_same_thread=False)
    conn.execute("PRAGMA query_only = ON")
    return conn


def execute(db_path: Path | str, sql: str, timeout_s: float, max_rows: int = 10_000) -> ExecResult:
    """Run a guarded query read-only with a time limit and a row cap; never raises on bad SQL."""
    start = time.monotonic()
    try:
        statement = guard(sql)
    except UnsafeSQL as e:
        return ExecResult(error=f"rejected: {e}")
    deadline = start + timeout_s
    try:
        conn = connect_readonly(db_path)
    except (FileNotFoundError, sqlite3.Error) as e:
        return ExecResult(error=f"database: {e}")
    # A non-zero return from the handler interrupts the query ("interrupted").
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        cur = conn.execute(statement)
        rows = cur.fetchmany(max_rows + 1)
        columns = [d[0] for d in cur.description or []]
    except sqlite3.OperationalError as e:
        msg = "timeout" if "interrupted" in str(e) else f"error: {e}"
        return ExecResult(error=msg, seconds=time.monotonic() - start)
    except sqlite3.Error as e:
        return ExecResult(error=f"error: {e}", seconds=time.monotonic() - start)
    finally:
        conn.close()
    truncated = len(rows) > max_rows
    return ExecResult(
        rows=[tuple(r) for r in rows[:max_rows]],
        columns=columns,
        truncated=truncated,
        seconds=time.monotonic() - start,
    )


def _sort_key(row: tuple) -> tuple:
    # Mixed types (None, numbers, text) must sort; numbers compare by value, rounded so that
    # values within the tolerance land next to each other.
    key = []
    for v in row:
        if v is None:
            key.append((0, 0.0, ""))
        elif isinstance(v, (int, float)):
            key.append((1, round(float(v), 6), ""))
        else:
            key.append((2, 0.0, str(v)))
    return tuple(key)


def _values_equal(a: object, b: object, tol: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)
    return a == b


def results_match(
    gold: Sequence[tuple], pred: Sequence[tuple], ordered: bool, tol: float = 1e-6
) -> bool:
    """Spider-style equality of two results (rows compared as tuples, floats within `tol`)."""
    if len(gold) != len(pred):
        return False
    if not ordered:
        gold, pred = sorted(gold, key=_sort_key), sorted(pred, key=_sort_key)
    for g, p in zip(gold, pred, strict=True):
        if len(g) != len(p) or not all(_values_equal(a, b, tol) for a, b in zip(g, p, strict=True)):
            return False
    return True


def compact_ddl(statement: str) -> str:
    """One CREATE TABLE on one line: indentation costs prompt tokens and tells the model nothing."""
    text = " ".join(statement.split())
    return text.replace("( ", "(").replace(" )", ")").rstrip(";")


def ddl_of(db_path: Path | str) -> str:
    """The CREATE TABLE statements of a database, in creation order, one per line (the
    prompt's DDL)."""
    with closing(connect_readonly(db_path)) as conn:
        rows = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL "
            "AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
        ).fetchall()
    return "\n".join(f"{compact_ddl(r[0])};" for r in rows)


def _table_names(conn: sqlite3.Connection) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
        )
    ]


def schema_of(db_path: Path | str) -> dict[str, list[str]]:
    """Table name → column names (lower-cased) of a database."""
    with closing(connect_readonly(db_path)) as conn:
        return {
            t.lower(): [c[1].lower() for c in conn.execute(f'PRAGMA table_info("{t}")')]
            for t in _table_names(conn)
        }


def columns_of(db_path: Path | str) -> dict[str, list[dict]]:
    """Table name → its columns `{name, type, pk}` as declared, in creation order (what the
    playground shows a person choosing a database)."""
    with closing(connect_readonly(db_path)) as conn:
        return {
            t: [
                {"name": c[1], "type": c[2], "pk": bool(c[5])}
                for c in conn.execute(f'PRAGMA table_info("{t}")')
            ]
            for t in _table_names(conn)
        }


_ROWID = {"rowid", "oid", "_rowid_"}  # SQLite's implicit row id columns


def missing_refs(tree: exp.Expression, schema: dict[str, list[str]]) -> list[str]:
    """Tables and columns a query names that the database lacks (SQLite would fail on most of
    them, but reads an unknown double-quoted column as a string literal and returns wrong rows).

    Names defined by the query itself (CTEs, derived tables, select aliases) are accepted;
    columns qualified by one of those are not checked further.
    """
    ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    derived = set(ctes) | {s.alias.lower() for s in tree.find_all(exp.Subquery) if s.alias}
    tables_of: dict[str, set[str]] = defaultdict(set)  # alias (or name) → real tables
    missing: list[str] = []
    for t in tree.find_all(exp.Table):
        if not isinstance(t.this, exp.Identifier):
            continue  # a table-valued function, e.g. json_each(...)
        name = t.name.lower()
        if name in ctes:
            derived.add(t.alias_or_name.lower())
        elif name not in schema:
            missing.append(f"table {t.name}")
            derived.add(t.alias_or_name.lower())  # its columns: reported once, as the table
        else:
            tables_of[t.alias_or_name.lower()].add(name)
    known = {c for cols in schema.values() for c in cols} | _ROWID
    known |= {a.alias.lower() for a in tree.find_all(exp.Alias)}
    known |= {c.name.lower() for ta in tree.find_all(exp.TableAlias) for c in ta.columns}
    for col in tree.find_all(exp.Column):
        if isinstance(col.this, exp.Star):
            continue
        name, qualifier = col.name.lower(), col.table.lower()
        if not qualifier:
            if name not in known:
                missing.append(f"column {col.name}")
        elif qualifier in derived:
            continue
        elif qualifier not in tables_of:
            missing.append(f"table or alias {col.table}")
        elif name not in _ROWID and not any(name in schema[t] for t in tables_of[qualifier]):
            missing.append(f"column {col.table}.{col.name}")
    return list(dict.fromkeys(missing))


_SQL_START = re.compile(r"\b(SELECT|WITH)\b", re.IGNORECASE)


def extract_sql(text: str) -> str:
    """The first SQL statement in model output: skips chat, code fences, and text after `;`."""
    text = re.sub(r"```(?:sql)?", "\n", text, flags=re.IGNORECASE)
    m = _SQL_START.search(text)
    if not m:
        return text.strip().split("\n")[0].strip()
    body = text[m.start() :]
    end = body.find(";")
    if end >= 0:
        body = body[:end]
    # A blank line or a new prompt section ends the statement too.
    body = re.split(r"\n\s*\n|\n###", body)[0]
    return " ".join(body.split())
