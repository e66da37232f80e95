"""What a SQLite database declares, read for prompts and checks: the prompt's DDL (`ddl_of`, one
compacted CREATE TABLE per line, optionally with the values of category columns), its tables and
columns (`schema_of`, `columns_of`). Opened read-only through `pipelines.sql`."""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from pathlib import Path

from pipelines.sql import connect_readonly


def compact_ddl(statement: str) -> str:
    """One CREATE TABLE on one line: indentation costs prompt tokens and tells the model nothing."""
    text = " ".join(statement.split())
    return text.replace("( ", "(").replace(" )", ")").rstrip(";")


def ddl_of(db_path: Path | str, sample_values: int = 0) -> str:
    """The CREATE TABLE statements of a database, in creation order, one per line (the
    prompt's DDL). With `sample_values` > 0, a text column holding at most that many distinct
    values lists them in a comment after its definition (`rarity TEXT /* 'Common' | 'Rare' */`),
    so a value the question names leads to its column even when the question's words for the
    column are not the schema's (a Korean question over English names)."""
    with closing(connect_readonly(db_path)) as conn:
        rows = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL "
            "AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
        ).fetchall()
        statements = [
            _with_values(compact_ddl(sql), _text_values(conn, table, sample_values))
            if sample_values > 0
            else compact_ddl(sql)
            for table, sql in rows
        ]
    return "\n".join(f"{s};" for s in statements)


_VALUE_SCAN_ROWS = 10_000  # rows read per column for its values: bounded on a large table
_MAX_VALUE_CHARS = 40


def _text_values(conn: sqlite3.Connection, table: str, k: int) -> dict[str, list[str]]:
    """Column → its distinct values, most frequent first, for the text columns of `table` with
    at most `k` distinct short values among the first rows (categories, not names or emails)."""
    out = {}
    quoted_table = '"' + table.replace('"', '""') + '"'
    for col in conn.execute(f"PRAGMA table_info({quoted_table})").fetchall():
        name = '"' + col[1].replace('"', '""') + '"'
        values = conn.execute(
            f"SELECT {name} FROM (SELECT {name} FROM {quoted_table} LIMIT {_VALUE_SCAN_ROWS}) "
            f"WHERE {name} IS NOT NULL GROUP BY {name} ORDER BY COUNT(*) DESC, {name} "
            f"LIMIT {k + 1}"
        ).fetchall()
        values = [v[0] for v in values]
        if (
            0 < len(values) <= k
            and all(isinstance(v, str) and 0 < len(v) <= _MAX_VALUE_CHARS for v in values)
            and not any(bad in v for v in values for bad in ("*/", "/*", "\n", ",", ";"))
        ):
            out[col[1]] = values
    return out


def _with_values(statement: str, values: dict[str, list[str]]) -> str:
    """`statement` (one compacted CREATE TABLE) with each listed column's values in a comment
    after its definition; the comment holds no comma or semicolon, so the DDL still splits."""
    if not values:
        return statement
    start, end = statement.find("("), statement.rfind(")")
    parts, depth, last = [], 0, start + 1
    for i in range(start + 1, end):
        ch = statement[i]
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(statement[last:i].strip())
            last = i + 1
    parts.append(statement[last:end].strip())
    for i, part in enumerate(parts):
        name = part.split()[0].strip('"`[]') if part else ""
        if name in values:
            listed = " | ".join("'" + v.replace("'", "''") + "'" for v in values[name])
            parts[i] = f"{part} /* {listed} */"
    return f"{statement[: start + 1]}{', '.join(parts)}{statement[end:]}"


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


def schema_hash(conn: sqlite3.Connection) -> str:
    """Hash of everything the database declares (its sqlite_master)."""
    text = repr(conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall())
    return hashlib.sha256(text.encode()).hexdigest()[:16]
