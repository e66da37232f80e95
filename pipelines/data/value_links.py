"""Value linking: the values stored in a database that a question refers to.

People name values in their own words ("operating plants" for `Status = 'Operational'`,
"under construction" for 'Under Construction'); a model that never sees the stored spelling
drops the condition or writes a literal that matches nothing. `link_values(db, question, cfg)`
finds them by matching the question's word n-grams against each text column's distinct values:

- exact (case kept), then case-insensitive, then stem (`operating` ~ 'Operational': suffixes
  stripped; a Korean word with its particle, `서울에서` ~ '서울'), then prefix (a shared head
  of at least 5 characters and half the longer word), then fuzzy (difflib ratio >= `fuzzy`
  between words sharing their first four letters, a typo such as `Californa`); a value of
  several words matches only as a whole phrase, each word at some level;
- a stop word ("the", "of", "how") never matches alone, and a span matched better (or by a
  longer phrase) is not matched again worse, so 'France' in two columns is two links but
  'Francesca' is none;
- at most `max_links` links per question, `max_per_column` per column, best first.

The index is built once per database and kept (LRU, `cache_databases` of them) by schema hash
and file stamp: per text column its `max_values_per_column` most frequent values among the first
`scan_rows` rows, without values longer than `max_value_chars` or `max_value_words` (free text),
`max_values` in all, the build stopping after `max_build_s`. The links reach the prompt as
lines after the DDL (`-- matches: plants.Status = 'Operational'`) through
`schema_fit.prompt_ddl`, the one DDL builder of prepare, evaluation and the gateway.
"""

from __future__ import annotations

import bisect
import difflib
import re
import sqlite3
import time
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import ValueLinksConfig
from pipelines.db_schema import schema_hash
from pipelines.sql import connect_readonly

MATCH_PREFIX = "-- matches: "
_TOKEN = re.compile(r"\w+")
_TEXT_TYPES = ("", "TEXT", "CHAR", "CLOB", "VARCHAR", "STRING", "NVARCHAR", "NCHAR")
# Levels, best first: a span keeps only its best level.
EXACT, CASE, STEM, PREFIX, FUZZY = 5, 4, 3, 2, 1
KINDS = {EXACT: "exact", CASE: "case", STEM: "stem", PREFIX: "prefix", FUZZY: "fuzzy"}
_STOP_TEXT = (
    "a an the of in on at to for from by with and or not no is are was were be been has have "
    "had do does did what which who whom whose when where why how many much more most less "
    "least all any each every both either neither than that this these those there their "
    "its it they them he she his her we our you your i me my as per into over under about "
    "show list give find tell name names number count total average whose also only one "
    "yes some such same other different distinct unique ids id"
)
STOP_WORDS = frozenset(_STOP_TEXT.split())
_SUFFIXES = (
    "ional", "ments", "ment", "ness", "ings", "ing", "ions", "ion", "ies", "ied", "ers", "er",
    "ed", "al", "es", "ly", "s", "e",
)  # fmt: skip


def stem(word: str) -> str:
    """A crude English stem: the first listed suffix stripped, leaving at least 3 letters
    (`operating`, `operational`, `operations` -> `operat`); other scripts unchanged."""
    if not word.isascii() or not word.isalpha() or len(word) <= 3:
        return word
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _level(q: str, v: str, fuzzy: float) -> int:
    """How question word `q` matches value word `v` (both lower-case); 0: not at all."""
    if q == v:
        return CASE
    if q.isdigit() or v.isdigit():
        return 0
    short, long_ = sorted((q, v), key=len)
    if long_ in (short + "s", short + "es"):
        return STEM  # a plural
    if len(short) >= 5 and stem(q) == stem(v) and len(stem(q)) >= 4:
        return STEM
    if not v.isascii() and len(v) >= 2 and q.startswith(v) and len(q) - len(v) <= 3:
        return STEM  # a Korean word with its particle: 서울에서 ~ 서울
    if len(short) >= 5 and 2 * len(short) >= len(long_) and long_.startswith(short):
        return PREFIX
    if (
        len(short) >= 5
        and q[0] == v[0]
        and len(long_) - len(short) <= 2
        and difflib.SequenceMatcher(None, q, v).ratio() >= fuzzy
    ):
        return FUZZY
    return 0


