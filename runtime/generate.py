"""Generation over runtime/backend.py's step contract, as small functions (gpt-fast style): sampling rules,
`Generator.prefill`, `decode_one_token` and `generate`, and the context limit.

    gen = Generator(open_backend("build/onnx/smollm2-135m-instruct-fp32"))
    for tokens in gen.generate([prompt_ids], max_new_tokens=64, sampling=Sampling()):  # greedy
        ...   # tokens: [B] new ids, one per sequence

The cache (runtime/cache.py) owns positions, masks and the sliding-window trim; the backend turns a step's
tokens per slot into logits per slot. Nothing here depends on the graph or the device.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .backend import Backend
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
    "frequency_penalty": (lambda v: _is_real(v) and -2 <= v <= 2, "a number in [-2, 2] (0: off)"),
    "presence_penalty": (lambda v: _is_real(v) and -2 <= v <= 2, "a number in [-2, 2] (0: off)"),
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
    # OpenAI's rule, over the generated tokens only: logit[j] -= count[j] * frequency + (count[j] > 0) * presence
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

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


def transformed(logits: np.ndarray, s: Sampling, seen: list[list[int]], generated: list[list[int]] | None = None
                ) -> np.ndarray:
    """logits [B, V] -> float64 logits after the penalties. seen[b]: row b's prompt and generated ids (repetition
    penalty); generated[b]: its generated ids only (frequency and presence penalties)."""
    logits = logits.astype(np.float64)
    if s.repetition_penalty != 1.0:
        for b, ids in enumerate(seen):
            idx = np.unique(ids)
            v = logits[b, idx]
            logits[b, idx] = np.where(v > 0, v / s.repetition_penalty, v * s.repetition_penalty)
    if (s.frequency_penalty or s.presence_penalty) and generated:
        for b, ids in enumerate(generated):
            if ids:
                idx, counts = np.unique(ids, return_counts=True)
                logits[b, idx] -= counts * s.frequency_penalty + s.presence_penalty
    return logits


def probabilities(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """Penalised logits [B, V] -> the distribution sampled from (temperature, top-k, top-p), float64."""
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the top logit to -inf: fine
        logits = (logits - logits.max(-1, keepdims=True)) / s.temperature  # <= 0, the max at 0: never NaN
    if s.top_k:
        at = logits.shape[-1] - min(s.top_k, logits.shape[-1])  # where the k-th largest sits in ascending order
        kth = np.partition(logits, at, axis=-1)[:, [at]]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    if s.top_p < 1.0:
        mask = np.zeros(probs.shape, bool)
        for b, p in enumerate(probs):
            mask[b, nucleus(p, s.top_p)] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return probs


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The ids of the smallest set of most likely tokens whose mass reaches top_p (p [V], summing to 1).

    Sorting all of p finds it too, but an argsort of 49k floats takes 3-4 ms, half a decode step of the demo's
    int8 export, while the set is usually a few dozen tokens. So only the tokens with p >= (1 - top_p) / 2V are
    sorted: the others hold less than (1 - top_p) / 2 together, so these hold more than top_p, and the set (a
    prefix of the descending order whose mass before its last token is < top_p) lies within them. The cumulative
    sums are the full sort's, term for term. A flat distribution keeps every token and costs the full sort.

        nucleus(np.array([0.1, 0.5, 0.15, 0.25]), 0.7)    # array([1, 3]): 0.5 + 0.25 >= 0.7
    """
    top = np.flatnonzero(p >= (1.0 - top_p) / (2 * p.shape[-1]))
    if p[top].sum() <= top_p:  # only where rounding eats the margin (top_p within 1e-16 x V of 1)
        top = np.arange(p.shape[-1])
    order = top[np.argsort(-p[top])]
    sorted_p = p[order]
    return order[np.cumsum(sorted_p) - sorted_p < top_p]


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from p [V]: rng.choice(V, p=p)'s draw (one uniform, the same cumulative sums at every nonzero
    entry, so the same token for the same generator state), over p's nonzero entries only, which after top-p or
    top-k are few, so a draw need not scan the whole vocabulary."""
    nz = np.flatnonzero(p)
    return int(nz[rng.choice(len(nz), p=p[nz])])


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator, seen: list[list[int]],
           generated: list[list[int]] | None = None) -> np.ndarray:
    """logits: [B, V] float -> next ids [B] (transformed(), then argmax or a draw from probabilities())."""
    logits = transformed(logits, s, seen, generated)
    if s.greedy:
        return logits.argmax(-1)
    probs = probabilities(logits, s)
    return np.array([draw(p, rng) for p in probs])


def columns(rows: list[np.ndarray], start: int, n: int) -> list[np.ndarray]:
    """Lay rows of different lengths out left-padded to the longest (so they end together) and take
    columns [start, start + n): each row's tokens there (empty where the row has not started yet).

        columns([np.arange(5), np.arange(2)], 2, 2)    # [array([2, 3]), array([0])]
    """
    t = max(len(r) for r in rows)
    return [r[max(0, start - (t - len(r))):max(0, start + n - (t - len(r)))] for r in rows]


def ending_together(rows: list[np.ndarray], sizes: list[int]) -> list[list[np.ndarray]]:
    """The steps that feed `rows` so that they end in the same step, `sizes[i]` columns in step i
    (columns()): every row's last token lands in the last step, so its next-token logits come together."""
    t, steps, a = max(len(r) for r in rows), [], 0
    for n in sizes:
        steps.append(columns(rows, a, n))
        a += n
    if a != t:
        raise UserError(f"the step sizes cover {a} of {t} tokens")
    return steps


