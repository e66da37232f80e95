"""Join keys a SQLite database does not declare, inferred from names and stored values
(`inferred_joins`): the prompt lists them (`-- join (inferred): ...`), the schema grammar and the
schema fit use them as foreign keys. Opened read-only through `pipelines.sql`."""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from pipelines.db_schema import schema_hash
from pipelines.sql import connect_readonly

# CSV imports, Kaggle files and dumps declare no foreign keys, so neither the prompt nor the
# schema grammar knew any join. `inferred_joins` proposes one key per pair of tables with no
# declared key between them, from four signs, each checked against the stored values:
#
# - the same key-like column name in both tables (`state_code`, `StuID`; a name ending in
#   _id/_code/_key/_no/_num, camelCase split), unless both columns are keys to one third table
#   (two children of `customers` are siblings, not a join);
# - a naming convention: `orders.customer_id` (or `CustID`) -> `customers.customer_id`, its
#   primary key or `customers.id`, the stem naming the table (plural, prefix `stu` -> student);
# - value overlap alone, for text-valued key-like columns: nearly all sampled values of
#   `a.x` are values of a unique key-like `b.y` (integer ids 1..n overlap by chance, so not them);
# - a lookup: the same text column name in both tables (`state` holding state names), unique in
#   one of them, which holds at least 80% of the other's sampled values.
#
# Generic attribute names (`name`, `title`, `date`, `type`, `status`, ...), numbers (`year` vs
# `year`) and bare `id` are never joined: two tables that both have a `year` share an attribute,
# not a key. A name-based candidate whose sampled values never meet the other column's is
# dropped (an empty table keeps it on names).
# The result is cached by the schema's hash and the file's size and mtime.

KEY_SUFFIXES = ("id", "code", "key", "no", "num", "number")
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CAMEL_SPLIT = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_OVERLAP_SAMPLE = 200  # distinct values of a column checked against the other column
_OVERLAP_SCAN_ROWS = 200_000  # rows of the other column scanned for them
_MIN_OVERLAP = 0.2  # a name-based key needs this share of sampled values found on one side
_MIN_VALUE_OVERLAP = 0.9  # a key found by values alone needs this share
_MIN_LOOKUP_OVERLAP = 0.8  # a lookup column holds this share of the other column's values
_MAX_INFERRED = 40  # keys per database (the grammar's join scopes grow with them)
# Attribute names that two tables share without being a key, however their values overlap.
_GENERIC_TEXT = (
    "name names title description descr comment comments note notes remarks text date time "
    "type kind status category gender sex label value amount price total count"
)
GENERIC_NAMES = frozenset(_GENERIC_TEXT.split())


@dataclass(frozen=True)
class InferredJoin:
    table: str  # the referencing side (the child), as the DDL spells it
    column: str
    ref_table: str  # the referenced side (a primary key or the earlier table)
    ref_column: str
    how: str  # "name" (same key-like name), "convention" (x_id -> x), "values", "lookup"

    def line(self) -> str:
        """The prompt's DDL line for this key (schema_fit keeps and reads it)."""
        return f"{JOIN_PREFIX}{self.table}.{self.column} = {self.ref_table}.{self.ref_column}"


JOIN_PREFIX = "-- join (inferred): "


def _snake(name: str) -> str:
    return _CAMEL_SPLIT.sub("_", name).lower()


def key_parts(column: str) -> tuple[str, str] | None:
    """(stem, suffix) of a key-like column name (`customer_id` -> customer/id, `StuID` ->
    stu/id); None for an attribute name. A bare `id` has the stem ''."""
    name = _snake(column)
    for suffix in KEY_SUFFIXES:
        if name == suffix:
            return "", suffix
        if name.endswith("_" + suffix):
            return name[: -len(suffix) - 1], suffix
    return None


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ses", "xes", "ches", "shes")):
        return word[:-2]
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


def _names_table(stem: str, table: str) -> int:
    """How well a key's stem names a table: 2 the same word (`customer` -> customers), 1 an
    abbreviation of a one-word name (`stu` -> student) or the name's last word (`customer` ->
    dim_customer), 0 not."""
    t = _singular(_snake(table))
    if stem in (t, _snake(table)):
        return 2
    if len(stem) >= 3 and (("_" not in t and t.startswith(stem)) or t.endswith("_" + stem)):
        return 1
    return 0


@dataclass(frozen=True)
class _Column:
    table: str
    name: str
    pk: bool  # the table's only primary-key column