@dataclass(frozen=True)
class Link:
    table: str
    column: str
    value: str  # as stored
    kind: str  # exact | case | stem | prefix | fuzzy
    span: str  # the question's words it matched

    def line(self) -> str:
        """The prompt line after the DDL: `-- matches: table.column = 'value'`."""
        value = self.value.replace("'", "''")
        return f"{MATCH_PREFIX}{_ident(self.table)}.{_ident(self.column)} = '{value}'"


def _ident(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f'"{name}"'


@dataclass
class ValueIndex:
    """Distinct text values of a database, looked up by their first word."""

    columns: list[tuple[str, str]] = field(default_factory=list)  # (table, column)
    values: list[tuple[int, str]] = field(
        repr=False, default_factory=list
    )  # (column id, value as stored)
    # The word sequences a value is matched by: its words (any level), and for a phrase with
    # stop words, its other words alone ('Under Construction' by "constructed", at most STEM).
    forms: list[tuple[int, tuple[str, ...], int]] = field(
        repr=False, default_factory=list
    )  # value, words, cap
    by_first: dict[str, list[int]] = field(
        repr=False, default_factory=dict
    )  # first word -> form ids
    by_stem: dict[str, list[int]] = field(
        repr=False, default_factory=dict
    )  # stem of the first word
    firsts: list[str] = field(
        repr=False, default_factory=list
    )  # sorted first words (prefix, fuzzy)
    # Words of table and column names: a question word naming the schema ("drivers", "city")
    # is not a value, unless it is part of a phrase matched word for word.
    schema_words: set[str] = field(repr=False, default_factory=set)
    truncated: bool = False  # a bound (time, values) stopped the build early
    build_s: float = 0.0

    def __len__(self) -> int:
        return len(self.values)


def _name_words(name: str) -> set[str]:
    words = _TOKEN.findall(re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).replace("_", " ").lower())
    return {f for w in words for f in (w, w + "s", w + "es", w[:-1] if w.endswith("s") else w)}


def _text_columns(conn: sqlite3.Connection, schema_words: set[str]) -> list[tuple[str, str]]:
    out = []
    tables = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY rowid"
    ).fetchall()
    for (t,) in tables:
        schema_words |= _name_words(t)
        for col in conn.execute(f'PRAGMA table_info("{t}")'):
            schema_words |= _name_words(col[1])
            declared = re.sub(r"\(.*", "", (col[2] or "").upper()).strip()
            if declared in _TEXT_TYPES or "CHAR" in declared or "TEXT" in declared:
                out.append((t, col[1]))
    return out


def build_index(db_path: Path | str, cfg: ValueLinksConfig) -> ValueIndex:
    """The bounded value index of a database (see the module docstring)."""
    start = time.perf_counter()
    index = ValueIndex()
    with closing(connect_readonly(db_path)) as conn:
        for table, column in _text_columns(conn, index.schema_words):
            if time.perf_counter() - start > cfg.max_build_s or len(index) >= cfg.max_values:
                index.truncated = True
                break
            col, tab = '"' + column.replace('"', '""') + '"', '"' + table.replace('"', '""') + '"'
            rows = conn.execute(
                f"SELECT v FROM (SELECT {col} AS v FROM {tab} LIMIT {cfg.scan_rows}) "
                f"WHERE typeof(v) = 'text' AND length(v) BETWEEN 1 AND {cfg.max_value_chars} "
                f"GROUP BY v ORDER BY COUNT(*) DESC, v LIMIT {cfg.max_values_per_column}"
            ).fetchall()
            words = [tuple(_TOKEN.findall(v.lower())) for (v,) in rows]
            if not rows or sum(map(len, words)) > cfg.max_value_words * len(rows) / 2:
                continue  # free text: its values average more than half the word bound
            index.columns.append((table, column))
            k = len(index.columns) - 1
            for (value,), ws in zip(rows, words, strict=True):
                if not ws or len(ws) > cfg.max_value_words or any(c in value for c in "\n;"):
                    continue
                content = tuple(w for w in ws if w not in STOP_WORDS)
                if not content:
                    continue
                forms = [(ws, EXACT)] + ([(content, STEM)] if content != ws else [])
                for words_, cap in forms:
                    index.by_first.setdefault(words_[0], []).append(len(index.forms))
                    index.by_stem.setdefault(stem(words_[0]), []).append(len(index.forms))
                    index.forms.append((len(index.values), words_, cap))
                index.values.append((k, value))
                if len(index) >= cfg.max_values:
                    break
    index.firsts = sorted(index.by_first)
    index.build_s = time.perf_counter() - start
    return index


