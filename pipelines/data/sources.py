"""Importers for the `prepare` stage: each turns one source into canonical example records.

A source is one entry of `data.sources` in params.yaml:

- `synthetic`: the `synth` stage's `examples.jsonl` + `databases/<db_id>.sqlite`.
- `jsonl`: a JSONL or CSV file in the seed book's columns `db_id, context,
  question, answer` (`sql`/`ddl` are accepted too), optionally `id, lang, difficulty, domain`.
  Extra keys: `databases` (folder of `<db_id>.sqlite`; without it, or for a db_id missing there,
  an empty database is built from the rows' DDL so the SQL can still be checked) and `domains`
  (db_id → domain name; else the `domain` column, else the db_id).
- `feedback`: the folder `pipelines.monitoring.feedback` writes (`feedback.jsonl` of verified
  corrections from the inference log + `databases/`), read like `jsonl`; absent or empty until
  feedback arrives, which gives no records (so the source can be listed before then).
- `teacher`: the folder `pipelines.monitoring.teacher` writes (`teacher.jsonl` of verified teacher
  labels of doubtful traffic + `databases/`), read like `feedback`.
- `spider`: a Spider folder (`dev.json` and/or `train_spider.json`, `database/<db>/<db>.sqlite`).
  `tables.json` is not needed: the DDL is read from each SQLite file. A database that is missing
  (or is no SQLite file) is named in the log and its questions are skipped. The SQL is read as
  SQLite reads it: a double-quoted token that names no column of the query's tables is a string
  and is stored in single quotes (`sql.single_quote_strings`), so Spider's `name = "Bob"` meets
  the data contract unedited. `synonyms: true` adds each question's Spider-Syn phrasing
  (`question_synonyms`, where it differs) as a second example (source `spider-syn`).

A record whose db_id breaks the one db_id rule (`records.valid_db_id`: it names a file) is
dropped by name whatever the source, before any path is built from it.

Importers fill what they can; `prepare` fills the DDL from the database where a source has
none, copies the databases, de-duplicates and splits.
"""

from __future__ import annotations

import csv
import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlglot
from sqlglot import exp

from pipelines.config import SourceConfig, resolve
from pipelines.data.records import detect_lang, read_jsonl, valid_db_id
from pipelines.db_schema import schema_of
from pipelines.sql import parse, single_quote_strings

log = logging.getLogger(__name__)


@dataclass
class Imported:
    records: list[dict] = field(default_factory=list)  # canonical fields except `split`
    # db_id → SQLite file to copy, or None where the database must be built from the DDL
    databases: dict[str, Path | None] = field(default_factory=dict)


def difficulty_of(sql: str) -> str:
    """Spider-style hardness (easy/medium/hard/extra) from the shape of the query.

    Follows the Spider evaluation script's counts on the outermost SELECT: clauses (WHERE,
    GROUP BY, ORDER BY, LIMIT, joins, OR, LIKE), nesting (subqueries, set operations) and
    "others" (several aggregates, select columns, conditions or group keys).
    """
    try:
        tree = parse(sql)
    except (sqlglot.errors.ParseError, ValueError):
        return "extra"  # unparseable: validation will reject it anyway
    main = tree
    while isinstance(main, exp.SetOperation):
        main = main.this
    # Each set operation and each SELECT that is not a set operation's operand (subqueries,
    # CTEs, derived tables) counts as one level of nesting.
    nested = sum(1 for _ in tree.find_all(exp.SetOperation)) + sum(
        1
        for s in tree.find_all(exp.Select)
        if s is not main and not isinstance(s.parent, exp.SetOperation)
    )
    if not isinstance(main, exp.Select):
        return "extra"
    # Only the outermost query's own nodes count for the clause and "others" figures.
    own = list(main.walk(prune=lambda n: n is not main and isinstance(n, exp.Query)))
    where = main.args.get("where")
    conditions = sum(isinstance(n, (exp.And, exp.Or)) for n in where.walk()) + 1 if where else 0
    clauses = sum(
        [
            where is not None,
            main.args.get("group") is not None,
            main.args.get("order") is not None,
            main.args.get("limit") is not None,
            len(main.args.get("joins") or []),
            sum(isinstance(n, exp.Or) for n in own),
            sum(isinstance(n, exp.Like) for n in own),
        ]
    )
    group = main.args.get("group")
    others = sum(
        [
            sum(isinstance(n, exp.AggFunc) for n in own) > 1,
            len(main.expressions) > 1,
            conditions > 1,
            group is not None and len(group.expressions) > 1,
        ]
    )
    if clauses <= 1 and others == 0 and nested == 0:
        return "easy"
    if nested == 0 and ((others <= 2 and clauses <= 1) or (clauses <= 2 and others < 2)):
        return "medium"
    if (
        (others > 2 and clauses <= 2 and nested == 0)
        or (2 < clauses <= 3 and others <= 2 and nested == 0)
        or (clauses <= 1 and others == 0 and nested <= 1)
    ):
        return "hard"
    return "extra"


