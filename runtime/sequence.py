"""One request's life, as a state machine every driver steps: `Generator` (runtime/generate.py), serve's scheduler,
Triton's model (through the scheduler), the CLI and `bench` (through Generator). A driver owns the cache and the
batch; the sequence owns everything else about its request:

    seq = Sequence(Request(prompt=ids, max_tokens=64), tok, eos={2})
    while not seq.prefilled:
        rows = backend.step(cache, [seq.feed(512)])[0][None]   # the prompt, in chunks; its last logits [1, V]
    while True:
        update = seq.update(rows)                              # sample, detokenize, stop -> Update
        cache.rollback(slot, update.rollback)                  # rejected speculative drafts (0 without)
        if update.output: print(update.output.text, end="")    # text safe to show: never half a stop string
        if seq.finished: break
        fed = seq.decode_tokens()                              # the last token (and drafts)
        out = backend.step(cache, [fed], last=not seq.wants_all_logits)
        rows = out[0, :len(fed)] if seq.wants_all_logits else out[0][None]

What it owns: feeding the prompt; sampling (runtime/sampling.py) with the request's token mask; speculative drafts
(runtime/speculative.py: drafting, accepting, the rollback count); detokenizing with stop-string holdback (what is
streamed is exactly what is returned); EOS, max_tokens and the finish reason; logprobs; the stats. What it returns
are values (`Update`, `Output`), never attributes a caller must read back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .request import Request
from .speculative import FLOAT_LENGTHS, NgramIndex, Speculation, accept
from .tokenizer import StreamDecoder, Tokenizer, stop_at, stop_holdback


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0
    drafted: int = 0  # speculative tokens fed after the last token
    accepted: int = 0  # of those, kept

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "time_to_first_token_s": round(self.time_to_first_token_s, 4),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


@dataclass
class Output:
    """What a sequence produced since its last output."""

    text: str = ""  # new text: never half a character, never part of a stop string
    token_ids: list[int] = field(default_factory=list)  # the tokens behind it (and held-back ones)
    logprobs: list[dict] = field(default_factory=list)  # per token: {token, logprob, bytes, top_logprobs}
    finish_reason: str | None = None  # "stop" | "length"; a driver adds "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the cache already held (a reused prefix), not fed again
    stats: Stats | None = None  # on the final output


@dataclass
class Update:
    """One step's result for one sequence."""

    tokens: list[int]  # the tokens taken this step, an ending EOS included (1, or up to k + 1 with drafts)
    output: Output | None  # something to deliver: text, logprobs, or the end; None while text is held back
    rollback: int = 0  # positions the driver takes back from the cache: drafts the model rejected