_INDEXES: OrderedDict[tuple, ValueIndex] = OrderedDict()


def index_of(db_path: Path | str, cfg: ValueLinksConfig) -> ValueIndex:
    """The database's index, built on first use and kept by schema hash and file stamp (a
    changed file is indexed again), the `cache_databases` most recently used."""
    st = Path(db_path).stat()
    with closing(connect_readonly(db_path)) as conn:
        key = (schema_hash(conn), st.st_size, st.st_mtime_ns, cfg)
    if key in _INDEXES:
        _INDEXES.move_to_end(key)
    else:
        _INDEXES[key] = build_index(db_path, cfg)
        while len(_INDEXES) > cfg.cache_databases:
            _INDEXES.popitem(last=False)
    return _INDEXES[key]


def _first_candidates(index: ValueIndex, word: str, fuzzy: float) -> set[int]:
    """Form ids whose first word may match `word` at any level (verified by the caller)."""
    out = set(index.by_first.get(word, ())) | set(index.by_stem.get(stem(word), ()))
    if len(word) >= 4 and word.isascii():
        lo = bisect.bisect_left(index.firsts, word[:4])
        for first in index.firsts[lo : lo + 200]:
            if not first.startswith(word[:4]):
                break
            if _level(word, first, fuzzy):
                out.update(index.by_first[first])
    if not word.isascii():
        for n in range(2, len(word)):  # 서울에서 -> 서울
            out.update(index.by_first.get(word[:n], ()))
    return out


def link_values(db_path: Path | str, question: str, cfg: ValueLinksConfig) -> list[Link]:
    """The stored values the question names, best first (see the module docstring)."""
    return find_links(index_of(db_path, cfg), question, cfg)


def find_links(index: ValueIndex, question: str, cfg: ValueLinksConfig) -> list[Link]:
    """The links of `question` in a built index (`link_values` without the cache lookup)."""
    spans = [(m.group().lower(), m.start(), m.end()) for m in _TOKEN.finditer(question)]
    words = [w for w, _, _ in spans]
    found = {}  # (value id, start) -> (level, n words)
    for i, word in enumerate(words):
        # A stop word or a schema word starts only a phrase, word for word ('The Who').
        stop = word in STOP_WORDS or word in index.schema_words
        if stop:
            candidates = index.by_first.get(word, ())
        else:
            candidates = _first_candidates(index, word, cfg.fuzzy)
        for fid in candidates:
            vid, ws, cap = index.forms[fid]
            if i + len(ws) > len(words) or (stop and len(ws) == 1):
                continue
            levels = [_level(q, v, cfg.fuzzy) for q, v in zip(words[i:], ws, strict=False)]
            if not all(levels) or (stop and min(levels) < CASE):
                continue
            level = min([*levels, cap])
            text = question[spans[i][1] : spans[i + len(ws) - 1][2]]
            if level == CASE and text == index.values[vid][1]:
                level = EXACT
            best = found.get((vid, i))
            if best is None or (level, len(ws)) > best:
                found[(vid, i)] = (level, len(ws))
    ranked = sorted(found.items(), key=lambda f: (-f[1][0], -f[1][1], f[0][1], f[0][0]))
    taken: dict[int, tuple[int, int, int]] = {}  # word position -> (level, n, start) of its match
    per_column: dict[int, int] = {}
    links, listed = [], set()
    for (vid, i), (level, n) in ranked:
        mark = (level, n, i)
        if vid in listed or any(taken.get(p, mark) != mark for p in range(i, i + n)):
            continue  # listed already, or its words belong to a better (or longer) match
        k, raw = index.values[vid]
        if per_column.get(k, 0) >= cfg.max_per_column:
            continue
        for p in range(i, i + n):
            taken[p] = mark
        per_column[k] = per_column.get(k, 0) + 1
        listed.add(vid)
        table, column = index.columns[k]
        span = question[spans[i][1] : spans[i + n - 1][2]]
        links.append(Link(table, column, raw, KINDS[level], span))
        if len(links) >= cfg.max_links:
            break
    return links
