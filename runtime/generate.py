"""Generation over the exported graph, as small functions (gpt-fast style).

    gen = Generator(OrtEngine("build/onnx/smollm2-135m-instruct-fp32"))
    for event in gen.generate([prompt_ids], max_new_tokens=64, sampling=Sampling()):  # greedy
        ...   # event.tokens: [B] new ids, one per sequence

The KV cache (runtime/cache.py) is preallocated and double-buffered: the graph reads `past` from one side
and writes `present` into the other through onnxruntime IOBinding. With a sliding window W the cache is
trimmed to its last `min_keep = W - 1` positions after each step, with the matching columns of the
attention mask; position_ids stay absolute. That reproduces the full-sequence logits exactly (see
export/verify.py) and keeps memory flat. A fused-graph export (FusedEngine) takes the same calls over an
in-place cache (runtime/cache.py, InPlaceKVCache): nothing here changes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .cache import KVCache, positions
from .engine import Backend
from .errors import UserError


def _is_count(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


# One rule per sampling parameter (ranges as in HF's GenerationConfig and vLLM's SamplingParams), used by
# Sampling itself and by the CLI's argument parser, so a bad value gets one line naming it everywhere.
SAMPLING_RULES = {
    "temperature": (lambda v: _is_real(v) and v >= 0, "a finite number >= 0 (0: greedy)"),
    "top_p": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1] (1: off)"),
    "top_k": (lambda v: _is_count(v) and v >= 0, "an integer >= 0 (0: off)"),
    "repetition_penalty": (lambda v: _is_real(v) and v > 0, "a finite number > 0 (1: off)"),
    "seed": (lambda v: v is None or (_is_count(v) and 0 <= v < 2**64), "an integer in [0, 2**64)"),
}


def check_sampling(name: str, value, label: str | None = None):
    ok, expected = SAMPLING_RULES[name]
    if not ok(value):
        raise UserError(f"{label or name} {value!r}: expected {expected}")
    return value


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 means greedy, as in every OpenAI-style API.

        Sampling()                                   # greedy
        Sampling(temperature=0.7, top_p=0.9, seed=1) # sampled
    """
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off (HF's rule: divide positive logits, multiply negative ones)
    seed: int | None = None

    def __post_init__(self):
        for name in SAMPLING_RULES:
            check_sampling(name, getattr(self, name))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


TRUNCATE_KEEP = 0.5  # truncation keeps at least this share of a prompt, or refuses


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "time_to_first_token_s": round(self.time_to_first_token_s, 4),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator, seen: list[list[int]]) -> np.ndarray:
    """logits: [B, V] float -> next ids [B]."""
    logits = logits.astype(np.float64)
    if s.repetition_penalty != 1.0:
        for b, ids in enumerate(seen):
            idx = np.unique(ids)
            v = logits[b, idx]
            logits[b, idx] = np.where(v > 0, v / s.repetition_penalty, v * s.repetition_penalty)
    if s.greedy:
        return logits.argmax(-1)
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the top logit to -inf: fine
        logits = (logits - logits.max(-1, keepdims=True)) / s.temperature  # <= 0, the max at 0: never NaN
    if s.top_k:
        kth = np.sort(logits, axis=-1)[:, -min(s.top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    if s.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, -1)
        keep = np.cumsum(sorted_p, -1) - sorted_p < s.top_p  # smallest set whose mass reaches top_p
        mask = np.zeros_like(keep)
        np.put_along_axis(mask, order, keep, -1)
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=p) for p in probs])


@dataclass
class State:
    """Everything that changes during generation, for a batch of B sequences."""
    cache: KVCache  # P cached positions per layer (runtime/cache.py; DeviceKVCache for TensorRT)
    mask: np.ndarray  # [B, P] int64: which cached positions are real tokens
    next_pos: np.ndarray  # [B] int64: absolute position of the next token
    logits: np.ndarray | None = None  # [B, 1, V] preallocated for decode steps


