"""The `synth` stage: multi-domain synthetic Text2SQL data with executable SQLite databases.

For each domain in `pipelines.data.domains` it builds `databases/<domain>.sqlite` (typed tables,
primary and foreign keys, Korean and English Faker values), then samples question/SQL pairs from
the patterns in `patterns_table` and `patterns_join` with values taken from the rows. Every gold
query is executed through `pipelines.sql.execute`: queries that fail are dropped, and queries with
an empty result are kept only up to `synth.max_empty_share` of a domain. The mix of
difficulties is `synth.difficulty_weights`. Everything is deterministic for a seed.

Run as the DVC stage `synth` (`python -m pipelines.data.synth`) or call `run()` directly.
Output: `<out_dir>/examples.jsonl` (id, db_id, domain, lang, question, sql, difficulty, source)
and `<out_dir>/databases/`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import shutil
import sqlite3
import time
import zlib
from collections import Counter
from contextlib import closing
from datetime import date, datetime, timedelta
from itertools import accumulate
from pathlib import Path

from faker import Faker

from pipelines import sql as sqlmod
from pipelines.config import SynthConfig, load_params, setup_entry_point
from pipelines.data.domains import DOMAINS
from pipelines.data.patterns import Pattern, Sampler
from pipelines.data.patterns_join import JOIN_PATTERNS
from pipelines.data.patterns_set import SET_PATTERNS
from pipelines.data.patterns_table import TABLE_PATTERNS
from pipelines.data.records import DIFFICULTIES, write_jsonl
from pipelines.data.schema import Column, Domain, Table

log = logging.getLogger(__name__)

PATTERNS: tuple[Pattern, ...] = (*TABLE_PATTERNS, *JOIN_PATTERNS, *SET_PATTERNS)
LANGS = ("ko", "en")
SQL_TIMEOUT_S = 2.0
MAX_ATTEMPTS_PER_EXAMPLE = 40  # give up on a domain whose patterns cannot produce more variety
LOCALES = {"ko": "ko_KR", "en": "en_US"}
DATA_END = date(2024, 12, 31)  # "today" of the synthetic world: no logins from the future
CITIES = {
    "ko": ("서울", "부산", "인천", "대구", "대전", "광주", "수원", "울산", "제주", "창원"),
    "en": (
        "New York",
        "Los Angeles",
        "Chicago",
        "Houston",
        "Seattle",
        "Boston",
        "Denver",
        "Atlanta",
        "San Francisco",
        "Miami",
    ),
}


def _seed(seed: int, *parts: str) -> int:
    # A stable seed per (seed, domain, purpose); Python's hash() is salted per process.
    return zlib.crc32(":".join([str(seed), *parts]).encode())


# --- databases -----------------------------------------------------------------------------------


def create_table_sql(domain: Domain, table: Table) -> str:
    """A readable CREATE TABLE with typed columns, NOT NULL, primary and foreign keys."""
    lines = []
    for c in table.columns:
        if c.role == "pk":
            lines.append(f"    {c.name} INTEGER PRIMARY KEY")
        else:
            lines.append(f"    {c.name} {c.sql_type}{'' if c.null else ' NOT NULL'}")
    for c in table.cols("fk"):
        parent = domain.table(c.ref or "")
        lines.append(f"    FOREIGN KEY ({c.name}) REFERENCES {parent.name} ({parent.pk.name})")
    return f"CREATE TABLE {table.name} (\n" + ",\n".join(lines) + "\n)"


def _random_day(rng: random.Random, first_year: int, last_year: int) -> date:
    start = date(first_year, 1, 1)
    return start + timedelta(days=rng.randrange((date(last_year, 12, 31) - start).days + 1))


def _as_time(day: date, rng: random.Random, timestamp: bool) -> str:
    if not timestamp:
        return day.isoformat()
    moment = datetime(day.year, day.month, day.day) + timedelta(seconds=rng.randrange(86_400))
    return moment.isoformat(sep=" ")


def column_value(
    col: Column, row: dict, locale: str, rng: random.Random, fakers: dict[str, Faker]
) -> object:
    """One value of a column for a row in a locale ("ko" / "en"), from its generator `col.gen`:

    ("faker", method)                   a Faker provider method of the row's locale
    ("city",)                           a real city of the row's locale
    ("combo", ko_a, ko_b, en_a, en_b)   "<a> <b>" from space-separated words of the locale
    ("choice", "A,B,C"[, "5,3,1"])      a category, optionally weighted
    ("int", lo, hi[, step]) / ("real", lo, hi, digits)
    ("date", first_year, last_year) / ("time", ...)   a day or a moment in those years
    ("after", column, min_days, max_days)              that many days after another column
    ("hash",)                           a sha256-looking hex string
    """
    kind, *args = col.gen
    timestamp = col.sql_type == "TIMESTAMP"
    if kind == "faker":
        return getattr(fakers[locale], args[0])()
    if kind == "city":
        return rng.choice(CITIES[locale])
    if kind == "combo":
        first, second = (args[0], args[1]) if locale == "ko" else (args[2], args[3])
        words = [rng.choice(first.split())] if first else []
        return " ".join([*words, rng.choice(second.split())])
    if kind == "choice":
        options = args[0].split(",")
        weights = [float(w) for w in args[1].split(",")] if len(args) > 1 else None
        return rng.choices(options, weights)[0]
    if kind == "int":
        lo, hi, step = args[0], args[1], args[2] if len(args) > 2 else 1
        return rng.randrange(lo, hi + 1, step)
    if kind == "real":
        return round(rng.uniform(args[0], args[1]), args[2])
    if kind in ("date", "time"):
        return _as_time(_random_day(rng, args[0], args[1]), rng, timestamp)
    if kind == "after":
        base = date.fromisoformat(str(row[args[0]])[:10])
        day = min(base + timedelta(days=rng.randint(args[1], args[2])), DATA_END)
        return _as_time(day, rng, timestamp)
    if kind == "hash":
        return hashlib.sha256(rng.randbytes(16)).hexdigest()
    raise ValueError(f"unknown value generator {col.gen!r} for column {col.name}")


def generate_rows(domain: Domain, seed: int) -> dict[str, list[dict]]:
    """Rows per table, parents first; the primary key of row i is i + 1."""
    rng = random.Random(_seed(seed, domain.name, "rows"))
    fakers = {}
    for lang, locale in LOCALES.items():
        fakers[lang] = Faker(locale)
        fakers[lang].seed_instance(_seed(seed, domain.name, lang))
    rows: dict[str, list[dict]] = {}
    # Skewed popularity (some players buy a lot, some never) makes GROUP BY / NOT IN realistic.
    popularity: dict[str, list[float]] = {}
    for table in domain.tables:
        weights = (rng.random() ** 2 + 0.02 for _ in range(table.rows))
        popularity[table.name] = list(accumulate(weights))
        seen_names: set[str] = set()
        rows[table.name] = []
        for i in range(table.rows):
            locale = rng.choice(LANGS)
            row: dict = {}
            for c in table.columns:
                if c.role == "pk":
                    row[c.name] = i + 1
                elif c.role == "fk":
                    parent = rows[c.ref or ""]
                    pick = rng.choices(range(len(parent)), cum_weights=popularity[c.ref or ""])[0]
                    row[c.name] = pick + 1
                elif c.null and rng.random() < c.null:
                    row[c.name] = None
                else:
                    value = column_value(c, row, locale, rng, fakers)
                    # Names identify rows: retry a few times rather than repeat one.
                    for _ in range(10 if c.role == "name" else 0):
                        if value not in seen_names:
                            break
                        value = column_value(c, row, locale, rng, fakers)
                    if c.role == "name":
                        seen_names.add(value)
                    row[c.name] = value
            rows[table.name].append(row)
    return rows


def write_database(domain: Domain, rows: dict[str, list[dict]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        for table in domain.tables:
            conn.execute(create_table_sql(domain, table))
            names = [c.name for c in table.columns]
            marks = ", ".join("?" for _ in names)
            conn.executemany(
                f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({marks})",
                [tuple(r[n] for n in names) for r in rows[table.name]],
            )
        conn.commit()


# --- examples ------------------------------------------------------------------------------------


def _is_empty(rows: list[tuple]) -> bool:
    # NULL-only rows (AVG over nothing) and a zero count answer "nothing matched" too.
    values = [v for r in rows for v in r]
    return all(v is None for v in values) or values == [0]


_LIMIT = re.compile(r" LIMIT (\d+)$")


def _tie_at_limit(db_path: Path, sql: str) -> bool:
    """Whether "the top k" is ill-defined: row k and row k + 1 tie on the ordering key.

    Every pattern that orders selects its ordering key last, so the key is the last column.
    """
    m = _LIMIT.search(sql)
    if not m or " ORDER BY " not in sql:
        return False
    k = int(m.group(1))
    rows = sqlmod.execute(db_path, f"{sql[: m.start()]} LIMIT {k + 1}", SQL_TIMEOUT_S).rows
    return len(rows) > k and rows[k - 1][-1] == rows[k][-1]


def generate_examples(
    domain: Domain,
    rows: dict[str, list[dict]],
    db_path: Path,
    n: int,
    cfg: SynthConfig,
    seed: int,
) -> tuple[list[dict], dict]:
    """`n` examples whose gold SQL runs on `db_path`, languages alternating over `cfg.langs`,
    difficulties drawn by `cfg.difficulty_weights`."""
    rng = random.Random(_seed(seed, domain.name, "examples"))
    sampler = Sampler(domain, rows, rng)
    by_difficulty = {d: [p for p in PATTERNS if p.difficulty == d] for d in DIFFICULTIES}
    weights = [cfg.difficulty_weights[d] for d in DIFFICULTIES]
    results: dict[str, sqlmod.ExecResult] = {}  # the same SQL often comes with new wording
    questions: set[str] = set()
    examples: list[dict] = []
    counts = Counter()
    max_empty = int(n * cfg.max_empty_share)
    difficulty, tries = "", 0
    for _ in range(n * MAX_ATTEMPTS_PER_EXAMPLE):
        if len(examples) >= n:
            break
        # Keep a drawn difficulty until one of its drafts passes, so that rejections (duplicate
        # wording, ties) do not tilt the mix toward the patterns with more variety.
        if not difficulty or tries >= MAX_ATTEMPTS_PER_EXAMPLE:
            difficulty, tries = rng.choices(DIFFICULTIES, weights)[0], 0
        tries += 1
        pat = rng.choice(by_difficulty[difficulty])
        draft = pat.build(sampler)
        if draft is None:
            continue
        lang = cfg.langs[len(examples) % len(cfg.langs)]
        question = pat.question(draft, lang, rng)
        if question in questions:
            counts["duplicate"] += 1
            continue
        if draft.sql not in results:
            results[draft.sql] = sqlmod.execute(db_path, draft.sql, timeout_s=SQL_TIMEOUT_S)
        res = results[draft.sql]
        if not res.ok:
            counts["error"] += 1
            log.warning("%s: dropped %s (%s): %s", domain.name, pat.name, res.error, draft.sql)
            continue
        if _tie_at_limit(db_path, draft.sql):
            counts["tie"] += 1
            continue
        empty = _is_empty(res.rows)
        if empty and counts["empty"] >= max_empty:
            counts["empty_dropped"] += 1
            continue
        counts["empty"] += empty
        questions.add(question)
        examples.append(
            {
                "id": f"{domain.name}-{len(examples):05d}",
                "db_id": domain.name,
                "domain": domain.name,
                "lang": lang,
                "question": question,
                "sql": draft.sql,
                "difficulty": pat.difficulty,
                "source": "synthetic",
            }
        )
        difficulty = ""
    if len(examples) < n:
        log.warning(
            "%s: only %d of %d examples after %d attempts",
            domain.name,
            len(examples),
            n,
            n * MAX_ATTEMPTS_PER_EXAMPLE,
        )
    return examples, dict(counts)


def run(cfg: SynthConfig, seed: int, out_dir: Path) -> dict:
    """Build the databases and examples of every configured domain; returns summary stats."""
    start = time.monotonic()
    unknown = sorted(set(cfg.domains) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown synth domains {unknown}; known: {sorted(DOMAINS)}")
    bad_langs = sorted(set(cfg.langs) - set(LANGS))
    if bad_langs or not cfg.langs:
        raise ValueError(f"synth langs must be a non-empty subset of {LANGS}, got {cfg.langs}")
    if set(cfg.difficulty_weights) != set(DIFFICULTIES):
        raise ValueError(
            f"synth difficulty_weights must weigh exactly {DIFFICULTIES}, "
            f"got {sorted(cfg.difficulty_weights)}"
        )
    out_dir = Path(out_dir)
    # The folder is a DVC output: nothing from an earlier run (a dropped domain) may survive.
    shutil.rmtree(out_dir / "databases", ignore_errors=True)
    (out_dir / "examples.jsonl").unlink(missing_ok=True)
    examples: list[dict] = []
    dropped = Counter()
    n_empty = 0
    for name in cfg.domains:
        domain = DOMAINS[name]
        db_path = out_dir / "databases" / f"{name}.sqlite"
        rows = generate_rows(domain, seed)
        write_database(domain, rows, db_path)
        domain_examples, counts = generate_examples(
            domain, rows, db_path, cfg.examples_per_domain, cfg, seed
        )
        examples += domain_examples
        n_empty += counts.pop("empty", 0)
        dropped.update(counts)
        log.info("%s: %d tables, %d examples", name, len(domain.tables), len(domain_examples))
    write_jsonl(out_dir / "examples.jsonl", examples)
    return {
        "examples": len(examples),
        "by_domain": dict(Counter(e["domain"] for e in examples)),
        "by_lang": dict(Counter(e["lang"] for e in examples)),
        "by_difficulty": {d: sum(e["difficulty"] == d for e in examples) for d in DIFFICULTIES},
        "empty_share": round(n_empty / max(len(examples), 1), 4),
        "dropped": dict(dropped),
        "seconds": round(time.monotonic() - start, 2),
    }


def main() -> None:
    setup_entry_point()
    p = load_params()
    stats = run(p.synth, p.seed, p.path("synthetic"))
    log.info("synth: %s", stats)


if __name__ == "__main__":
    main()
