"""Offline greedy generation with vLLM, run inside .venv-vllm (never imported by the main venv).

    .venv-vllm/bin/python pipelines/model/vllm_offline.py request.json result.json

The request names a model directory (the base weights, or an adapter merged into them by
`pipelines.model.merge`) and holds the prompts as token ids, tokenized by the caller with the
same tokenizer the transformers backend uses, so both backends see identical inputs. The result
holds the raw completion texts, the tokens generated per prompt (end-of-turn not counted, as the
transformers backend counts) and the timing. `pipelines.model.backends` builds the request and
extracts the SQL; this file imports only vLLM and the standard library (vLLM's pins conflict
with the main venv's) and is run as a script, so `pipelines/__init__` is never imported here.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def generate(request: dict) -> dict:
    from vllm import LLM, SamplingParams

    start = time.monotonic()
    llm = LLM(
        model=request["model"],
        dtype=request["dtype"],
        max_model_len=request["max_model_len"],
        max_num_seqs=request["max_num_seqs"],
        seed=0,
    )
    loaded = time.monotonic()
    params = SamplingParams(
        temperature=0.0,  # greedy
        max_tokens=request["max_new_tokens"],
        stop=request["stop"],
        include_stop_str_in_output=True,  # like transformers' stop_strings: the `;` stays
        skip_special_tokens=True,
    )
    prompts = [{"prompt_token_ids": ids} for ids in request["prompt_token_ids"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.monotonic()
    eos = llm.get_tokenizer().eos_token_id
    texts, tokens = [], []
    for out in outputs:
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        texts.append(completion.text)
        tokens.append(len(ids) - (1 if ids and ids[-1] == eos else 0))
    import vllm

    return {
        "texts": texts,
        "new_tokens": tokens,
        "seconds": done - loaded,  # generation only, like the transformers backend's figure
        "load_seconds": loaded - start,  # engine start-up: weights, KV cache, warm-up
        "vllm_version": vllm.__version__,
    }


def main() -> None:
    request_file, result_file = Path(sys.argv[1]), Path(sys.argv[2])
    result = generate(json.loads(request_file.read_text()))
    result_file.write_text(json.dumps(result))


if __name__ == "__main__":  # vLLM's engine process is spawned: it re-imports this file
    main()
