"""How a synthetic domain is described: tables, typed columns, keys, how users name them.

`pipelines.data.domains` holds the domains written with these types; `pipelines.data.synth` builds
a SQLite database from them, and the question patterns pick columns by role and name them in
Korean and English, so adding a domain is data, not code.

Column roles drive the patterns:
  pk / fk  keys (fk columns reference another table's pk and become JOIN paths)
  name     the text that identifies a row to a user (username, title): equality, LIKE
  cat      a category with few values: =, IN, GROUP BY
  num      a number: comparisons, BETWEEN, aggregates, ORDER BY
  date     a DATE or TIMESTAMP: year / month ranges, ordering
  text     shown but never filtered on (email, phone, password hash)

Value generators (`gen`) are listed where they are evaluated, in `synth.column_value`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str  # declared type in CREATE TABLE: INTEGER, REAL, TEXT, DATE, TIMESTAMP
    role: str  # pk, fk, name, cat, num, date, text (see above)
    ko: str = ""  # how a Korean user names it ("가입일"); keys are named after their table
    en: str = ""  # how an English user names it ("join date")
    gen: tuple = ()  # value generator (see synth.column_value)
    ref: str | None = None  # referenced table, for role fk
    null: float = 0.0  # share of NULLs; nullable columns feed the IS NULL patterns
    summable: bool = True  # a total means something (amounts, hours), unlike a year or a rating


@dataclass(frozen=True)
class Table:
    name: str
    ko: str  # "플레이어"
    en: str  # "player"
    en_plural: str  # "players"
    counter: str  # Korean counter word for "how many" questions: 명, 개, 건, 권 ...
    rows: int  # 20-200
    columns: tuple[Column, ...]
    person: bool = False  # rows are people ("누구야?", "who")

    @property
    def pk(self) -> Column:
        return next(c for c in self.columns if c.role == "pk")

    @property
    def display(self) -> Column:
        """The column a user would want to see to recognise a row (else its id)."""
        return next((c for c in self.columns if c.role == "name"), self.pk)

    def cols(self, *roles: str) -> list[Column]:
        return [c for c in self.columns if c.role in roles]


@dataclass(frozen=True)
class Domain:
    name: str  # also the db_id
    tables: tuple[Table, ...]  # parents before children (insert order)

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)


def pk(name: str) -> Column:
    return Column(name, "INTEGER", "pk")


def fk(name: str, ref: str) -> Column:
    return Column(name, "INTEGER", "fk", ref=ref)


def name(col: str, ko: str, en: str, gen: tuple) -> Column:
    return Column(col, "TEXT", "name", ko, en, gen)


def text(col: str, ko: str, en: str, gen: tuple, null: float = 0.0) -> Column:
    return Column(col, "TEXT", "text", ko, en, gen, null=null)


def cat(col: str, ko: str, en: str, values: str, weights: str = "", null: float = 0.0) -> Column:
    gen = ("choice", values, weights) if weights else ("choice", values)
    return Column(col, "TEXT", "cat", ko, en, gen, null=null)


def city(col: str, ko: str, en: str, null: float = 0.0) -> Column:
    return Column(col, "TEXT", "cat", ko, en, ("city",), null=null)


def num(col: str, ko: str, en: str, gen: tuple, sums: bool = True) -> Column:
    sql_type = "REAL" if gen[0] == "real" else "INTEGER"
    return Column(col, sql_type, "num", ko, en, gen, summable=sums)


def date(col: str, ko: str, en: str, gen: tuple, null: float = 0.0, time: bool = False) -> Column:
    return Column(col, "TIMESTAMP" if time else "DATE", "date", ko, en, gen, null=null)
