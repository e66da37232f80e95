"""The `prepare` stage: every source → canonical train/eval records + their databases.

Steps: import each source in `data.sources` (see `sources.py`; a source's `max_examples` keeps a
seeded sample of it), fill missing DDL from the SQLite schema, drop exact and normalised-question
duplicates, split (held-out domains or a seeded random share), then drop from train anything
whose question or SQL also appears in a held-out split (leakage). The real-schema benchmarks
(`data.real_schema`) become `real_schema.jsonl`: a held-out split no source may share a database
with (such records are dropped, whatever their split), scored by `evaluate`, never trained on.
Writes `train.jsonl`, `eval.jsonl`, `selection.jsonl`, `real_schema.jsonl`,
`databases/<db_id>.sqlite` and `stats.json` into a folder
beside the prepared one, then swaps it in (one atomic exchange on Linux): a gateway reading the
databases meanwhile sees the old set or the new one, never an empty or half-copied folder, and
nothing from an earlier run survives.

Run: `python -m pipelines.data.prepare` (dvc stage `prepare`).
"""

from __future__ import annotations

import filecmp
import json
import logging
import random
import re
import shutil
from collections import Counter
from pathlib import Path

from sqlglot import exp

from pipelines.config import DataConfig, load_params, setup_entry_point
from pipelines.data import sources
from pipelines.data.atomic import aside, replace_dir
from pipelines.data.records import FIELDS, question_key, sample_records, write_jsonl
from pipelines.data.schema_fit import prompt_ddl
from pipelines.db_schema import ddl_of
from pipelines.sql import normalize, parse

log = logging.getLogger(__name__)
# selection.jsonl is empty without selection_domains, real_schema.jsonl without data.real_schema
SPLITS = ("train", "eval", "selection", "real_schema")
_BUDGET = "_max_ddl_chars"  # a record's schema budget, from its source (never written out)


def dedupe(records: list[dict]) -> tuple[list[dict], int, int]:
    """Keep the first of each (db_id, normalised question). Returns the kept records, the
    number of exact duplicates (same db_id, question and SQL) and of other same-question ones."""
    seen_exact: set[tuple[str, str, str]] = set()
    seen_question: set[tuple[str, str]] = set()
    kept, exact, same_question = [], 0, 0
    for r in records:
        k_exact = (r["db_id"], r["question"], r["sql"])
        k_question = (r["db_id"], question_key(r["question"]))
        if k_exact in seen_exact:
            exact += 1
        elif k_question in seen_question:
            same_question += 1
        else:
            kept.append(r)
        seen_exact.add(k_exact)
        seen_question.add(k_question)
    return kept, exact, same_question


def assign_split(records: list[dict], cfg: DataConfig, seed: int) -> None:
    """Set `split` on every record, in place. Feedback from users and teacher labels always
    train: they exist to teach the model the traffic it gets wrong (the leakage guard still
    drops eval copies)."""
    selection = set(cfg.selection_domains)
    held_out = set(cfg.eval_domains) if cfg.split == "held_out_domain" else set()
    missing = (held_out | selection) - {r["domain"] for r in records}
    if missing:
        log.warning("held-out domains with no examples: %s", ", ".join(sorted(missing)))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(records) * cfg.eval_fraction) if cfg.split == "random" else 0
    eval_idx = set(order[:n_eval])
    for i, r in enumerate(records):
        if r["source"] in ("feedback", "teacher"):  # live traffic's labels
            r["split"] = "train"
        elif r["domain"] in selection:
            r["split"] = "selection"
        elif r["domain"] in held_out or i in eval_idx:
            r["split"] = "eval"
        else:
            r["split"] = "train"


def drop_leakage(records: list[dict]) -> tuple[list[dict], int]:
    """Drop train records whose normalised question or SQL also occurs in a held-out split: an
    evaluation example the model has already seen in any phrasing measures memory, not
    generalisation."""
    evals = [r for r in records if r["split"] != "train"]
    questions = {question_key(r["question"]) for r in evals}
    sqls = {normalize(r["sql"]) for r in evals}
    kept = [
        r
        for r in records
        if r["split"] != "train"
        or (question_key(r["question"]) not in questions and normalize(r["sql"]) not in sqls)
    ]
    return kept, len(records) - len(kept)