class Generator:
    def __init__(self, engine: Backend, prefill_chunk: int = 512):
        self.engine = engine
        m = engine.manifest
        self.window = m.model.sliding_window
        self.keep = m.cache["min_keep"]
        # The model's limit, or a TensorRT plan's smaller one (its profiles were built for fewer positions).
        self.max_context = min(m.max_context, getattr(engine, "max_context", m.max_context))
        # A chunk longer than the window is fine for the graph, but chunks of at most W keep the
        # trimmed cache small; without a window, chunks only bound activation memory. A TensorRT plan
        # takes at most its prefill profile's max_seq tokens per step.
        self.chunk = min(prefill_chunk, self.window) if self.window else prefill_chunk
        self.chunk = min(self.chunk, getattr(engine, "max_seq", self.chunk))
        self.eos = set(m.eos_token_id)

    # -- steps -----------------------------------------------------------------------------------
    def step(self, st: State, ids: np.ndarray, new_mask: np.ndarray) -> np.ndarray:
        """Feed ids [B, S]; returns logits of the last position [B, V]."""
        b, s = ids.shape
        mask = np.concatenate([st.mask, new_mask], axis=1)  # [B, P + S]
        pos = positions(st.next_pos, new_mask)
        out = st.logits if s == 1 and st.logits is not None else None
        logits = self.engine.step(ids, mask, pos, st.cache, out, last_only=True)
        dropped = mask.shape[1] - st.cache.length  # positions the window trim removed
        st.next_pos = st.next_pos + new_mask.sum(1)
        st.mask = mask[:, dropped:]
        return logits[:, -1].astype(np.float32)

    def new_state(self, batch: int, length: int) -> State:
        """A preallocated cache for `length` positions (with a window: the window plus one chunk)."""
        a = self.engine.args
        capacity = self.keep + self.chunk if self.keep is not None else length
        cache = self.engine.new_cache(batch, capacity, self.keep)
        logits = np.empty((batch, 1, a.vocab_size), self.engine.kv_dtype)
        return State(cache, np.zeros((batch, 0), np.int64), np.zeros(batch, np.int64), logits)

    def prefill(self, prompts: list[np.ndarray], reserve: int = 0) -> tuple[State, np.ndarray]:
        """Left-pad the prompts to one length and feed them in chunks; returns state and last logits.
        `reserve`: decode steps to make room for in the cache."""
        b, t = len(prompts), max(len(p) for p in prompts)
        ids = np.zeros((b, t), np.int64)
        mask = np.zeros((b, t), np.int64)
        for i, p in enumerate(prompts):
            ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
        st = self.new_state(b, t + reserve)
        # A TensorRT plan's prefill profile takes a bounded past; beyond it, one token per step (decode profile).
        limit = getattr(self.engine, "prefill_past_max", None)
        a = 0
        while a < t:
            n = self.chunk if limit is None or st.cache.length <= limit else 1
            logits = self.step(st, ids[:, a:a + n], mask[:, a:a + n])
            a += n
        return st, logits

    def decode_one_token(self, st: State, tokens: np.ndarray) -> np.ndarray:
        return self.step(st, tokens[:, None].astype(np.int64), np.ones((len(tokens), 1), np.int64))

    # -- the context limit ----------------------------------------------------------------------
    def fit_context(self, prompts: list[np.ndarray], max_new_tokens: int, truncate: bool = False,
                    names: dict | None = None) -> list[np.ndarray]:
        """Every prompt plus `max_new_tokens` must fit `max_context` positions. `truncate` keeps the last
        tokens of a prompt that does not, but at least half of it (TRUNCATE_KEEP): cutting a prompt to a
        few tokens to make room for a huge max_new_tokens would answer a question nobody asked.
        `names`: how the caller's interface spells max_new_tokens and truncate, for its messages
        (the CLI: --max-new-tokens, --truncate)."""
        n = {"max_new_tokens": "max_new_tokens", "truncate": "truncate"} | (names or {})
        if not _is_count(max_new_tokens) or max_new_tokens < 1:
            raise UserError(f"{n['max_new_tokens']} {max_new_tokens!r}: expected an integer >= 1")
        if max_new_tokens >= self.max_context:
            raise UserError(f"{n['max_new_tokens']} {max_new_tokens}: the context limit is {self.max_context} positions "
                            f"(prompt + new tokens); expected at most {self.max_context - 1}")
        room = self.max_context - max_new_tokens
        out = []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise UserError(f"prompt {i} is empty")
            if len(p) > room:
                fits = (f"prompt {i} has {len(p)} tokens; with {n['max_new_tokens']} {max_new_tokens} the context "
                        f"limit {self.max_context} leaves room for {room}")
                if not truncate:
                    raise UserError(f"{fits} ({n['truncate']} keeps the last ones)")
                if room < math.ceil(len(p) * TRUNCATE_KEEP):
                    raise UserError(f"{fits}: {n['truncate']} keeps at least {TRUNCATE_KEEP:.0%} of a prompt, so ask "
                                    f"for at most {self.max_context - math.ceil(len(p) * TRUNCATE_KEEP)} new tokens")
                p = p[len(p) - room:]
            out.append(p)
        return out

    # -- the loop --------------------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 128, sampling: Sampling | None = None,
                 stop_on_eos: bool = True, truncate: bool = False, names: dict | None = None):
        """Yields [B] new token ids per step; finished sequences repeat EOS (check `self.done`)."""
        s = sampling or Sampling()
        prompts = self.fit_context([np.asarray(p, np.int64) for p in prompts], max_new_tokens, truncate, names)
        rng = np.random.default_rng(s.seed)
        t0 = time.perf_counter()
        st, logits = self.prefill(prompts, reserve=max_new_tokens)
        self.stats = [Stats(prompt_tokens=len(p)) for p in prompts]
        seen = [list(p) for p in prompts]
        self.done = np.zeros(len(prompts), bool)
        pad = next(iter(self.eos), 0)
        for n in range(max_new_tokens):
            tokens = sample(logits, s, rng, seen)
            tokens = np.where(self.done, pad, tokens)
            now = time.perf_counter()
            for i, tok in enumerate(tokens):
                if not self.done[i]:
                    seen[i].append(int(tok))
                    self.stats[i].new_tokens += 1
                    if n == 0:
                        self.stats[i].time_to_first_token_s = now - t0
                    else:
                        self.stats[i].decode_s = now - t0 - self.stats[i].time_to_first_token_s
            yield tokens
            if stop_on_eos:
                self.done |= np.isin(tokens, list(self.eos))
            if self.done.all() or n == max_new_tokens - 1:
                return
            logits = self.decode_one_token(st, tokens)
