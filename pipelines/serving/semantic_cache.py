"""A semantic response cache that a value, a comparison, a negation or a superlative never fools.

A generic semantic cache answers from the nearest earlier question when the cosine is high
enough, and for Text2SQL that is wrong exactly where the questions are closest: "players from
Korea" / "players from Japan", "more than 5" / "less than 5", "with orders" / "without orders",
"highest" / "lowest" read almost the same to an embedding model. Here a neighbour above
`serving.semantic_cache_threshold` is a hit only when, on top of that:

1. both questions carry the same values: quoted text, numbers (digits, month names, small
   number words in either language), and values of the database itself named in the question;
2. both ask with the same operators, in Korean or English alike (`features`): comparisons,
   between, negation, highest/lowest, null checks, aggregates, LIKE-kinds, before/after;
3. every literal of the cached SQL is a value of the new question.

Entries are scoped by (served model, db_id, schema hash): a new champion or a rebuilt database
never answers from an older one's entries. `python -m pipelines.bench.guardrails` measures hit
and false-hit rates on generated pairs (README "Guardrails and semantic cache").
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import sqlglot
from sqlglot import exp

# Operator words, Korean and English, each mapped to one language-neutral feature. Longer,
# more specific phrases first: each match is cut out before the shorter ones are looked for.
_FEATURES: tuple[tuple[str, str], ...] = (
    ("between", r"\bbetween\b|\bfrom \S+ to\b|사이|부터 \S+ ?까지|이상 \S+ 이하"),
    ("avg_compare", r"\bthe average\b|\babove average\b|평균보다|평균을 넘|전체 평균"),
    ("ge", r"\bat least\b|\bor more\b|\bor greater\b|\bno less than\b|이상"),
    ("le", r"\bat most\b|\bor less\b|\bor fewer\b|\bno more than\b|이하"),
    (
        "gt",
        r"\bgreater than\b|\bmore than\b|\bhigher than\b|\bover\b|\babove\b|\bexceed\w*|"
        r"보다 큰|보다 많은|보다 높은|초과|넘는",
    ),
    (
        "lt",
        r"\bless than\b|\bfewer than\b|\blower than\b|\bunder\b|\bbelow\b|"
        r"보다 작은|보다 적은|보다 낮은|미만",
    ),
    ("after", r"\bor later\b|\bafter\b|\bsince\b|이후"),
    ("before", r"\bbefore\b|\bprior to\b|이전"),
    ("not_null", r"\bfilled in\b|\bnot (?:null|empty|missing)\b|입력되어|비어 있지 않"),
    ("null", r"\bmissing\b|\bempty\b|\bnull\b|\bblank\b|비어 있는|없는 값|누락"),
    (
        "negation",
        r"\bnot\b|\bno\b|\bnever\b|\bwithout\b|\bexcept\b|\bexclud\w*|n't\b|"
        r"\bnone\b|없는|없이|않은|않는|아닌|제외|말고|빼고|한 번도",
    ),
    ("like_prefix", r"\bstarts? with\b|\bbegins? with\b|시작하는|시작되는"),
    ("like_suffix", r"\bends? with\b|끝나는"),
    ("like_contains", r"\bcontains?\b|\bincluding the word\b|포함하는|포함된|들어간"),
    ("both", r"\bboth\b|\beach of\b|둘 다|모두 있는|모두 가진"),
    ("union", r"\beither\b|\bor\b|또는|이거나|이나"),
    (
        "desc",
        r"\bhighest\b|\bmost\b|\blargest\b|\bbiggest\b|\btop\b|\blatest\b|\bnewest\b|"
        r"\bmost recent\b|\bmaximum\b|\bmax\b|\bbest\b|가장 많|가장 큰|가장 높|제일 높|"
        r"제일 많|제일 큰|최근|최대|최댓값|최고|상위|많은 순|높은 순|큰 순|내림차순",
    ),
    (
        "asc",
        r"\blowest\b|\bleast\b|\bsmallest\b|\bfewest\b|\bearliest\b|\boldest\b|"
        r"\bminimum\b|\bmin\b|\bcheapest\b|\bworst\b|가장 적|가장 작|가장 낮|제일 낮|"
        r"제일 적|제일 작|오래된|최소|최솟값|최저|하위|적은 순|낮은 순|작은 순|오름차순",
    ),
    ("count", r"\bhow many\b|\bnumber of\b|\bcount\w*|몇|개수|수를|수와|수는|수가|\b수\b"),
    ("avg", r"\baverage\b|\bmean\b|평균"),
    ("sum", r"\btotal\b|\bsum\b|합계|총"),
    ("group", r"\bper\b|\beach\b|\bevery\b|\bby\b|\bgroup\w*|별|마다|각 |따라"),
    ("distinct", r"\bdistinct\b|\bunique\b|\bdifferent\b|중복 없이|서로 다른"),
)
_FEATURE_RES = tuple((name, re.compile(rx, re.I)) for name, rx in _FEATURES)
_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"|‘([^’]+)’|“([^”]+)”")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_MONTHS = (
    *("january", "february", "march", "april", "may", "june", "july", "august"),
    *("september", "october", "november", "december"),
)
_NUMBER_WORDS = {
    **{
        w: str(i)
        for i, w in enumerate(
            ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
        )
    },
    **{m: str(i + 1) for i, m in enumerate(_MONTHS)},
    **{m[:3]: str(i + 1) for i, m in enumerate(_MONTHS) if m != "may"},
}
_KO_NUMBER_WORDS = {
    "한": "1",
    "두": "2",
    "세": "3",
    "네": "4",
    "다섯": "5",
    "여섯": "6",
    "일곱": "7",
    "여덟": "8",
    "아홉": "9",
    "열": "10",
}
_KO_COUNTED = re.compile(
    r"(?<![가-힣])(한|두|세|네|다섯|여섯|일곱|여덟|아홉|열) ?(?:명|개|곳|건|장|번|권|편|대|경기)"
)
_WORD = re.compile(r"[A-Za-z]+|[가-힣]+|\d+")


def normalise_number(text: str) -> str:
    """'1,000' → '1000', '3.50' → '3.5', '07' → '7': one spelling per value."""
    t = text.replace(",", "")
    try:
        v = float(t)
    except ValueError:
        return t
    return str(int(v)) if v == int(v) else repr(v)


def features(question: str) -> frozenset[str]:
    """The operator words of a question as language-neutral features."""
    text = _QUOTED.sub(" ", question.casefold())
    found = set()
    for name, rx in _FEATURE_RES:
        text, n = rx.subn(" ", text)
        if n:
            found.add(name)
    return frozenset(found)


def stem(word: str) -> str:
    """A crude English singular: matches → match, events → event, class stays."""
    for suffix in ("ches", "shes", "sses", "xes"):
        if word.endswith(suffix):
            return word[:-2]
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


class ValueIndex:
    """The text values of a database (distinct, per column) that a question may name unquoted
    ("players from Korea", "서울에 사는 고객"), and the English words of its table and column
    names (`terms`)."""

    def __init__(
        self, values: set[str], schema_words: set[str] = frozenset(), table_words: set[str] = ()
    ):
        self.values = {v.casefold() for v in values if 2 <= len(v) <= 60}
        self.max_words = max((len(v.split()) for v in self.values), default=1)
        self.schema_words = {stem(w.casefold()) for w in schema_words}
        self.table_words = {stem(w.casefold()) for w in table_words}

    def names_database(self, question: str) -> bool:
        """Whether the question names one of the tables (in English) or quotes one of the
        values of this database: then it is about it, whatever an embedding says."""
        words = set(map(stem, re.findall(r"[a-z]+", question.casefold())))
        quoted = {next(g for g in m.groups() if g).casefold() for m in _QUOTED.finditer(question)}
        return bool(words & self.table_words) or bool(quoted & self.values)

    def terms(self, question: str) -> frozenset[str]:
        """The schema's words a question uses (English wording only: "event" vs "venue")."""
        words = re.findall(r"[a-z]+", _QUOTED.sub(" ", question.casefold()))
        return frozenset(w for w in map(stem, words) if w in self.schema_words)

    def named_in(self, question: str) -> set[str]:
        words = _WORD.findall(question.casefold())
        found = set()
        for i in range(len(words)):
            for n in range(1, self.max_words + 1):
                phrase = " ".join(words[i : i + n])
                if phrase in self.values:
                    found.add(phrase)
            w = words[i]
            if "가" <= w[:1] <= "힣":  # Korean particles stick to the value: 서울에, 서울의
                found.update(w[:k] for k in range(2, len(w)) if w[:k] in self.values)
        return found