def install_databases(records: list[dict], databases: dict[str, Path | None], db_out: Path) -> None:
    """Copy (or build from the DDL) the database of every db_id the records use."""
    db_out.mkdir(parents=True, exist_ok=True)
    for db_id in sorted({r["db_id"] for r in records}):
        target = db_out / f"{db_id}.sqlite"
        src = databases.get(db_id)
        if src is None:
            ddls = list(dict.fromkeys(r["ddl"] for r in records if r["db_id"] == db_id))
            sources.build_db_from_ddl(ddls, target)
        elif not src.is_file():
            raise FileNotFoundError(f"database for db_id {db_id!r} not found: {src}")
        else:
            shutil.copyfile(src, target)


def collect(
    cfg: DataConfig, synthetic_dir: Path, seed: int, real_schema: bool = False
) -> tuple[list[dict], dict[str, Path | None]]:
    """All sources' records (of `data.sources`, or of `data.real_schema`), in source order, at
    most `max_examples` of each (a seeded sample; 0: the source is not read), and one database
    per db_id."""
    records: list[dict] = []
    databases: dict[str, Path | None] = {}
    for src in cfg.real_schema if real_schema else cfg.sources:
        if src.max_examples == 0:
            log.info("source %s %s: max_examples 0, not read", src.type, src.path or "")
            continue
        imported = sources.load(src, synthetic_dir)
        if src.max_examples is not None:
            imported.records = sample_records(imported.records, src.max_examples, seed)
        for r in imported.records:
            r[_BUDGET] = src.max_ddl_chars or cfg.max_ddl_chars
        for db_id, path in imported.databases.items():
            prev = databases.get(db_id)
            # Two sources may share a db_id only if they mean the same database.
            if prev is not None and path is not None and not filecmp.cmp(prev, path, False):
                raise ValueError(f"db_id {db_id!r} names two different databases: {prev}, {path}")
            databases[db_id] = prev or path
        records.extend(imported.records)
    return records, databases


def stats_of(records: list[dict], removed: dict[str, int]) -> dict:
    stats: dict = {"n": {}, "removed": removed, "n_databases": len({r["db_id"] for r in records})}
    for split in SPLITS:
        part = [r for r in records if r["split"] == split]
        if not part:  # no selection domains: the split is not there
            continue
        stats["n"][split] = len(part)
        stats[split] = {
            key: dict(sorted(Counter(r[key] for r in part).items()))
            for key in ("domain", "lang", "difficulty", "source")
        }
    return stats


