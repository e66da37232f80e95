"""Offline and served decoding agree, on the real vLLM (`make serve-setup`; slow: two engines).

A tiny Llama with SmolLM2's tokenizer and a random LoRA adapter: offline vLLM decodes the
prompts on the merged weights (as `evaluate` does), the vLLM server with the adapter loaded at
runtime answers the same questions through the gateway's request path (`Text2SQL`), both
greedy in fp32, without and with the schema grammar: the SQL must be the same question for
question.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from pipelines.config import load_params
from pipelines.data.records import read_jsonl
from pipelines.model.backends import ModelSpec, generate, load_tokenizer
from pipelines.model.decoding import GREEDY, grammar_for
from pipelines.model.prompt import build_prompt
from pipelines.serving.backend import VLLMCompletions
from pipelines.serving.routing import Route
from pipelines.serving.service import Text2SQL
from pipelines.vllm_runtime import VLLMRuntime
from tests.real_vllm import needs_vllm_and_base_tokenizer, running_vllm
from tests.test_backends import make_adapter, tiny_llama
from tests.test_serving_vllm import free_port

P = load_params().replace(serving={"merged": False})  # runtime LoRA is under test
pytestmark = [
    pytest.mark.slow,
    needs_vllm_and_base_tokenizer,
]


@pytest.mark.parametrize("grammar", [False, True])
def test_offline_and_served_greedy_give_the_same_sql(tmp_path, prepared_dir, grammar):
    tok = load_tokenizer(P.path("base_model"))
    base = tiny_llama(tok, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", seed=5)
    p = P.replace(
        paths={"base_model": base, "merged_models": tmp_path / "merged", "run_dir": tmp_path},
        serving={"vllm_port": free_port(), "max_new_tokens": 24},
        vllm={"dtype": "float32", "max_model_len": 1024},
        evaluate={"backend": "vllm", "max_new_tokens": 24},
    )
    decoding = GREEDY.model_copy(
        update={"grammar": grammar, "max_join_tables": 3, "max_subquery_depth": 1, "max_set_ops": 1}
    )
    records = read_jsonl(prepared_dir / "eval.jsonl")
    dbs = prepared_dir / "databases"
    prompts = [build_prompt(r["ddl"], r["question"], tok) for r in records]
    grammars = [grammar_for(dbs / f"{r['db_id']}.sqlite", decoding) for r in records]
    rt = dataclasses.replace(VLLMRuntime.of(p), merged_root=tmp_path / "merged")
    offline = generate(ModelSpec(base, adapter), tok, prompts, p.evaluate, rt, decoding, grammars)

    with running_vllm(p, tmp_path) as admin:
        admin.load("tiny-v1", adapter)
        backend = VLLMCompletions(admin.root + "/v1", 120, p.serving.max_new_tokens)
        cfg = p.serving.model_copy(update={"cache_size": 0})
        service = Text2SQL(cfg, dbs, tok, backend, decoding)
        route = Route("tiny-v1", 1, str(adapter))

        async def ask_all():
            return await asyncio.gather(
                *(service.answer(r["question"], r["db_id"], False, route) for r in records)
            )

        answers = asyncio.run(ask_all())
    served = [a.body.get("sql") for a in answers]
    assert all(a.http_status in (200, 422) for a in answers), [a.body for a in answers]
    same = sum(a == b for a, b in zip(offline.sql, served, strict=True))
    assert same == len(records), list(zip(offline.sql, served, strict=True))