def build_db_from_ddl(ddls: list[str], path: Path) -> int:
    """Create an empty SQLite database from CREATE TABLE statements (any dialect sqlglot reads;
    the seed book's are MySQL-flavoured). The first definition of a table wins. Returns the
    number of tables created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created: set[str] = set()
    with sqlite3.connect(path) as conn:
        for ddl in ddls:
            for statement in _create_tables(ddl):
                name = statement.find(exp.Table)
                key = name.name.lower() if name else ""
                if not key or key in created:
                    continue
                try:
                    conn.execute(statement.sql(dialect="sqlite"))
                    created.add(key)
                except sqlite3.Error as e:
                    log.warning("%s: skipped a table of the DDL (%s)", path.name, e)
    return len(created)


def _create_tables(ddl: str) -> list[exp.Create]:
    for dialect in ("mysql", "sqlite"):
        try:
            trees = sqlglot.parse(ddl, read=dialect)
        except sqlglot.errors.SqlglotError:
            continue
        return [t for t in trees if isinstance(t, exp.Create) and t.kind == "TABLE"]
    return []


def _rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    return read_jsonl(path)


def _blank(v: object) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def load_synthetic(src: SourceConfig, synthetic_dir: Path) -> Imported:
    root = resolve(src.path) if src.path else synthetic_dir
    out = Imported()
    for r in read_jsonl(root / "examples.jsonl"):
        db = root / "databases" / f"{r['db_id']}.sqlite"
        out.databases[str(r["db_id"])] = db
        out.records.append(
            {
                "id": str(r["id"]),
                "db_id": str(r["db_id"]),
                "domain": r.get("domain") or str(r["db_id"]),
                "lang": r.get("lang") or detect_lang(r["question"]),
                "question": r["question"],
                "sql": r["sql"],
                "ddl": r.get("ddl") or "",
                "difficulty": r.get("difficulty") or difficulty_of(r["sql"]),
                "source": r.get("source") or "synthetic",
            }
        )
    return out


def load_jsonl(src: SourceConfig, synthetic_dir: Path) -> Imported:
    if src.path is None:
        raise ValueError(f"a `{src.type}` source needs `path`")
    path = resolve(src.path)
    extra = src.model_extra or {}
    db_dir = resolve(extra["databases"]) if extra.get("databases") else None
    domains = {str(k): v for k, v in (extra.get("domains") or {}).items()}
    out = Imported()
    for i, r in enumerate(_rows(path)):
        db_id = str(r["db_id"])
        sql = r.get("answer") or r.get("sql") or ""
        question = r.get("question") or ""
        db = db_dir / f"{db_id}.sqlite" if db_dir else None
        out.databases[db_id] = db if db and db.is_file() else None
        out.records.append(
            {
                "id": str(r.get("id") or f"{path.stem}-{i:06d}"),
                "db_id": db_id,
                "domain": r.get("domain") or domains.get(db_id) or db_id,
                "lang": r.get("lang") or detect_lang(question),
                "question": question,
                "sql": sql,
                "ddl": r.get("context") or r.get("ddl") or "",
                "difficulty": r.get("difficulty") or difficulty_of(sql),
                "source": src.type if src.type in ("feedback", "teacher") else path.stem,
            }
        )
    missing = sorted(k for k, v in out.databases.items() if v is None)
    if missing:
        log.warning(
            "%s: no database for %d db_id(s); building empty ones from the DDL: %s",
            path.name,
            len(missing),
            ", ".join(missing[:10]),
        )
    return out


def load_spider(src: SourceConfig, synthetic_dir: Path) -> Imported:
    if src.path is None:
        raise ValueError("a `spider` source needs `path` (the Spider folder)")
    root = resolve(src.path)
    files = [root / n for n in ("train_spider.json", "dev.json") if (root / n).is_file()]
    if not files:
        raise FileNotFoundError(f"no train_spider.json or dev.json in {root}")
    out, missing, unsafe = Imported(), {}, set()
    schemas: dict[str, dict[str, list[str]]] = {}
    for f in files:
        for i, r in enumerate(json.loads(f.read_text(encoding="utf-8"))):
            if not valid_db_id(r["db_id"]):
                unsafe.add(str(r["db_id"]))  # no path is built from it
                continue
            db = root / "database" / r["db_id"] / f"{r['db_id']}.sqlite"
            if not _is_sqlite(db):
                missing.setdefault(r["db_id"], []).append(f"{f.stem}[{i}]")
                continue
            out.databases[r["db_id"]] = db
            if r["db_id"] not in schemas:
                schemas[r["db_id"]] = schema_of(db)
            sql = single_quote_strings(r["query"], schemas[r["db_id"]])
            record = {
                "id": f"spider-{f.stem}-{i:05d}",
                "db_id": r["db_id"],
                "domain": r["db_id"],
                "lang": detect_lang(r["question"]),
                "question": r["question"],
                "sql": sql,
                "ddl": "",
                "difficulty": difficulty_of(sql),
                "source": "spider",
            }
            out.records.append(record)
            synonym = (r.get("question_synonyms") or "").strip()
            if src.synonyms and synonym and synonym != r["question"].strip():
                syn = {"id": f"{record['id']}-syn", "question": synonym, "source": "spider-syn"}
                out.records.append(record | syn)
    for db_id, questions in sorted(missing.items()):
        log.warning(
            "spider: database %s is missing (no SQLite file at database/%s/%s.sqlite); "
            "skipped its %d question(s): %s",
            db_id, db_id, db_id, len(questions), ", ".join(questions[:10]),
        )  # fmt: skip
    _warn_unsafe("spider", unsafe)
    return out


def _warn_unsafe(source: str, db_ids: set[str]) -> None:
    if db_ids:
        log.warning(
            "source %s: dropped the examples of db_id(s) that cannot name a file: %s",
            source,
            ", ".join(repr(d) for d in sorted(db_ids)[:10]),
        )


def _is_sqlite(path: Path) -> bool:
    """A real SQLite file: an empty or foreign file would become a database with no tables."""
    try:
        with path.open("rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def load_feedback(src: SourceConfig, synthetic_dir: Path) -> Imported:
    """A `feedback` or `teacher` folder: `<type>.jsonl` + `databases/`."""
    if src.path is None:
        raise ValueError(f"a `{src.type}` source needs `path` (the {src.type} folder)")
    root = resolve(src.path)
    path = root if root.suffix in (".jsonl", ".csv") else root / f"{src.type}.jsonl"
    if not path.is_file():
        log.info("%s: no %s yet, no examples", src.type, path)
        return Imported()
    extra = {"databases": path.parent / "databases", **(src.model_extra or {})}
    return load_jsonl(SourceConfig(type=src.type, path=path, **extra), synthetic_dir)


IMPORTERS: dict[str, Callable[[SourceConfig, Path], Imported]] = {
    "synthetic": load_synthetic,
    "jsonl": load_jsonl,
    "feedback": load_feedback,
    "teacher": load_feedback,  # the same folder layout (pipelines/monitoring/teacher.py)
    "spider": load_spider,
}


def load(src: SourceConfig, synthetic_dir: Path) -> Imported:
    """Records and databases of one source, with every canonical field but `split`."""
    imported = IMPORTERS[src.type](src, synthetic_dir)
    unsafe = {str(r["db_id"]) for r in imported.records if not valid_db_id(r["db_id"])}
    if unsafe:
        _warn_unsafe(src.type, unsafe)
        imported.records = [r for r in imported.records if valid_db_id(r["db_id"])]
        imported.databases = {k: v for k, v in imported.databases.items() if valid_db_id(k)}
    for r in imported.records:
        for k in ("question", "sql", "ddl"):
            r[k] = "" if _blank(r[k]) else str(r[k]).strip()
        # One canonical form: no trailing `;` (the prompt's completion adds exactly one).
        r["sql"] = r["sql"].rstrip(";").strip()
    log.info(
        "source %s: %d examples, %d databases",
        src.type,
        len(imported.records),
        len(imported.databases),
    )
    return imported
