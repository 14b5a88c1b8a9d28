"""An in-process stand-in for a fused export, for scheduler tests where the model does not matter: the real step
contract (runtime/backend.py) and the real InPlaceCache, with a "model" that is a pure function of the whole prefix.

Each position's logits are a pseudo-random vector seeded by a rolling hash of every token up to it, so a token
depends on everything before it, in order: a scheduler that feeds a row another row's token, a chunk twice, or a
position out of place produces another sequence. `reference_greedy` computes the same function directly, one
sequence at a time, with no cache and no scheduler: the independent reference. About one position in EOS_EVERY
prefers EOS, so sequences also end on their own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mistral_trt.runtime.cache import InPlaceCache
from mistral_trt.runtime.manifest import Manifest

EOS_EVERY = 40
MOD = (1 << 61) - 1


def step_hash(h: int, token: int) -> int:
    return (h * 1_000_003 + int(token) + 1) % MOD


def logits_for(h: int, vocab: int, eos: int) -> np.ndarray:
    """The model's logits after a prefix whose rolling hash is h."""
    x = np.random.default_rng(h).standard_normal(vocab).astype(np.float32) * 3
    if h % EOS_EVERY == 0:
        x[eos] = x.max() + 1
    return x


class FakeBackend:
    """Backend over `export_dir`'s manifest (its tokenizer, ids and limits); the graph is never loaded."""

    ragged = True
    provider = "fake"
    max_step_tokens = None
    prefill_past_max = None
    kv_dtype = np.dtype(np.float32)

    def __init__(self, export_dir: Path, fail_at_step: int | None = None):
        self.manifest = Manifest.load(export_dir)
        self.args = self.manifest.model
        self.max_context = self.manifest.max_context
        self.eos = self.manifest.eos_token_id[0]
        self.steps = 0
        self.fail_at_step = fail_at_step
        self._hashes: dict[int, np.ndarray] = {}  # id(cache) -> [slots, capacity + 1] prefix hashes by position

    def new_cache(self, slots: int, capacity: int, trim: bool = True) -> InPlaceCache:
        cache = InPlaceCache([], slots, capacity, None)
        self._hashes[id(cache)] = np.zeros((slots, capacity + 1), np.uint64)
        return cache

    def step(self, cache: InPlaceCache, tokens, last: bool = True) -> np.ndarray:
        self.steps += 1
        if self.fail_at_step is not None and self.steps == self.fail_at_step:
            raise RuntimeError("the fake graph failed this step")
        meta = cache.metadata([len(t) for t in tokens], last)
        hashes, vocab = self._hashes[id(cache)], self.args.vocab_size
        out = np.zeros((cache.slots, 1 if last else meta.width, vocab), np.float32)
        for b, row in enumerate(tokens):
            pos = int(cache.lengths[b])  # the row's next position: a rollback moved it back, admit() reset it
            h = int(hashes[b, pos])  # the hash of the prefix before it (0 at position 0)
            for i, t in enumerate(row):
                h = step_hash(h, t)
                hashes[b, pos + i + 1] = h
                if not last or i == len(row) - 1:
                    out[b, 0 if last else i] = logits_for(h, vocab, self.eos)
        cache.commit(meta)
        return out


def reference_greedy(backend: FakeBackend, prompt, max_tokens: int, stop_on_eos: bool = True) -> list[int]:
    """The fake model's greedy continuation, one token at a time from scratch."""
    h = 0
    for t in prompt:
        h = step_hash(h, t)
    out = []
    while len(out) < max_tokens:
        t = int(np.argmax(logits_for(h, backend.args.vocab_size, backend.eos)))
        out.append(t)
        if stop_on_eos and t == backend.eos:
            break
        h = step_hash(h, t)
    return out