def run(cfg: DataConfig, seed: int, synthetic_dir: Path, out_dir: Path) -> dict:
    """Build the prepared dataset in `out_dir`; returns the statistics written to stats.json."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = aside(out_dir)
    work.mkdir()
    try:
        stats = _build(cfg, seed, synthetic_dir, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    replace_dir(work, out_dir)
    return stats


# The table a CREATE TABLE names: "x", `x`, [x] or a bare word.
_CREATE = re.compile(
    r'CREATE TABLE\s+(?:IF NOT EXISTS\s+)?(?:"([^"]+)"|`([^`]+)`|\[([^\]]+)\]|(\w+))', re.IGNORECASE
)


def schema_cut(ddl: str, sql: str) -> bool:
    """Whether a DDL lacks a table the SQL reads: a fitted schema whose budget cut the table a
    training example needs teaches the model to write tables its prompt does not show."""
    try:
        tree = parse(sql)
    except Exception:  # the data contract names SQL that does not parse
        return False
    shown = {"".join(m).lower() for m in _CREATE.findall(ddl)}
    shown |= {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    tables = [t for t in tree.find_all(exp.Table) if isinstance(t.this, exp.Identifier)]
    return any(t.name.lower() not in shown for t in tables)


def drop_real_schema_databases(
    records: list[dict], real: list[dict], real_dbs: dict[str, Path | None]
) -> tuple[list[dict], int]:
    """Drop the records of a database that a real-schema benchmark uses: a model trained on (or
    selected by) its schema or its questions no longer measures real schemas it has not seen."""
    held = set(real_dbs) | {r["db_id"] for r in real}
    kept = [r for r in records if r["db_id"] not in held]
    if len(kept) < len(records):
        log.warning(
            "dropped %d examples over the real-schema set's databases (%s)",
            len(records) - len(kept),
            ", ".join(sorted({r["db_id"] for r in records} & held)),
        )
    return kept, len(records) - len(kept)


def _build(cfg: DataConfig, seed: int, synthetic_dir: Path, out_dir: Path) -> dict:
    records, databases = collect(cfg, synthetic_dir, seed)
    real, real_dbs = collect(cfg, synthetic_dir, seed, real_schema=True)
    n_imported = len(records)
    # Any other source's label of a question wins over a teacher's (a person's correction
    # above all): de-duplication keeps the first.
    records.sort(key=lambda r: r["source"] == "teacher")
    records, exact, same_question = dedupe(records)
    records, real_db = drop_real_schema_databases(records, real, real_dbs)
    real, _, _ = dedupe(real)
    databases = {k: v for k, v in databases.items() if k not in real_dbs} | real_dbs
    # DDL from the schema where a source has none (Spider, synthetic without a ddl field).
    ddl_cache: dict[str, str] = {}
    for r in [*records, *real]:
        if not r["ddl"] and databases.get(r["db_id"]) is not None:
            if r["db_id"] not in ddl_cache:
                ddl_cache[r["db_id"]] = ddl_of(databases[r["db_id"]], cfg.sample_values)
            r["ddl"] = ddl_cache[r["db_id"]]
    cut: set[int] = set()  # records whose fitted schema lost a table their SQL reads
    for r in [*records, *real]:  # a schema too long for a prompt keeps what the question needs
        fitted = prompt_ddl(
            r["ddl"],
            r["question"],
            r[_BUDGET],
            databases.get(r["db_id"]),
            inferred=cfg.inferred_joins,
            value_links=cfg.value_links,
        )
        if fitted != r["ddl"] and schema_cut(fitted, r["sql"]):
            cut.add(id(r))
        r["ddl"] = fitted
    assign_split(records, cfg, seed)
    n = len(records)
    records = [r for r in records if r["split"] != "train" or id(r) not in cut]
    schema_cut_n = n - len(records)
    records += [r | {"split": "real_schema"} for r in real]
    records, leaked = drop_leakage(records)  # the real-schema split is held out too
    if not {"train", "eval"} <= {r["split"] for r in records}:
        raise ValueError(
            f"split {cfg.split!r} left an empty train or eval set "
            f"(eval_domains={cfg.eval_domains}, eval_fraction={cfg.eval_fraction})"
        )

    install_databases(records, databases, out_dir / "databases")
    for split in SPLITS:
        write_jsonl(
            out_dir / f"{split}.jsonl",
            ({k: r[k] for k in FIELDS} for r in records if r["split"] == split),
        )
    removed = {
        "duplicates_exact": exact,
        "duplicates_question": same_question,
        "leakage": leaked,
        "real_schema_databases": real_db,
        "schema_cut": schema_cut_n,  # train examples whose schema budget cut a table they read
    }
    stats = {"n_imported": n_imported, **stats_of(records, removed)}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


def main() -> None:
    setup_entry_point()
    p = load_params()
    stats = run(p.data, p.seed, p.path("synthetic"), p.path("prepared"))
    log.info(
        "prepared %d train / %d eval examples over %d databases; removed %s",
        stats["n"]["train"],
        stats["n"]["eval"],
        stats["n_databases"],
        stats["removed"],
    )


if __name__ == "__main__":
    main()