class Sequence:
    def __init__(self, req: Request, tok: Tokenizer | None, eos: set[int], speculation: Speculation | None = None,
                 lengths: tuple[int, ...] = FLOAT_LENGTHS):
        """`tok` None: ids only (no text, no stop strings, no logprobs: benchmarks and tests of the loop)."""
        self.req, self.tok, self.eos = req, tok, eos
        self.prompt = np.asarray(req.prompt, np.int64)
        self.fed = 0  # prompt tokens fed so far
        self.cached = 0  # of those, the ones a reused prefix in the cache held already
        self.generated: list[int] = []  # taken tokens, without an ending EOS
        self.rng = np.random.default_rng(req.sampling.seed)
        self.decoder = StreamDecoder(tok) if tok is not None else None
        self.held = ""  # text that may be the start of a stop string
        self.pending = ""  # text of this step safe to show, not yet in an output
        self.unsent_ids: list[int] = []
        self.unsent_logprobs: list[dict] = []
        self.finish_reason: str | None = None
        self.speculation, self.lengths = speculation, lengths
        self.index = (NgramIndex(self.prompt.tolist(), speculation.ngram_max, speculation.ngram_min)
                      if speculation else None)
        self.drafts: list[int] = []  # fed this step after the last token
        self.stats = Stats(prompt_tokens=len(self.prompt))
        # plain attributes, not properties, that drivers read every step
        self.prefilled = False  # the whole prompt has been fed
        self.finished = False  # EOS, max_tokens or a stop ended it (finish_reason says which)
        self.wants_all_logits = False  # this step fed drafts: it needs every fed column's logits, not the last
        self.t0 = time.perf_counter()
        self.first_token_at: float | None = None

    # -- what to feed -----------------------------------------------------------------------------
    def skip(self, n: int) -> None:
        """The cache already holds the first n prompt tokens (a reused prefix, n < len(prompt)): feed from there."""
        assert self.fed == 0 and 0 <= n < len(self.prompt), (self.fed, n)
        self.fed = self.cached = n

    def feed(self, n: int) -> np.ndarray:
        """The next n prompt tokens (fewer at the prompt's end)."""
        chunk = self.prompt[self.fed:self.fed + n]
        self.fed += len(chunk)
        self.prefilled = self.fed == len(self.prompt)
        return chunk

    def decode_tokens(self) -> np.ndarray:
        """The last token, and with speculation up to k drafts after it (never past max_tokens)."""
        self.drafts = []
        if self.index is not None:
            room = self.req.max_tokens - len(self.generated) - 1  # the model's own token always comes too
            self.drafts = self.index.draft(min(self.speculation.k, room), self.lengths) if room > 0 else []
        self.wants_all_logits = bool(self.drafts)
        return np.array([self.generated[-1]] + self.drafts, np.int64)

    # -- what came back ---------------------------------------------------------------------------
    def update(self, logits: np.ndarray) -> Update:
        """logits [m, V] of this row's step: its last column (m = 1), or every column fed (drafts to check)."""
        req = self.req
        # the model's own next token is accept() with no drafts: one sampling path, the mask asked at each position
        fed = len(self.drafts) + 1  # the last token and the drafts
        new = accept(logits[-fed:], self.drafts, req.sampling, self.rng, self._seen(), self.generated, req.mask)
        self.stats.drafted += len(self.drafts)
        self.stats.accepted += len(new) - 1
        rows, back = logits[-fed:][:len(new)], fed - len(new)  # kept: len(new); the rest is rolled back
        self.drafts, self.wants_all_logits = [], False
        taken = []
        for t, row in zip(new, rows):
            taken.append(t)
            self._take(t, row)
            if self.finished:
                back = 0  # the slot is released: nothing to roll back
                break
        out = None
        if self.finished or self.pending or self.unsent_logprobs or (self.decoder is None and taken):
            out = self._output(self.pending, self.finish_reason)
        return Update(taken, out, back)

    def _seen(self) -> list[int]:
        """Prompt and generated ids: what the repetition penalty looks at (only it; not built when it is off)."""
        return self.prompt.tolist() + self.generated if self.req.sampling.repetition_penalty != 1.0 else []

    def _take(self, token: int, logits: np.ndarray) -> None:
        """One token: its stats and logprobs, then EOS, max_tokens and stop strings; the text it makes safe to show
        is added to `pending` (a step of several tokens sends it as one output)."""
        now = time.perf_counter()
        st = self.stats
        if self.first_token_at is None:
            self.first_token_at = now
            st.time_to_first_token_s = now - self.t0
        st.new_tokens += 1
        st.decode_s = now - self.first_token_at
        if self.req.logprobs is not None:
            self.unsent_logprobs.append(self._logprobs(logits, token))
        if self.req.stop_on_eos and token in self.eos:  # not part of the text; what was held back is
            return self._end(self.held + self._flush(), "stop")
        self.generated.append(token)
        if self.index is not None:
            self.index.append(token)
        self.unsent_ids.append(token)
        text = self.held + (self.decoder.push(token) if self.decoder else "")
        if len(self.generated) >= self.req.max_tokens:
            return self._end(text + self._flush(), "length")
        if not self.req.stop:
            self.pending += text
            return
        i = stop_at(text, self.req.stop)
        if i is not None:
            return self._end(text[:i], "stop")
        keep = stop_holdback(text, self.req.stop)  # held back until we know
        self.held, self.pending = text[len(text) - keep:], self.pending + text[:len(text) - keep]

    def _flush(self) -> str:
        return self.decoder.flush() if self.decoder else ""

    def _end(self, text: str, reason: str) -> None:
        i = stop_at(text, self.req.stop) if self.req.stop else None  # a stop completed by the last characters wins
        if i is not None:
            text, reason = text[:i], "stop"
        self.finish_reason, self.finished, self.held, self.pending = reason, True, "", self.pending + text

    def _output(self, text: str, reason: str | None = None) -> Output:
        out = Output(text=text, token_ids=self.unsent_ids, logprobs=self.unsent_logprobs, finish_reason=reason,
                     prompt_tokens=len(self.prompt), completion_tokens=len(self.generated),
                     cached_tokens=self.cached, stats=self.stats if reason else None)
        self.unsent_ids, self.unsent_logprobs, self.pending = [], [], ""
        return out

    def _logprobs(self, logits: np.ndarray, token: int) -> dict:
        x = logits.astype(np.float64)
        lp = x - x.max() - np.log(np.exp(x - x.max()).sum())
        k = self.req.logprobs
        top = []
        if k:  # the k most likely, in order, without sorting all of V (3 ms)
            top = np.argpartition(-lp, k - 1)[:k]
            top = top[np.argsort(-lp[top])]

        table = self.tok.token_bytes()

        def entry(i):  # the token's own bytes: a word keeps its leading space (decode([i]) drops it in sentencepiece)
            raw = table[i] if i < len(table) else b""
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(lp[i]), "bytes": list(raw)}

        return {**entry(token), "top_logprobs": [entry(i) for i in top]}
