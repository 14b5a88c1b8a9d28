"""Generation for a static batch over runtime/backend.py's step contract, as small functions (gpt-fast style):
`Generator.prefill`, `decode_one_token`, the context limit, and `run`, which steps runtime/sequence.py's
Sequences (sampling, drafts, text and stops are theirs) from a fresh cache to their ends.

    gen = Generator(open_backend("build/onnx/smollm2-135m-instruct-fp32"))
    for updates in gen.run([Request(prompt_ids, max_tokens=64)], tok):   # greedy
        ...   # one Update (or None once finished) per request, per step
    for tokens in gen.generate([prompt_ids], max_new_tokens=64):         # ids only: [B] per step

The cache (runtime/cache.py) owns positions, masks and the sliding-window trim; the backend turns a step's
tokens per slot into logits per slot. Nothing here depends on the graph or the device.
"""
from __future__ import annotations

import numpy as np

from .backend import Backend
from .errors import UserError
from .request import Request, fit_context
from .sampling import Sampling
from .sequence import Sequence, Update
from .speculative import Speculation, draft_lengths


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
        for updates in gen.run([request], tok): ...              # all of it, for a static batch
    """

    def __init__(self, backend: Backend, prefill_chunk: int = 512):
        self.backend = backend
        m = backend.manifest
        self.sliding_window = m.model.sliding_window
        self.keep = m.cache["keep"]
        self.max_context = backend.max_context  # the model's limit, or a TensorRT engine's smaller one
        # A chunk longer than the window is fine for the graph, but chunks of at most W keep the
        # trimmed cache small; without a window, chunks only bound activation memory. A TensorRT engine
        # takes at most its prefill profile's max_step_tokens tokens per step.
        self.chunk = min(prefill_chunk, self.sliding_window or prefill_chunk, backend.max_step_tokens or prefill_chunk)
        self.eos = set(m.eos_token_id)

    def new_cache(self, slots: int, length: int, speculation: Speculation | None = None):
        """A cache for sequences of up to `length` positions (with a window: the window plus one chunk). With
        speculation the cache holds whole sequences plus a step's drafts: a rollback never meets an eviction."""
        if speculation is not None:
            if not self.backend.ragged:
                raise UserError("--speculate rolls rejected drafts back per sequence, which needs the fused graph "
                                "(export --graph fused)")
            return self.backend.new_cache(slots, length + speculation.k)
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
        Past a TensorRT engine's prefill profile (prefill_past_max), one token per step (its decode profile)."""
        seqs = [Sequence(Request(np.asarray(p, np.int64), 1), None, self.eos) for p in prompts]
        return self.prefill_together(cache, slots, seqs)

    def prefill_together(self, cache, slots: list[int], seqs: list[Sequence]) -> np.ndarray:
        """prefill() of the sequences' prompts, fed through each Sequence (so each knows what it was fed), each from
        where it stands: a prefix the cache already held (Sequence.skip) is not fed again."""
        limit = self.backend.prefill_past_max
        rest = [len(s.prompt) - s.fed for s in seqs]
        t, a = max(rest), 0
        while a < t:
            n = self.chunk if limit is None or cache.columns <= limit else 1  # limit: a ColumnCache's engine
            # columns a .. a + n of rows left-padded to the longest: row i's share of them
            take = [max(0, a + n - (t - r)) - max(0, a - (t - r)) for r in rest]
            logits = self._step(cache, slots, [s.feed(k) for s, k in zip(seqs, take)])
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
        return [fit_context(p, max_new_tokens, self.max_context, truncate, names, f"prompt {i}")
                for i, p in enumerate(prompts)]

    # -- the loop --------------------------------------------------------------------------------
    def run(self, requests: list[Request], tok=None, speculation: Speculation | None = None, cache=None):
        """Step the requests, a static batch, from a fresh cache until each has finished: yields per step a list
        with each request's Update (None once it has finished). `tok` None: ids only (no text or stop strings).
        With `speculation` (fused graph) each step feeds every sequence its last token and up to k prompt-lookup
        drafts and keeps what the model itself would produce: greedy output is plain decoding's, sampled output
        has its distribution (runtime/speculative.py).
        `cache`: a fused-graph cache kept between runs (runtime/session.py): each prompt is fed from the longest
        prefix of it the cache holds (InPlaceCache.admit_prefix)."""
        for r in requests:
            fit_context(r.prompt, r.max_tokens, self.max_context)
        lengths = draft_lengths(self.backend.manifest)
        seqs = [Sequence(r, tok, self.eos, speculation, lengths) for r in requests]
        if cache is None:  # this run's own: freed when it ends (a device cache is 0.5-1 GiB for a 7B model)
            cache = self.new_cache(len(requests), max(len(r.prompt) + r.max_tokens for r in requests), speculation)
            try:
                yield from self._steps(seqs, cache, [cache.admit() for _ in seqs])
            finally:
                cache.close()
            return
        yield from self._steps(seqs, cache, None)

    def _steps(self, seqs, cache, slots):
        """run()'s loop over `cache`; slots None: admit each prompt from the longest prefix the cache holds."""
        if slots is None:
            slots = []
            for s in seqs:
                slot, held = cache.admit_prefix(s.prompt)
                s.skip(held)
                slots.append(slot)
        logits = self.prefill_together(cache, slots, seqs)
        updates: list[Update | None] = [s.update(row[None]) for s, row in zip(seqs, logits)]
        while True:
            for s, slot in zip(seqs, slots):
                if s.finished and cache.active[slot]:
                    cache.release(slot)  # its slot takes no more tokens
            yield updates
            running = [i for i, s in enumerate(seqs) if not s.finished]
            if not running:
                return
            tokens = [np.zeros(0, np.int64)] * cache.slots
            for i in running:
                tokens[slots[i]] = seqs[i].decode_tokens()
            wide = any(seqs[i].wants_all_logits for i in running)  # drafts to check: every fed column's logits
            out = self.backend.step(cache, tokens, last=not wide)
            updates = [None] * len(seqs)
            for i in running:
                rows = out[slots[i], :len(tokens[slots[i]])] if wide else out[slots[i]][None]
                updates[i] = u = seqs[i].update(rows)
                if u.rollback:
                    cache.rollback(slots[i], u.rollback)

    def generate(self, prompts, max_new_tokens: int = 128, sampling: Sampling | None = None,
                 stop_on_eos: bool = True, truncate: bool = False, names: dict | None = None):
        """run() for ids only: yields [B] new token ids per step; a finished sequence repeats EOS."""
        prompts = self.fit_context([np.asarray(p, np.int64) for p in prompts], max_new_tokens, truncate, names)
        reqs = [Request(p, max_new_tokens, sampling or Sampling(), stop_on_eos=stop_on_eos) for p in prompts]
        pad = next(iter(self.eos), 0)
        for updates in self.run(reqs):
            yield np.array([u.tokens[0] if u is not None else pad for u in updates])

    def generate_speculative(self, prompts, max_new_tokens: int, speculate: Speculation,
                             sampling: Sampling | None = None, stop_on_eos: bool = True):
        """run() with speculation, ids only: yields per model step a list per sequence of its new ids (1 to k + 1;
        [] once finished; an EOS ends the list)."""
        prompts = self.fit_context([np.asarray(p, np.int64) for p in prompts], max_new_tokens)
        reqs = [Request(p, max_new_tokens, sampling or Sampling(), stop_on_eos=stop_on_eos) for p in prompts]
        for updates in self.run(reqs, speculation=speculate):
            yield [u.tokens if u is not None else [] for u in updates]