def _declared(conn: sqlite3.Connection, tables: list[str]) -> tuple[set, set]:
    """(unordered table pairs linked by a declared foreign key, (table, column) -> referenced
    (table, column) of the declared single-column keys, lower-cased)."""
    pairs, refs = set(), {}
    for t in tables:
        for fk in conn.execute(f"PRAGMA foreign_key_list({_quote(t)})"):
            pairs.add(frozenset((t.lower(), fk[2].lower())))
            refs[(t.lower(), fk[3].lower())] = (fk[2].lower(), (fk[4] or "").lower())
    return pairs, refs


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sample(conn: sqlite3.Connection, c: _Column) -> list:
    col, table = _quote(c.name), _quote(c.table)
    return [
        r[0]
        for r in conn.execute(
            f"SELECT DISTINCT v FROM (SELECT {col} AS v FROM {table} LIMIT 10000) "
            f"WHERE v IS NOT NULL LIMIT {_OVERLAP_SAMPLE}"
        )
    ]


def _found(conn: sqlite3.Connection, values: list, c: _Column) -> float:
    """Share of `values` stored in column `c` (its first rows, bounded)."""
    if not values:
        return 0.0
    marks = ",".join("?" * len(values))
    col, table = _quote(c.name), _quote(c.table)
    hits = conn.execute(
        f"SELECT COUNT(DISTINCT v) FROM (SELECT {col} AS v FROM {table} "
        f"LIMIT {_OVERLAP_SCAN_ROWS}) WHERE v IN ({marks})",
        values,
    ).fetchone()[0]
    return hits / len(values)


def _overlap(conn: sqlite3.Connection, a: _Column, b: _Column, samples: dict) -> float | None:
    """The larger share of either column's sampled values found in the other; None when one
    of them holds no values (nothing to check: the names decide)."""
    for c in (a, b):
        if c not in samples:
            samples[c] = _sample(conn, c)
    if not samples[a] or not samples[b]:
        return None
    return max(_found(conn, samples[a], b), _found(conn, samples[b], a))


def _read_columns(conn: sqlite3.Connection) -> dict[str, list[_Column]]:
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
        )
    ]
    out = {}
    for t in tables:
        info = list(conn.execute(f"PRAGMA table_info({_quote(t)})"))
        n_pk = sum(1 for c in info if c[5])
        out[t] = [_Column(t, c[1], bool(c[5]) and n_pk == 1) for c in info]
    return out


def _candidates(columns: dict[str, list[_Column]], refs: dict) -> list[tuple]:
    """(child, parent, how, rank) by names: conventions first, then same names (rank 0 best)."""
    found = []
    parent_of = {}  # column -> the column it names by convention
    declared = {
        c for cols in columns.values() for c in cols if (c.table.lower(), c.name.lower()) in refs
    }
    for t, cols in columns.items():
        for c in cols:
            parts = key_parts(c.name)
            if c in declared or not parts or not parts[0] or _names_table(parts[0], t):
                continue  # declared, not a key, or the table's own key (`customers.customer_id`)
            stem, suffix = parts
            tables = sorted(
                ((_names_table(stem, o), o) for o in columns if o != t), key=lambda x: -x[0]
            )
            best = tables[0][0] if tables else 0
            if best == 0 or (len(tables) > 1 and tables[1][0] == best):
                continue  # no table named, or two alike
            other = tables[0][1]
            target = (
                next((o for o in columns[other] if _snake(o.name) == _snake(c.name)), None)
                or next((o for o in columns[other] if o.pk), None)
                or next((o for o in columns[other] if _snake(o.name) == suffix), None)
            )
            if target is not None:
                found.append((c, target, "convention", 2 - tables[0][0]))
                parent_of.setdefault(c, (target.table.lower(), target.name.lower()))
    names = list(columns)
    for i, ta in enumerate(names):
        for tb in names[i + 1 :]:
            for a in columns[ta]:
                parts = key_parts(a.name)
                if not parts or not parts[0]:
                    continue
                b = next((o for o in columns[tb] if o.name.lower() == a.name.lower()), None)
                if b is None or a in declared or b in declared:
                    continue  # a declared key says what its column refers to
                if parent_of.get(a) and parent_of.get(a) == parent_of.get(b):
                    continue  # siblings: both keys to one third table
                child, parent = (a, b) if b.pk and not a.pk else (b, a)
                found.append((child, parent, "name", 0))
    return found


