"""Machinery shared by the question/SQL patterns of the synthetic data generator.

A `Pattern` turns a domain's schema and rows into one gold SQL query plus the slots its question
templates need (a `Draft`), and renders the question in Korean or English from one of at least
three paraphrase templates. `Sampler` picks tables, columns, FK paths and WHERE values from the
real rows, so most queries return rows. Korean templates attach particles with a format spec that
looks at the word's last sound: "{c:이}" renders "레벨이" or "가격이", and "{x:'으로}" renders
"'김'으로".

The patterns themselves live in `patterns_table` (flat, one table) and `patterns_join` (joins
and subqueries);
`pipelines.data.synth` runs them.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pipelines.data.schema import Column, Domain, Table

MONTHS_EN = ("January", "February", "March", "April", "May", "June", "July", "August",
             "September", "October", "November", "December")


@dataclass(frozen=True)
class Label:
    """A word or phrase as a Korean and an English user would say it."""

    ko: str
    en: str


@dataclass
class Draft:
    sql: str
    slots: dict[str, object]  # Table, Label, or a value rendered as is in both languages
    person: bool = False  # the subject is people: "누구야?" / "Who ..." templates apply


@dataclass(frozen=True)
class Pattern:
    name: str
    difficulty: str
    build: Callable[[Sampler], Draft | None]  # None when the domain lacks what it needs
    ko: tuple[str, ...]  # paraphrase templates; a leading "@" marks person-only wording
    en: tuple[str, ...]

    def question(self, draft: Draft, lang: str, rng: random.Random) -> str:
        templates = [t for t in getattr(self, lang) if draft.person or not t.startswith("@")]
        return render(rng.choice(templates).lstrip("@"), draft.slots, lang)


def pattern(registry: list[Pattern], difficulty: str, ko: tuple[str, ...], en: tuple[str, ...]):
    """Register the decorated builder as a pattern in `registry`."""

    def wrap(build: Callable[[Sampler], Draft | None]) -> Callable[[Sampler], Draft | None]:
        registry.append(Pattern(build.__name__, difficulty, build, ko, en))
        return build

    return wrap


# --- Korean particles ----------------------------------------------------------------------------

_PARTICLES = {  # particle: (after a final consonant, after a vowel)
    "이": ("이", "가"),
    "은": ("은", "는"),
    "을": ("을", "를"),
    "과": ("과", "와"),
    "으로": ("으로", "로"),
    "이야": ("이야", "야"),
    "이고": ("이고", "고"),
    "이나": ("이나", "나"),
}
_RIEUL = 8  # final ㄹ takes 로, not 으로
# Final consonant of digits and Latin endings as Koreans read them aloud (일, 삼, 영; -n, -m, -l).
_DIGIT_FINAL = {"0": 21, "1": _RIEUL, "3": 16, "6": 1, "7": _RIEUL, "8": _RIEUL}
_LATIN_FINAL = {"n": 4, "m": 16, "l": _RIEUL, "ng": 21, "ic": 1}


def final_consonant(word: str) -> int:
    """Index of the final consonant (jongseong) of the word's last sound; 0 for none."""
    chars = [ch for ch in word if ch.isalnum()]
    if not chars:
        return 0
    last = chars[-1]
    if "가" <= last <= "힣":
        return (ord(last) - 0xAC00) % 28
    if last.isdigit():
        return _DIGIT_FINAL.get(last, 0)
    tail = "".join(chars[-2:]).lower()
    return _LATIN_FINAL.get(tail, _LATIN_FINAL.get(tail[-1:], 0))


def particle(word: str, name: str) -> str:
    with_final, without = _PARTICLES[name]
    final = final_consonant(word)
    if name == "으로" and final == _RIEUL:
        return without
    return with_final if final else without


class Ko(str):
    """A slot value in a Korean template; the format spec is a particle, "'" quotes the word."""

    def __format__(self, spec: str) -> str:
        word = f"'{self}'" if spec.startswith("'") else str(self)
        name = spec.lstrip("'")
        return word + particle(str(self), name) if name else word


def render(template: str, slots: Mapping[str, object], lang: str) -> str:
    values: dict[str, object] = {}
    for key, v in slots.items():
        if isinstance(v, Table):
            # {t} the thing, {ts} its plural (English), {t_u} its Korean counter word
            values[key] = v.ko if lang == "ko" else v.en
            values[key + "s"] = v.ko if lang == "ko" else v.en_plural
            values[key + "_u"] = v.counter
        elif isinstance(v, Label):
            values[key] = getattr(v, lang)
        else:
            values[key] = v
        if lang == "en" and isinstance(v, Table | Label):
            # {t_a}: "a player", "an item"
            values[key + "_a"] = f"{_article(str(values[key]))} {values[key]}"
        elif isinstance(v, Table | Label):
            values[key + "_a"] = values[key]
    if lang == "ko":
        values = {k: Ko(v) for k, v in values.items()}
    return template.format_map(values)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# --- SQL text ------------------------------------------------------------------------------------