def values(question: str, index: ValueIndex | None = None) -> frozenset[str]:
    """The values a question carries: quoted text, numbers, number words, database values."""
    found = set()
    for m in _QUOTED.finditer(question):
        found.add("q:" + next(g for g in m.groups() if g is not None).casefold().strip())
    rest = _QUOTED.sub(" ", question)
    found.update("n:" + normalise_number(n) for n in _NUMBER.findall(rest))
    for w in _WORD.findall(rest.casefold()):
        if w in _NUMBER_WORDS:
            found.add("n:" + _NUMBER_WORDS[w])
    found.update("n:" + _KO_NUMBER_WORDS[m.group(1)] for m in _KO_COUNTED.finditer(rest))
    if index is not None:
        found.update("v:" + v for v in index.named_in(rest))
    return frozenset(found)


def sql_literals(sql: str) -> tuple[set[str], set[str]] | None:
    """(string literals, numbers) of a query: LIKE wildcards dropped, a date's year and month
    as numbers; None when it does not parse."""
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except sqlglot.errors.SqlglotError:
        return None
    strings, numbers = set(), set()
    for lit in tree.find_all(exp.Literal):
        if lit.is_string:
            s = lit.this.strip("%_").casefold()
            m = re.fullmatch(r"(\d{4})(?:-(\d{2}))?(?:-\d{2})?.*", s)
            if m:
                numbers.add(normalise_number(m.group(1)))
                if m.group(2) and m.group(2) != "01":
                    numbers.add(normalise_number(m.group(2)))
            elif s:
                strings.add(s)
        else:
            numbers.add(normalise_number(lit.this))
    return strings, numbers


