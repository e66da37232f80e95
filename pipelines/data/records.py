"""The canonical example record and its JSONL files.

Every source (synthetic, JSONL, Spider format, feedback) becomes these records in `prepare`;
training, validation and evaluation read nothing else.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

# id, db_id, domain, lang, question, sql, ddl, difficulty, source, split (DESIGN.md)
FIELDS = (
    "id", "db_id", "domain", "lang", "question", "sql", "ddl", "difficulty", "source", "split",
)
DIFFICULTIES = ("easy", "medium", "hard", "extra")

# Hangul jamo, compatibility jamo and syllables.
_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7a3]")
_PUNCT = re.compile(r"[^\w\s]")


def detect_lang(text: str) -> str:
    """Return "ko" if the text has any Hangul, else "en" (the two languages sqlops is built for)."""
    return "ko" if _HANGUL.search(text) else "en"


def question_key(question: str) -> str:
    """Lower-case, punctuation stripped, whitespace collapsed: the key that finds duplicate and
    leaked questions across records (not a cache key: "price > 5" and "price < 5" share it)."""
    return " ".join(_PUNCT.sub("", question.lower()).split())


def sample_records(records: list[dict], max_examples: int, seed: int) -> list[dict]:
    """A deterministic sample in file order (all records when `max_examples` is 0 or larger
    than the set): the eval subset that evaluation, experiments and benches share."""
    if not max_examples or max_examples >= len(records):
        return records
    picked = random.Random(seed).sample(range(len(records)), max_examples)
    return [records[i] for i in sorted(picked)]


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n
