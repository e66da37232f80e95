"""The one prompt: built from (DDL, question) here and nowhere else.

Training, evaluation, the registered MLflow model and the gateway all call `build_prompt`, so
the model sees at inference exactly the text it was trained on. The layout follows the seed
book's template (an instruction line, then `### DDL:`, `### Question:`, `### SQL:`), wrapped in
the base model's chat template when it has one; without one it starts with the tokenizer's
beginning-of-sequence token, as the model was pretrained (every tokenization here passes
`add_special_tokens=False`, and Gemma 3's GGUF tokenizer would not add it anyway: without it
the untuned Gemma 3 270M's loss on the SQL was 2.74 instead of 1.59 nats per token).
"""

from __future__ import annotations

from typing import Any

INSTRUCTION = (
    "You are a Text2SQL assistant. Write one SQLite query that answers the question, "
    "using only the tables and columns defined in the DDL."
)
TEMPLATE = "### DDL:\n{ddl}\n\n### Question:\n{question}\n\n### SQL:\n"
# Where generation ends: the first statement's `;` (the training target ends there, then end of
# turn). Every backend and the server stop on it.
STOP = [";"]


def build_prompt(ddl: str, question: str, tokenizer: Any | None = None) -> str:
    """The text a model continues with SQL (chat-formatted when the tokenizer has a template)."""
    body = TEMPLATE.format(ddl=ddl.strip(), question=question.strip())
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": INSTRUCTION},
            {"role": "user", "content": body.rstrip()},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None) or ""
    return f"{bos}{INSTRUCTION}\n\n{body}"


def build_completion(sql: str, tokenizer: Any | None = None) -> str:
    """The training target after the prompt: the SQL, one `;`, then end of turn."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    return f"{sql.strip().rstrip(';')}{STOP[0]}{eos}"
