"""Generation: batching with shared-prefix caches gives what one-at-a-time generation gives."""

from __future__ import annotations

import torch

from pipelines.data.records import read_jsonl
from pipelines.model.base import load_base
from pipelines.model.generate import common_prefix, generate_sql
from pipelines.model.prompt import build_prompt


def test_common_prefix_leaves_each_row_a_token():
    assert common_prefix([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert common_prefix([[1, 2], [1, 2, 3]]) == 1
    assert common_prefix([[7], [8]]) == 0


def test_batched_prefix_generation_matches_single_prompts(tiny_base_dir, prepared_dir):
    torch.manual_seed(0)
    model, tok = load_base(tiny_base_dir)
    records = read_jsonl(prepared_dir / "eval.jsonl") + read_jsonl(prepared_dir / "train.jsonl")
    prompts = [build_prompt(r["ddl"], r["question"], tok) for r in records[::3]]
    batched = generate_sql(model, tok, prompts, batch_size=4, max_new_tokens=12)
    single = [
        generate_sql(model, tok, [p], batch_size=1, max_new_tokens=12).texts[0] for p in prompts
    ]
    assert batched.texts == single
    assert batched.new_tokens > 0 and len(batched.sql) == len(prompts)