class Generator:
    """Small functions over the Backend contract (runtime/backend.py), gpt-fast style:

        gen = Generator(open_backend(folder))
        cache = gen.new_cache(slots=1, length=prompt_len + 64)
        slot = cache.admit()
        logits = gen.prefill(cache, [slot], [prompt])            # [1, V]
        logits = gen.decode_one_token(cache, [slot], [token])    # [1, V]
        for tokens in gen.generate([prompt], 64): ...            # all of it, for a static batch
    """

    def __init__(self, backend: Backend, prefill_chunk: int = 512):
        self.backend = backend
        m = backend.manifest
        self.sliding_window = m.model.sliding_window
        self.keep = m.cache["keep"]
        self.max_context = backend.max_context  # the model's limit, or a TensorRT plan's smaller one
        # A chunk longer than the window is fine for the graph, but chunks of at most W keep the
        # trimmed cache small; without a window, chunks only bound activation memory. A TensorRT plan
        # takes at most its prefill profile's max_seq tokens per step.
        self.chunk = min(prefill_chunk, self.sliding_window or prefill_chunk, backend.max_seq or prefill_chunk)
        self.eos = set(m.eos_token_id)

    def new_cache(self, slots: int, length: int):
        """A cache for sequences of up to `length` positions (with a window: the window plus one chunk)."""
        return self.backend.new_cache(slots, self.keep + self.chunk if self.keep is not None else length)

    # -- steps -----------------------------------------------------------------------------------
    def _step(self, cache, slots: list[int], tokens: list) -> np.ndarray:
        """tokens[i] for slots[i], every other slot idle; returns those slots' last logits [n, V] float32."""
        full = [np.zeros(0, np.int64)] * cache.slots
        for slot, t in zip(slots, tokens):
            full[slot] = t
        return self.backend.step(cache, full, last=True)[slots].astype(np.float32)

    def prefill(self, cache, slots: list[int], prompts: list[np.ndarray]) -> np.ndarray:
        """Feed whole prompts in chunks that end together (columns()); returns their last logits [n, V].
        Past a TensorRT plan's prefill profile (prefill_past_max), one token per step (its decode profile)."""
        limit = self.backend.prefill_past_max
        t, a = max(len(p) for p in prompts), 0
        while a < t:
            n = self.chunk if limit is None or cache.length <= limit else 1
            logits = self._step(cache, slots, columns(prompts, a, n))
            a += n
        return logits

    def decode_one_token(self, cache, slots: list[int], tokens) -> np.ndarray:
        """One new token for each of `slots`; returns their logits [n, V]."""
        return self._step(cache, slots, [np.array([t], np.int64) for t in tokens])

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
        cache = self.new_cache(len(prompts), max(len(p) for p in prompts) + max_new_tokens)
        slots = [cache.admit() for _ in prompts]
        logits = self.prefill(cache, slots, prompts)
        self.stats = [Stats(prompt_tokens=len(p)) for p in prompts]
        seen = [list(p) for p in prompts]
        self.done = np.zeros(len(prompts), bool)
        pad = next(iter(self.eos), 0)
        for n in range(max_new_tokens):
            tokens = sample(logits, s, rng, seen, [x[len(p):] for x, p in zip(seen, prompts)])
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
                ended = ~self.done & np.isin(tokens, list(self.eos))
                for i in np.flatnonzero(ended):
                    cache.release(slots[i])  # its slot takes no more tokens
                self.done |= ended
            if self.done.all() or n == max_new_tokens - 1:
                return
            running = np.flatnonzero(~self.done)  # finished sequences sit idle: their slots take no tokens
            logits[running] = self.decode_one_token(cache, [slots[i] for i in running], tokens[running])

    def generate_speculative(self, prompts, max_new_tokens: int, speculate, sampling: Sampling | None = None,
                             stop_on_eos: bool = True, truncate: bool = False, names: dict | None = None):
        """generate() with prompt-lookup drafts (runtime/speculative.py): each model step feeds every sequence its
        last token and up to `speculate.k` drafted ones and keeps what the model itself would produce. Yields, per
        model step, a list per sequence of its new ids (1 to k + 1; [] once finished; an EOS ends the list).
        Greedy output is generate()'s; sampled output has its distribution (another draw of the generator). Needs
        rows that advance independently (the fused graph); the cache holds the whole sequence, so a rollback
        never meets an eviction. self.drafted / self.accepted count drafts per sequence."""
        from .speculative import NgramIndex, accept, draft_lengths

        if not self.backend.ragged:
            raise UserError("--speculate rolls rejected drafts back per sequence, which needs the fused graph "
                            "(export --graph fused)")
        s = sampling or Sampling()
        prompts = self.fit_context([np.asarray(p, np.int64) for p in prompts], max_new_tokens, truncate, names)
        rng = np.random.default_rng(s.seed)
        t0 = time.perf_counter()
        k, lengths = speculate.k, draft_lengths(self.backend.manifest)
        cache = self.backend.new_cache(len(prompts), max(len(p) for p in prompts) + max_new_tokens + k)
        slots = [cache.admit() for _ in prompts]
        logits = self.prefill(cache, slots, prompts)
        self.stats = [Stats(prompt_tokens=len(p)) for p in prompts]
        self.drafted, self.accepted = [0] * len(prompts), [0] * len(prompts)
        seen = [list(map(int, p)) for p in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        index = [NgramIndex(p, speculate.ngram_max, speculate.ngram_min) for p in seen]
        self.done = np.zeros(len(prompts), bool)

        def emit(b: int, new: list[int]) -> list[int]:
            new = new[:max_new_tokens - len(generated[b])]
            if stop_on_eos:
                for j, t in enumerate(new):
                    if t in self.eos:
                        new = new[:j + 1]
                        break
            now = time.perf_counter()
            st = self.stats[b]
            if st.new_tokens == 0:
                st.time_to_first_token_s = now - t0
            st.new_tokens += len(new)
            st.decode_s = now - t0 - st.time_to_first_token_s
            for t in new:
                seen[b].append(t)
                generated[b].append(t)
                index[b].append(t)
            if len(generated[b]) >= max_new_tokens or (stop_on_eos and new and new[-1] in self.eos):
                self.done[b] = True
                cache.release(slots[b])
            return new

        first = sample(logits, s, rng, seen, generated)
        yield [emit(b, [int(t)]) for b, t in enumerate(first)]
        while not self.done.all():
            full = [np.zeros(0, np.int64)] * cache.slots
            drafts = {}
            for b in np.flatnonzero(~self.done):
                room = max_new_tokens - len(generated[b]) - 1  # the model's own token always comes too
                drafts[b] = index[b].draft(min(k, room), lengths) if room > 0 else []
                full[slots[b]] = np.array([generated[b][-1]] + drafts[b], np.int64)
            out = self.backend.step(cache, full, last=False)  # [B, S, V]: every fed column's next-token logits
            step = [[] for _ in prompts]
            for b, d in drafts.items():
                new = accept(out[slots[b], :len(d) + 1].astype(np.float32), d, s, rng, seen[b], generated[b])
                cache.rollback(slots[b], len(d) + 1 - len(new))  # fed: the last token and d; kept: it and len(new) - 1
                self.drafted[b] += len(d)
                self.accepted[b] += len(new) - 1
                step[b] = emit(b, new)
            yield step
