"""Offline generation with vLLM, run inside .venv-vllm (never imported by the main venv).

    .venv-vllm/bin/python pipelines/model/vllm_offline.py request.json result.json

The request names a model directory (the base weights, or an adapter merged into them by
`pipelines.model.merge`) and its engine requests (`pipelines.model.decoding.engine_requests`:
prompt token ids, tokenized by the caller with the tokenizer the transformers backend uses, and
`SamplingParams` fields, the grammar as `structured_outputs`), the same dicts the gateway sends
the vLLM server. All requests run in one `generate` call (prompts of one database share their
prefix in vLLM's cache). The result holds, per request, each completion's raw text, tokens
(end-of-turn not counted, as the transformers backend counts) and cumulative log-probability
(when asked), and the timing. `pipelines.model.backends` builds the request and
extracts the SQL; this file imports only vLLM and the standard library (vLLM's pins conflict
with the main venv's) and is run as a script, so `pipelines/__init__` is never imported here.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def sampling_params(fields: dict):
    """`SamplingParams` from an engine request's fields (the grammar as structured outputs)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    fields = {k: v for k, v in fields.items() if k != "prompt_token_ids"}
    structured = fields.pop("structured_outputs", None)
    if structured is not None:
        fields["structured_outputs"] = StructuredOutputsParams(**structured)
    return SamplingParams(**fields)


def generate(request: dict) -> dict:
    from vllm import LLM

    start = time.monotonic()
    llm = LLM(
        model=request["model"],
        dtype=request["dtype"],
        max_model_len=request["max_model_len"],
        max_num_seqs=request["max_num_seqs"],
        enforce_eager=request["enforce_eager"],
        seed=0,
    )
    loaded = time.monotonic()
    reqs = request["requests"]
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs]
    params = [sampling_params(r) for r in reqs]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.monotonic()
    eos = llm.get_tokenizer().eos_token_id
    results = []
    for out in outputs:
        completions = []
        for c in out.outputs:
            ids = list(c.token_ids)
            completions.append(
                {
                    "text": c.text,
                    "tokens": len(ids) - (1 if ids and ids[-1] == eos else 0),
                    "logprob": c.cumulative_logprob,
                }
            )
        results.append(completions)
    import vllm

    return {
        "outputs": results,
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