def _by_values(conn, columns, samples, linked, refs) -> list[tuple]:
    """Undeclared key-like columns holding codes (text, not digits) whose sampled values nearly
    all lie in a unique key-like column of another table that no other key links them to."""
    found = []
    keys = [c for cols in columns.values() for c in cols if key_parts(c.name) or c.pk]
    for a in keys:
        if not (key_parts(a.name) or ("",))[0] or (a.table.lower(), a.name.lower()) in refs:
            continue
        for b in keys:
            pair = frozenset((a.table.lower(), b.table.lower()))
            if b.table == a.table or pair in linked or not b.pk:
                continue
            for c in (a, b):
                if c not in samples:
                    samples[c] = _sample(conn, c)
            values = samples[a]
            if len(values) < 5 or not all(isinstance(v, str) and not v.isdigit() for v in values):
                continue
            if _found(conn, values, b) >= _MIN_VALUE_OVERLAP:
                found.append((a, b, "values", 3))
    return found


def _unique(conn: sqlite3.Connection, c: _Column) -> bool:
    """Whether the column's values (its first rows) are distinct: at least 3, no repeat."""
    col, table = _quote(c.name), _quote(c.table)
    n, distinct = conn.execute(
        f"SELECT COUNT(v), COUNT(DISTINCT v) FROM (SELECT {col} AS v FROM {table} LIMIT 10000)"
    ).fetchone()
    return n >= 3 and n == distinct


def _by_lookup(conn, columns, samples, linked) -> list[tuple]:
    """Same-named text columns (not key-like, not generic) where one is unique in its table and
    holds most of the other's sampled values: a lookup table's natural key (`state`)."""
    found = []
    names = list(columns)
    for i, ta in enumerate(names):
        for tb in names[i + 1 :]:
            if frozenset((ta.lower(), tb.lower())) in linked:
                continue
            for a in columns[ta]:
                b = next((o for o in columns[tb] if o.name.lower() == a.name.lower()), None)
                if b is None or key_parts(a.name) or _snake(a.name) in GENERIC_NAMES:
                    continue
                for c in (a, b):
                    if c not in samples:
                        samples[c] = _sample(conn, c)
                if not all(
                    samples[c] and all(isinstance(v, str) and not v.isdigit() for v in samples[c])
                    for c in (a, b)
                ):
                    continue
                for child, parent in ((a, b), (b, a)):
                    if _unique(conn, parent) and (
                        _found(conn, samples[child], parent) >= _MIN_LOOKUP_OVERLAP
                    ):
                        found.append((child, parent, "lookup", 4))
                        break
    return found


_JOIN_CACHE: dict[tuple, tuple[InferredJoin, ...]] = {}


def inferred_joins(db_path: Path | str) -> tuple[InferredJoin, ...]:
    """The join keys the database does not declare (see above), at most one per pair of tables
    with no declared key between them, best first; cached by schema hash and file stamp."""
    st = Path(db_path).stat()
    with closing(connect_readonly(db_path)) as conn:
        key = (schema_hash(conn), st.st_size, st.st_mtime_ns)
        if key not in _JOIN_CACHE:
            _JOIN_CACHE[key] = _infer(conn)
    return _JOIN_CACHE[key]


def _infer(conn: sqlite3.Connection) -> tuple[InferredJoin, ...]:
    columns = {  # plain names only: the prompt line and the grammar write them bare
        t: [c for c in cols if _PLAIN.match(c.name)]
        for t, cols in _read_columns(conn).items()
        if _PLAIN.match(t)
    }
    linked, refs = _declared(conn, list(columns))  # pairs with a key: no other is inferred
    samples: dict = {}
    out = []
    for child, parent, how, _ in sorted(_candidates(columns, refs), key=lambda x: x[3]):
        pair = frozenset((child.table.lower(), parent.table.lower()))
        if pair in linked:
            continue
        overlap = _overlap(conn, child, parent, samples)
        if overlap is not None and overlap < _MIN_OVERLAP:
            continue
        if how == "name" and not parent.pk and _unique(conn, child) and not _unique(conn, parent):
            child, parent = parent, child  # the unique side is the one referred to
        linked.add(pair)
        out.append(InferredJoin(child.table, child.name, parent.table, parent.name, how))
    for child, parent, how, _ in _by_values(conn, columns, samples, set(linked), refs):
        pair = frozenset((child.table.lower(), parent.table.lower()))
        if pair not in linked:
            linked.add(pair)
            out.append(InferredJoin(child.table, child.name, parent.table, parent.name, how))
    for child, parent, how, _ in _by_lookup(conn, columns, samples, set(linked)):
        pair = frozenset((child.table.lower(), parent.table.lower()))
        if pair not in linked:
            linked.add(pair)
            out.append(InferredJoin(child.table, child.name, parent.table, parent.name, how))
    return tuple(out[:_MAX_INFERRED])
