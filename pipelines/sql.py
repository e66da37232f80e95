"""The one SQL module: parse and normalise, guard, verify, execute safely, compare results.

Evaluation, data validation, the feedback export, the synthetic generator and the gateway all go
through here, so a query is judged "read-only", "valid" or "correct" the same way everywhere.

- `parse(sql)` refuses SQL longer than `sql.max_sql_chars` or nested deeper than
  `sql.max_nesting` before the (recursive) parser sees it.
- `guard(sql)` accepts exactly one SELECT/WITH statement, decided on the parsed statement, and
  raises `UnsafeSQL` otherwise (also for `pragma_*` table-valued functions and functions that
  reach outside the database, such as `fts3_tokenizer`).
- `execute(db, sql, ...)` runs a guarded query in a worker process (pipelines/sql_worker.py):
  SQLite read-only with `query_only`, a time limit (progress handler, and a kill at the limit +
  `sql.kill_margin_s`), a row cap, and the memory, value-size and result-size caps of `sql:`.
- `verify(sql, db, ...)`: the checks a labelled example's SQL must pass (parses, read-only, real
  tables and columns, reads the database, executes), shared by `validate` and the feedback export.
- `results_match(gold, pred, ordered)` compares results Spider-style: a multiset of rows, order
  only when the gold query has ORDER BY, floats within a tolerance.
"""

from __future__ import annotations

import functools
import math
import re
import sqlite3
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.tokens import TokenType

from pipelines.config import SQLConfig, load_params
from pipelines.sql_worker import DENIED_FUNCTIONS, pool

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
    exp.Pragma,
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


@functools.cache
def default_limits() -> SQLConfig:
    """The `sql:` block of params.yaml, for callers that pass no limits of their own."""
    return load_params().sql


def _nesting(tokens: list) -> int:
    depth = deepest = 0
    for token in tokens:
        if token.token_type == TokenType.L_PAREN:
            depth += 1
            deepest = max(deepest, depth)
        elif token.token_type == TokenType.R_PAREN:
            depth -= 1
    return deepest


def parse(sql: str, limits: SQLConfig | None = None) -> exp.Expression:
    """Parse one statement; raises `sqlglot.errors.ParseError` (a ValueError) on bad SQL,
    including text that does not even tokenize (an unterminated string literal) or that the
    parser cannot handle at all, and `UnsafeSQL` on SQL too long or too deeply nested."""
    limits = limits or default_limits()
    if len(sql) > limits.max_sql_chars:
        raise UnsafeSQL(f"SQL is longer than {limits.max_sql_chars} characters")
    try:
        dialect = Dialect.get_or_raise(DIALECT)
        tokens = dialect.tokenize(sql)
        if _nesting(tokens) > limits.max_nesting:
            raise UnsafeSQL(f"SQL is nested deeper than {limits.max_nesting} levels")
        parsed = dialect.parser().parse(tokens, sql)
    except (UnsafeSQL, sqlglot.errors.ParseError):
        raise
    except RecursionError as e:  # long operator chains recurse without parentheses
        raise UnsafeSQL("SQL is nested too deeply to parse") from e
    except Exception as e:  # TokenError, or a parser bug on odd input: not SQL we can judge
        raise sqlglot.errors.ParseError(f"{type(e).__name__}: {e}") from e
    statements = [s for s in parsed if s is not None]
    if len(statements) != 1:
        raise UnsafeSQL(f"expected exactly one statement, got {len(statements)}")
    return statements[0]


def normalize(sql: str) -> str:
    """Canonical text of a query for exact match: sqlglot round-trip, identifiers lower-cased.
    Never raises: text sqlglot cannot parse or print (model output such as an echoed CREATE
    TABLE makes its SQLite generator raise KeyError) is compared as lower-cased text."""
    try:
        return parse(sql).sql(dialect=DIALECT, normalize=True, pretty=False)
    except Exception:
        return " ".join(sql.strip().rstrip(";").lower().split())


def _function_name(node: exp.Func) -> str:
    return node.name if isinstance(node, exp.Anonymous) else node.sql_name()