def literals_covered(sql: str, question_values: frozenset[str]) -> bool:
    """Whether every literal of `sql` is a value of the question (0 and 1, as in LIMIT 1 for
    "the highest", need not be said)."""
    lits = sql_literals(sql)
    if lits is None:
        return False
    strings, numbers = lits
    said = {v[2:] for v in question_values}
    numbers_said = {v[2:] for v in question_values if v.startswith("n:")}
    return all(s in said or any(s in v for v in said) for s in strings) and all(
        n in numbers_said or n in ("0", "1") for n in numbers
    )


@dataclass
class Entry:
    question: str
    vector: np.ndarray
    values: frozenset[str]
    features: frozenset[str]
    sql: str
    terms: frozenset[str] = frozenset()  # schema words of an English question


@dataclass
class Hit:
    sql: str
    similarity: float
    question: str  # the cached question that answered (in memory only, never logged)


class SemanticCache:
    """LRU of answered questions per scope (model, db_id, schema hash), searched by cosine."""

    def __init__(self, size: int, threshold: float):
        self.size, self.threshold = size, threshold
        self._scopes: dict[tuple, OrderedDict[str, Entry]] = {}
        self._n = 0
        self._lock = threading.Lock()

    def lookup(
        self,
        scope: tuple,
        vector: np.ndarray,
        vals: frozenset[str],
        feats: frozenset[str],
        terms: frozenset[str] = frozenset(),
    ) -> tuple[Hit | None, str | None]:
        """The verified hit, or None and why the best neighbour was refused ("value",
        "operator", "schema", "literal"; None when no neighbour was close enough). Schema words
        are compared when both questions use some (two English questions)."""
        with self._lock:
            entries = list(self._scopes.get(scope, {}).values())
        if not entries:
            return None, None
        sims = np.stack([e.vector for e in entries]) @ vector
        why = None
        for i in np.argsort(-sims):
            if sims[i] < self.threshold:
                break
            e = entries[i]
            if e.values != vals:
                why = why or "value"
            elif e.features != feats:
                why = why or "operator"
            elif e.terms and terms and e.terms != terms:
                why = why or "schema"
            elif not literals_covered(e.sql, vals):
                why = why or "literal"
            else:
                return Hit(e.sql, float(sims[i]), e.question), None
        return None, why

    def put(self, scope: tuple, entry: Entry) -> None:
        if self.size <= 0:
            return
        with self._lock:
            items = self._scopes.setdefault(scope, OrderedDict())
            self._n += entry.question not in items
            items[entry.question] = entry
            items.move_to_end(entry.question)
            while self._n > self.size:  # the oldest entry of the largest scope goes
                largest = max(self._scopes.values(), key=len)
                largest.popitem(last=False)
                self._n -= 1

    def drop_models_except(self, model: str) -> None:
        """Invalidate every scope of another served model (a new champion)."""
        with self._lock:
            for scope in [s for s in self._scopes if s[0] != model]:
                self._n -= len(self._scopes.pop(scope))

    def __len__(self) -> int:
        return self._n
