"""Training examples and batches: tokenised prompt + SQL, one schema per batch, padding.

Every batch is drawn from one schema (one DDL text: a database or one of its renamed variants),
so its examples share the system line and the DDL; the train step runs that shared prefix once
(`shared_prefix_len`). `prepare_examples` turns the prepared train split into the `train`
stage's examples: dev split held out, feedback repeated, schemas renamed, tokenized, scheduled.
Used by the `train` stage and by `make bench`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelines.config import TrainConfig
from pipelines.data.augment import augment
from pipelines.data.records import read_jsonl
from pipelines.data.schema_fit import schema_key
from pipelines.model.prompt import build_completion, build_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of positions without loss (prompt and padding)


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # tokens before the SQL; they get no loss


def tokenize(records: list[dict], tok, max_length: int) -> tuple[list[Example], int, list[dict]]:
    """Prompt + completion token ids per record; records over `max_length` are dropped.
    Returns (examples, number dropped, the records kept, aligned with the examples)."""
    examples, kept, dropped = [], [], 0
    for r in records:
        prompt = tok(build_prompt(r["ddl"], r["question"], tok), add_special_tokens=False)
        target = tok(build_completion(r["sql"], tok), add_special_tokens=False)
        ids = prompt.input_ids + target.input_ids
        if len(ids) > max_length:
            dropped += 1
            continue
        examples.append(Example(ids, len(prompt.input_ids)))
        kept.append(r)
    return examples, dropped, kept


def split_dev(records: list[dict], n_dev: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, dev): `n_dev` seeded in-domain examples held back for the eval loss, at most a
    tenth of the records; none when `n_dev` is 0."""
    n_dev = min(n_dev, len(records) // 10)
    if n_dev <= 0:
        return records, []
    dev_idx = set(random.Random(seed).sample(range(len(records)), n_dev))
    train = [r for i, r in enumerate(records) if i not in dev_idx]
    return train, [r for i, r in enumerate(records) if i in dev_idx]


def group_batches(groups: list[str], batch_size: int, rng: random.Random | None = None):
    """One pass over all indices in batches of one group each; shuffled when `rng` is given."""
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    batches = []
    for g in sorted(by_group):
        idxs = by_group[g][:]
        if rng:
            rng.shuffle(idxs)
        batches += [idxs[b : b + batch_size] for b in range(0, len(idxs), batch_size)]
    if rng:
        rng.shuffle(batches)
    return batches


def batch_schedule(
    groups: list[str], batch_size: int, n_batches: int, seed: int
) -> list[list[int]]:
    """`n_batches` index lists, each drawn from one group (one DDL text): the
    examples of a batch then share their whole system + DDL prefix, which the train step
    runs once. Reshuffled every epoch; deterministic for a seed, so a resumed run sees the
    same batches as an uninterrupted one."""
    rng = random.Random(seed)
    schedule: list[list[int]] = []
    while len(schedule) < n_batches:
        schedule += group_batches(groups, batch_size, rng)
    return schedule[:n_batches]


def shared_prefix_len(examples: list[Example]) -> int:
    """Tokens every example starts with, stopping before the last prompt token (whose hidden
    state predicts the first SQL token and so must be computed per example)."""
    limit = min(e.n_prompt for e in examples) - 1
    first = examples[0].input_ids
    n = 0
    while n < limit and all(e.input_ids[n] == first[n] for e in examples):
        n += 1
    return n


def repeat_feedback(records: list[dict], repeat: int) -> list[dict]:
    """Each verified feedback record `repeat` times: corrections are few and are exactly the
    traffic the model got wrong (schema renaming, applied afterwards, varies the copies)."""
    return [r for r in records for _ in range(repeat if r.get("source") == "feedback" else 1)]


def collate(
    examples: list[Example], pad_id: int, share_prefix: bool = True
) -> dict[str, torch.Tensor]:
    """Padded tensors of a batch; `prefix_len` > 0 lets the loss run the shared prefix once."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt : n] = ids[i, e.n_prompt : n]
    share = share_prefix and len(examples) > 1
    prefix = torch.tensor(shared_prefix_len(examples) if share else 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prefix_len": prefix}


@dataclass
class TrainData:
    """The tokenized examples and the order the loop takes them in."""

    examples: list[Example]  # training examples: feedback repeated, schemas renamed, tokenized
    dropped: int  # training records longer than max_length
    dev: list[Example]  # in-domain examples held out for the eval loss
    dev_batches: list[list[int]]  # indices into `dev`, one DDL per batch
    schedule: list[list[int]]  # indices into `examples`, one list per micro-batch of the run


def prepare_examples(
    cfg: TrainConfig, seed: int, prepared_dir: Path, tok: PreTrainedTokenizerBase
) -> TrainData:
    """The tokenized train and dev examples of `prepared_dir/train.jsonl` and the order the
    loop takes them in."""
    records = read_jsonl(prepared_dir / "train.jsonl")
    train_records, dev_records = split_dev(records, cfg.dev_examples, seed)
    train_records = repeat_feedback(train_records, cfg.feedback_repeat)
    train_records = augment(
        train_records,
        cfg.schema_augment,
        cfg.schema_variants,
        seed,
        cfg.schema_p_table,
        cfg.schema_p_column,
    )
    examples, dropped, kept = tokenize(train_records, tok, cfg.max_length)
    if not examples:
        raise ValueError(f"no training examples fit max_length={cfg.max_length}")
    dev, _, dev_kept = tokenize(dev_records, tok, cfg.max_length)
    groups = [schema_key(r["ddl"]) for r in kept]  # one schema per batch: its prefix runs once
    n_micro = cfg.max_steps * cfg.grad_accum
    return TrainData(
        examples=examples,
        dropped=dropped,
        dev=dev,
        dev_batches=group_batches([schema_key(r["ddl"]) for r in dev_kept], cfg.batch_size),
        schedule=batch_schedule(groups, cfg.batch_size, n_micro, seed),
    )