def guard(sql: str, limits: SQLConfig | None = None) -> str:
    """Return the statement (no trailing `;`) if it is a single read-only query, else raise."""
    if not sql or not sql.strip():
        raise UnsafeSQL("empty SQL")
    try:
        tree = parse(sql, limits)
    except sqlglot.errors.ParseError as e:
        raise UnsafeSQL(f"does not parse: {str(e).splitlines()[0]}") from e
    root = tree.this if isinstance(tree, exp.With) else tree
    if not isinstance(root, _READ_ROOTS):
        raise UnsafeSQL(f"only SELECT/WITH queries are allowed, got {tree.key.upper()}")
    for node in tree.walk():
        if isinstance(node, _WRITE_NODES):
            raise UnsafeSQL(f"{node.key.upper()} is not allowed in a read-only query")
        if isinstance(node, exp.Table) and node.name.lower().startswith("pragma_"):
            raise UnsafeSQL(f"{node.name} (a PRAGMA) is not allowed")
        if isinstance(node, exp.Func):
            name = _function_name(node).lower()
            if name.startswith("pragma_") or name in DENIED_FUNCTIONS:
                raise UnsafeSQL(f"the function {name} is not allowed")
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


def execute(
    db_path: Path | str,
    sql: str,
    timeout_s: float,
    max_rows: int = 10_000,
    limits: SQLConfig | None = None,
) -> ExecResult:
    """Run a guarded query read-only in a worker process, within the time limit, the row cap and
    the `sql:` limits (memory, value and result size); never raises on bad SQL."""
    start = time.monotonic()
    limits = limits or default_limits()
    try:
        statement = guard(sql, limits)
    except UnsafeSQL as e:
        return ExecResult(error=f"rejected: {e}")
    path = Path(db_path)
    if not path.is_file():
        return ExecResult(error=f"database: database not found: {path}")
    request = (str(path.resolve()), statement, timeout_s, max_rows, limits.max_result_bytes)
    answer = pool(limits).run(request, start + timeout_s + limits.kill_margin_s)
    seconds = time.monotonic() - start
    if isinstance(answer, str):
        return ExecResult(error=answer, seconds=seconds)
    rows, columns, error, truncated = answer
    return ExecResult(
        rows=[tuple(r) for r in rows],
        columns=columns,
        error=error,
        truncated=truncated,
        seconds=seconds,
    )