def lit(value: object) -> str:
    """A SQL literal: strings quoted with '' escaping, numbers as written."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def aliases(*tables: Table) -> list[str]:
    """Short, distinct aliases for the tables of a join: initials first (oi for order_items)."""
    taken: list[str] = []
    for t in tables:
        initials = "".join(part[0] for part in t.name.split("_"))
        candidates = [initials] + [t.name[:n] for n in range(2, len(t.name) + 1)]
        alias = next(a for a in candidates if a not in taken)
        taken.append(alias)
    return taken


def joined(a: Label, b: Label) -> Label:
    """Two names joined: "A와 B" / "A and B"."""
    return Label(f"{a.ko}{particle(a.ko, '과')} {b.ko}", f"{a.en} and {b.en}")


AGGREGATES = {  # SQL function: (adjective, noun) per language
    "AVG": (Label("평균", "average"), Label("평균", "average")),
    "SUM": (Label("총", "total"), Label("합계", "total")),
    "MIN": (Label("최소", "minimum"), Label("최솟값", "minimum")),
    "MAX": (Label("최대", "maximum"), Label("최댓값", "maximum")),
}


def pick_aggregate(
    s: Sampler, c: Column, fns: tuple[str, ...] = tuple(AGGREGATES)
) -> tuple[str, Label, Label]:
    """One of the aggregate functions `fns` for column `c` with its adjective and noun; never
    SUM of a column whose total means nothing (a year, a rating)."""
    fn = s.rng.choice([f for f in fns if c.summable or f != "SUM"])
    return (fn, *AGGREGATES[fn])


COMPARISONS = {
    ">": Label("보다 큰", "greater than"),
    "<": Label("보다 작은", "less than"),
    ">=": Label(" 이상인", "at least"),
    "<=": Label(" 이하인", "at most"),
}


def extreme(col: Column, descending: bool) -> Label:
    """The word for "highest" / "lowest" of a number, "most recent" / "earliest" of a date."""
    if col.role == "date":
        return Label("최근인", "most recent") if descending else Label("오래된", "earliest")
    return Label("높은", "highest") if descending else Label("낮은", "lowest")


# --- sampling from the real rows -----------------------------------------------------------------


@dataclass
class Edge:
    child: Table
    fk: Column
    parent: Table


@dataclass
class Sampler:
    """Random choices of schema parts and of values present in the database rows."""

    domain: Domain
    rows: dict[str, list[dict]]  # table name -> rows as inserted
    rng: random.Random
    _values: dict[tuple[str, str], list] = field(default_factory=dict)

    @property
    def edges(self) -> list[Edge]:
        return [
            Edge(t, c, self.domain.table(c.ref))
            for t in self.domain.tables
            for c in t.cols("fk")
            if c.ref
        ]

    def table(self, *roles: str, pred: Callable[[Table], bool] | None = None) -> Table | None:
        """A random table with at least as many columns of each role as listed."""
        need = Counter(roles)
        fits = [
            t
            for t in self.domain.tables
            if all(len(t.cols(r)) >= n for r, n in need.items()) and (pred is None or pred(t))
        ]
        return self.rng.choice(fits) if fits else None

    def col(
        self, t: Table, *roles: str, exclude: tuple[Column, ...] = (), nullable: bool | None = None
    ) -> Column | None:
        """A random column of one of the roles; nullable=True/False filters on NULLs."""
        fits = [
            c
            for c in t.cols(*roles)
            if c not in exclude and (nullable is None or (c.null > 0) == nullable)
        ]
        return self.rng.choice(fits) if fits else None

    def edge(
        self,
        child: Callable[[Table], bool] | None = None,
        parent: Callable[[Table], bool] | None = None,
    ) -> Edge | None:
        fits = [
            e
            for e in self.edges
            if (child is None or child(e.child)) and (parent is None or parent(e.parent))
        ]
        return self.rng.choice(fits) if fits else None

    def values(self, t: Table, c: Column) -> list:
        """Non-NULL values of a column, sorted (cached)."""
        key = (t.name, c.name)
        if key not in self._values:
            column = (r[c.name] for r in self.rows[t.name])
            self._values[key] = sorted(v for v in column if v is not None)
        return self._values[key]

    def value(self, t: Table, c: Column) -> object:
        return self.rng.choice(self.values(t, c))

    def quantile(self, t: Table, c: Column, lo: float = 0.2, hi: float = 0.8) -> object:
        """A value between two quantiles, so both `>` and `<` it select rows."""
        vals = self.values(t, c)
        return vals[int(self.rng.uniform(lo, hi) * (len(vals) - 1))]

    def distinct(self, t: Table, c: Column) -> list:
        return sorted(set(self.values(t, c)))

    def min_group(self, counts: Counter) -> int:
        """A HAVING COUNT(*) >= k threshold that some but rarely all groups pass."""
        sizes = sorted(counts.values())
        return max(2, sizes[int(self.rng.uniform(0.3, 0.9) * (len(sizes) - 1))])

    def year(self, t: Table, c: Column) -> int:
        return int(str(self.value(t, c))[:4])

    def slots(self, t: Table, **named: object) -> dict[str, object]:
        """Template slots about table `t` ({t}); columns become their names in either language."""
        return {
            "t": t,
            **{k: self.label(t, v) if isinstance(v, Column) else v for k, v in named.items()},
        }

    def label(self, t: Table, c: Column) -> Label:
        if c.role == "pk":
            return Label(f"{t.ko} ID", f"{t.en} ID")
        return Label(c.ko, c.en)
