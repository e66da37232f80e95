"""Schema renaming: training examples whose tables and columns carry other names.

A small model trained on a handful of databases learns their column names by heart and then
writes them into queries over a database it has never seen (`date_joined` in a `matches`
table). Renaming a seeded share of the training examples' tables and columns, consistently in
the DDL and the gold SQL while the question stays as the user asked it, makes the names in the
DDL the only reliable source, so the model learns to read them. Train-time only: the records on
disk, their databases and the data contract are untouched.
"""

from __future__ import annotations

import random
import re

import sqlglot
from sqlglot import exp

from pipelines.data.schema_fit import schema_key

_CREATE = re.compile(r"CREATE TABLE\s+\"?(\w+)\"?\s*\((.*?)\);", re.S | re.I)
_CONSTRAINT = ("PRIMARY", "FOREIGN", "UNIQUE", "CHECK", "CONSTRAINT")
_KEYWORDS = {k.upper() for k in sqlglot.tokens.Tokenizer.KEYWORDS} | {"ORDER", "GROUP", "INDEX"}


def schema_names(ddl: str) -> tuple[list[str], list[str]]:
    """(tables, columns) declared by CREATE TABLE statements, in order of appearance."""
    tables, columns = [], []
    for name, body in _CREATE.findall(ddl):
        tables.append(name)
        for part in re.split(r",(?![^()]*\))", body):
            words = part.strip().split()
            if words and words[0].upper() not in _CONSTRAINT:
                col = words[0].strip('"')
                if col not in columns:
                    columns.append(col)
    return tables, columns


# Naming habits of real schemas that the synthetic domains do not all have: abbreviated words
# (`paid_amt`, `venue_nm`, `start_dt`), camelCase, prefixes. General database vocabulary, not
# any one domain's.
ABBREVIATIONS = {
    "account": "acct", "address": "addr", "amount": "amt", "average": "avg", "balance": "bal",
    "category": "cat", "class": "cls", "code": "cd", "count": "cnt", "created": "crt",
    "customer": "cust", "date": "dt", "department": "dept", "description": "descr",
    "employee": "emp", "first": "fst", "grade": "grd", "item": "itm", "last": "lst",
    "level": "lvl", "message": "msg", "month": "mon", "name": "nm", "number": "no",
    "order": "ord", "payment": "pmt", "phone": "tel", "price": "prc", "product": "prod",
    "quantity": "qty", "rating": "rtg", "salary": "sal", "status": "stts", "stock": "stk",
    "time": "tm", "title": "ttl", "total": "tot", "transaction": "txn", "type": "typ",
    "user": "usr", "value": "val", "year": "yr",
}  # fmt: skip


def _abbreviated(name: str) -> str | None:
    words = name.split("_")
    short = [ABBREVIATIONS.get(w, w) for w in words]
    return "_".join(short) if short != words else None


def _camel(name: str) -> str | None:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest) if rest else None


def _table_variants(t: str) -> list[str]:
    toggled = t[:-1] if t.endswith("s") else t + "s"
    out = [toggled, f"tbl_{t}", f"{t}_data", f"t_{t}"]
    return out + [v for v in (_abbreviated(t), _camel(t)) if v]


def _column_variants(c: str) -> list[str]:
    if c.endswith("_id"):
        stem = c[:-3]
        out = [f"{stem}_no", f"{stem}_key", f"{stem}id", f"{_camel(stem) or stem}Id"]
    else:
        out = [f"{c}_value", f"col_{c}"]
        if "_" in c:
            out.append(c.replace("_", ""))
    # An abbreviation twice: it is the habit most real schemas have.
    return out + [v for v in (_abbreviated(c), _abbreviated(c), _camel(c)) if v]


def rename_map(ddl: str, rng: random.Random, p_table: float, p_column: float) -> dict[str, str]:
    """A one-to-one renaming of some of the schema's tables and columns (no clashes)."""
    tables, columns = schema_names(ddl)
    taken = set(tables) | set(columns)
    mapping: dict[str, str] = {}
    for names, p, variants in (
        (tables, p_table, _table_variants),
        (columns, p_column, _column_variants),
    ):
        for name in names:
            if rng.random() >= p:
                continue
            options = [v for v in variants(name) if v not in taken and v.upper() not in _KEYWORDS]
            if options:
                mapping[name] = rng.choice(options)
                taken.add(mapping[name])
    return mapping


def rename_ddl(ddl: str, mapping: dict[str, str]) -> str:
    """Whole-word, case-sensitive renaming: schema names are lower case, SQL keywords and types
    upper case, so keywords are never touched."""
    if not mapping:
        return ddl
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
    return pattern.sub(lambda m: mapping[m.group(1)], ddl)


def rename_sql(sql: str, mapping: dict[str, str]) -> str:
    """Renames identifiers through the parse tree, so string literals stay as they are."""
    if not mapping:
        return sql

    def swap(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Identifier) and node.name in mapping:
            return exp.to_identifier(mapping[node.name], quoted=node.quoted)
        return node

    tree = sqlglot.parse_one(sql, read="sqlite")
    return tree.transform(swap).sql(dialect="sqlite")


def augment(
    records: list[dict],
    share: float,
    variants: int,
    seed: int,
    p_table: float,
    p_column: float,
) -> list[dict]:
    """Copies of `records` where a seeded `share` of them use one of `variants` renamed
    versions of their schema, each renaming a table with chance `p_table` and a column with
    chance `p_column`. Few variants per database keep batches of one DDL possible, so the train
    step still runs each batch's shared DDL prefix once."""
    if share <= 0 or variants <= 0:
        return records
    rng = random.Random(seed)
    renamings: dict[str, list[dict[str, str]]] = {}
    out = []
    for r in records:
        if rng.random() >= share:
            out.append(r)
            continue
        schema = schema_key(r["ddl"])  # one set of renamings per schema, linked values or not
        if schema not in renamings:
            renamings[schema] = [
                rename_map(schema, rng, p_table, p_column) for _ in range(variants)
            ]
        mapping = rng.choice(renamings[schema])
        try:
            sql = rename_sql(r["sql"], mapping)
        except sqlglot.errors.SqlglotError:
            out.append(r)
            continue
        out.append({**r, "ddl": rename_ddl(r["ddl"], mapping), "sql": sql})
    return out