def json_value(value: object) -> object:
    """A result value JSON can carry: non-finite floats as "inf"/"-inf"/"nan", blobs as hex."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def json_rows(rows: Sequence[tuple]) -> list[list]:
    return [[json_value(v) for v in row] for row in rows]


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


def single_quote_strings(sql: str, schema: dict[str, list[str]]) -> str:
    """`sql` with each double-quoted token that SQLite reads as a string literal written in
    single quotes (the canonical form), the rest of the text as it was.

    SQLite takes `"x"` for the column x when one of the query's tables has it and for the
    string 'x' otherwise; Spider and many query logs rely on that (`WHERE name = "Bob"`), which
    `missing_refs` would report as a missing column. Qualified names (`t."x"`) stay identifiers.
    SQL that does not parse is returned unchanged (the contract then names its problem)."""
    try:
        tree = parse(sql)
    except (sqlglot.errors.ParseError, UnsafeSQL):
        return sql
    tables = {t.name.lower() for t in tree.find_all(exp.Table)}
    known = {c for t in tables for c in schema.get(t, [])} | _ROWID
    known |= {a.alias.lower() for a in tree.find_all(exp.Alias)}
    known |= {c.name.lower() for ta in tree.find_all(exp.TableAlias) for c in ta.columns}
    spans = []
    for col in tree.find_all(exp.Column):
        ident = col.this
        if col.table or not isinstance(ident, exp.Identifier) or not ident.quoted:
            continue
        start, end = ident.meta.get("start"), ident.meta.get("end")
        if ident.name.lower() in known or start is None or end is None:
            continue
        if sql[start] == sql[end] == '"':  # the token's own text (not a [x] or `x` identifier)
            spans.append((start, end, ident.name))
    for start, end, value in sorted(spans, reverse=True):
        literal = "'" + value.replace("'", "''") + "'"
        sql = sql[:start] + literal + sql[end + 1 :]
    return sql


# The checks `verify` runs, in the order they depend on each other, and what each demands.
CHECKS = {
    "sql_parses": "the SQL parses",
    "sql_read_only": "the SQL is one read-only SELECT/WITH statement",
    "sql_refs_exist": "every table and column the SQL names exists in the database",
    "sql_reads_table": "the SQL reads a table of the database and returns more than constants",
    "sql_executes": "the SQL executes within {timeout} s",
}
# A "statement" sqlglot reads as a bare expression (`SELEC x` parses as a column alias).
_BARE = (exp.Alias, exp.Condition, exp.Identifier, exp.Star)


@dataclass
class Verification:
    """The outcome of `verify`: each check that ran (True/False) and why the failed ones did."""

    passed: dict[str, bool] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    rows: list[tuple] | None = None  # the result, when the query executed

    @property
    def failure(self) -> str | None:
        """The first failed check, or None."""
        return next((c for c, ok in self.passed.items() if not ok), None)

    @property
    def ok(self) -> bool:
        return len(self.passed) == len(CHECKS) and all(self.passed.values())


def _returns_only_constants(query: exp.Expression) -> bool:
    if isinstance(query, exp.SetOperation):
        return _returns_only_constants(query.this) and _returns_only_constants(query.expression)
    if not isinstance(query, exp.Select):
        return False
    reads = (exp.Column, exp.Star, exp.AggFunc)
    return all(not any(isinstance(n, reads) for n in p.walk()) for p in query.expressions)


def reads_database(tree: exp.Expression, schema: dict[str, list[str]]) -> bool:
    """Whether a query reads at least one real table and returns more than constants
    (`SELECT 42`, or `SELECT 42 FROM t`, answers no question about the data)."""
    if not any(t.name.lower() in schema for t in tree.find_all(exp.Table)):
        return False
    root = tree.this if isinstance(tree, exp.With) else tree
    return not _returns_only_constants(root)


def verify(
    sql: str,
    db: Path | None,
    schema: dict[str, list[str]] | None,
    timeout_s: float,
    limits: SQLConfig | None = None,
) -> Verification:
    """The checks of CHECKS on one labelled query, each run only when the ones it depends on
    hold; without a database (`db`/`schema` None) only the first two run. A query naming a
    missing column is still executed (SQLite reads some as string literals: say both)."""
    v = Verification()

    def fail(check: str, why: str) -> Verification:
        v.passed[check], v.why[check] = False, why
        return v

    try:
        tree = parse(sql, limits)
    except UnsafeSQL as e:
        if "exactly one" not in str(e) or "got 0" in str(e):
            return fail("sql_parses", "not a SQL statement" if "got 0" in str(e) else str(e))
        tree = None  # parses, but as several statements: the guard names it
    except sqlglot.errors.ParseError as e:
        return fail("sql_parses", str(e).splitlines()[0] if str(e) else "does not parse")
    if isinstance(tree, _BARE):
        return fail("sql_parses", "not a SQL statement")
    v.passed["sql_parses"] = True
    try:
        guard(sql, limits)
    except UnsafeSQL as e:
        return fail("sql_read_only", str(e))
    v.passed["sql_read_only"] = True
    if db is None or schema is None or tree is None:
        return v
    missing = missing_refs(tree, schema)
    v.passed["sql_refs_exist"] = not missing
    if missing:
        v.why["sql_refs_exist"] = "not in the database: " + ", ".join(missing)
    v.passed["sql_reads_table"] = reads_database(tree, schema)
    if not v.passed["sql_reads_table"]:
        v.why["sql_reads_table"] = "reads no table of the database or returns only constants"
    result = execute(db, sql, timeout_s, limits=limits)
    v.passed["sql_executes"] = result.ok
    if not result.ok:
        v.why["sql_executes"] = result.error or ""
    else:
        v.rows = result.rows
    return v


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
