"""The canonical example record and its JSONL files.

Every source (synthetic, JSONL, Spider format, feedback) becomes these records in `prepare`;
training, validation and evaluation read nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

# id, db_id, domain, lang, question, sql, ddl, difficulty, source, split (DESIGN.md)
FIELDS = (
    "id", "db_id", "domain", "lang", "question", "sql", "ddl", "difficulty", "source", "split",
)
DIFFICULTIES = ("easy", "medium", "hard", "extra")


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
