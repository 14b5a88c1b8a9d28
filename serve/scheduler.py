"""The model worker: one thread owns the backend and its cache; between steps it admits waiting requests into
free slots and retires finished or cancelled ones (continuous batching; vLLM's scheduler in miniature).

    sched = Scheduler(open_backend(export_dir), tokenizer, max_batch=8, max_model_len=4096)
    sched.start()
    handle = sched.submit(Request(prompt=ids, max_tokens=64, sampling=Sampling()), emit=print)
    # emit gets Event(delta="Hello", ...), ..., Event(finish_reason="stop", ...) from the worker thread
    handle.cancel()      # a client that went away: its slot is free after the next step

Each step feeds every running sequence's last token and, within a token budget, chunks of waiting prompts
(chunked prefill, Sarathi/vLLM): on a `ragged` backend (the fused graph) both go into the same step. The
budget keeps running streams' inter-token latency bounded: it is measured as the step time goes, and a
step that also prefills may take at most `itl_slack` times a decode-only step. A backend whose rows must
advance together (portable graph, TensorRT) is served in static batches: a batch is admitted when the
previous one has ended, prefilled together, decoded together.

Greedy output of a request does not depend on what else is in the batch: rows are independent in both
graphs (masks; the fused graph's own per-row lengths), sampling has its own generator per request.

With `speculate` (fused graph only) each decoding sequence is fed its last token and up to k prompt-lookup drafts
(runtime/speculative.py); the step returns every fed column's logits, each sequence keeps what the model itself
would produce and rolls the rest of its slot back. Output is unchanged; steps where drafts come true yield several
tokens per sequence.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.generate import Generator, Sampling, sample
from mistral_trt.runtime.speculative import FLOAT_LENGTHS, NgramIndex, accept, draft_lengths
from mistral_trt.runtime.tokenizer import StreamDecoder, Tokenizer, stop_at, stop_holdback


@dataclass
class Request:
    prompt: np.ndarray  # token ids
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)  # the stop text itself is not returned
    logprobs: int | None = None  # None: off; k >= 0: each token's logprob and its k most likely alternatives
    stop_on_eos: bool = True


@dataclass
class Event:
    """What a request produced since the last event (emitted from the worker thread)."""

    delta: str = ""  # new text (never half a character, never part of a stop string)
    token_ids: list[int] = field(default_factory=list)  # the tokens behind it (and held-back ones)
    logprobs: list[dict] = field(default_factory=list)  # per token: {token, logprob, bytes, top_logprobs}
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class QueueFull(Exception):
    """The waiting queue is full: the caller answers 429 with Retry-After."""


class Handle:
    def __init__(self, seq: "Sequence"):
        self._seq = seq

    def cancel(self) -> None:
        self._seq.cancelled = True


class Sequence:
    ids = itertools.count()

    def __init__(self, req: Request, emit, tok: Tokenizer, eos: set[int], speculate=None,
                 lengths: tuple[int, ...] = FLOAT_LENGTHS):
        self.req, self.emit, self.tok, self.eos = req, emit, tok, eos
        self.id = next(self.ids)
        self.slot: int | None = None
        self.fed = 0  # prompt tokens fed so far
        self.generated: list[int] = []
        self.rng = np.random.default_rng(req.sampling.seed)
        self.decoder = StreamDecoder(tok)
        self.held = ""  # text that may be the start of a stop string
        self.unsent_ids: list[int] = []
        self.unsent_logprobs: list[dict] = []
        self.cancelled = False
        self.arrived = time.perf_counter()
        self.last_token_at: float | None = None
        self.speculate = speculate  # Speculation: prompt-lookup drafts, checked by the model (runtime/speculative.py)
        self.index = NgramIndex(req.prompt.tolist(), speculate.ngram_max, speculate.ngram_min) if speculate else None
        self.lengths = lengths  # drafted tokens after a match of 1, 2, 3 tokens (draft_lengths: by the export)
        self.drafts: list[int] = []  # fed this step after the last token

    @property
    def prefilled(self) -> bool:
        return self.fed == len(self.req.prompt)

    def next_tokens(self) -> np.ndarray:
        """The last token, and with speculation up to k drafts after it (never past max_tokens)."""
        self.drafts = []
        if self.index is not None:
            room = self.req.max_tokens - len(self.generated) - 1  # the model's own token always comes too
            self.drafts = self.index.draft(min(self.speculate.k, room), self.lengths) if room > 0 else []
        return np.array([self.generated[-1]] + self.drafts, np.int64)

    # -- new tokens -----------------------------------------------------------------------------
    def take(self, logits: np.ndarray, metrics) -> bool:
        """Sample from logits [V], emit what is new; returns True when the sequence has finished."""
        s = self.req.sampling
        seen = [np.concatenate([self.req.prompt, self.generated]).astype(np.int64)]
        return self._take(int(sample(logits[None], s, self.rng, seen, [self.generated])[0]), logits, metrics)

    def take_speculative(self, logits: np.ndarray, metrics) -> tuple[bool, int]:
        """logits [len(drafts) + 1, V] of the last token and the drafts: keep what the model itself would produce
        (runtime/speculative.py's rule), emit it token by token. Returns (finished, positions to roll back)."""
        seen = list(map(int, self.req.prompt)) + self.generated
        new = accept(logits, self.drafts, self.req.sampling, self.rng, seen, list(self.generated))
        for i, t in enumerate(new):
            if self._take(t, logits[i], metrics):
                return True, 0
        return False, len(self.drafts) + 1 - len(new)

    def _take(self, token: int, logits: np.ndarray, metrics) -> bool:
        now = time.perf_counter()
        if metrics:
            if self.last_token_at is None:
                metrics.ttft.observe(now - self.arrived)
            else:
                metrics.itl.observe(now - self.last_token_at)
            metrics.generation_tokens.inc()
        self.last_token_at = now
        if self.req.logprobs is not None:
            self.unsent_logprobs.append(self._logprobs(logits, token))
        if self.req.stop_on_eos and token in self.eos:  # not part of the text; what was held back is
            return self._end(self.held + self.decoder.flush(), "stop")
        self.generated.append(token)
        if self.index is not None:
            self.index.append(token)
        self.unsent_ids.append(token)
        text = self.held + self.decoder.push(token)
        if len(self.generated) >= self.req.max_tokens:
            return self._end(text + self.decoder.flush(), "length")
        if self._stop_in(text):
            return True
        keep = stop_holdback(text, self.req.stop)  # held back until we know
        self.held, out = text[len(text) - keep:], text[:len(text) - keep]
        if out or self.unsent_logprobs:
            self._send(Event(delta=out))
        return False

    def _end(self, text: str, reason: str) -> bool:
        if not self._stop_in(text):  # a stop string found in the last text still wins
            self._send(Event(delta=text, finish_reason=reason))
        return True

    def _stop_in(self, text: str) -> bool:
        i = stop_at(text, self.req.stop)
        if i is None:
            return False
        self._send(Event(delta=text[:i], finish_reason="stop"))
        return True

    def _send(self, ev: Event) -> None:
        ev.token_ids, self.unsent_ids = self.unsent_ids, []
        ev.logprobs, self.unsent_logprobs = self.unsent_logprobs, []
        ev.prompt_tokens, ev.completion_tokens = len(self.req.prompt), len(self.generated)
        self.emit(ev)

    def _logprobs(self, logits: np.ndarray, token: int) -> dict:
        x = logits.astype(np.float64)
        lp = x - x.max() - np.log(np.exp(x - x.max()).sum())
        k = self.req.logprobs
        top = []
        if k:  # the k most likely, in order, without sorting all of V (3 ms)
            top = np.argpartition(-lp, k - 1)[:k]
            top = top[np.argsort(-lp[top])]

        def entry(i):
            piece = self.tok.decode([int(i)])
            return {"token": piece, "logprob": float(lp[i]), "bytes": list(piece.encode("utf-8"))}

        return {**entry(token), "top_logprobs": [entry(i) for i in top]}


class Scheduler:
    def __init__(self, backend, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64,
                 max_model_len: int | None = None, prefill_chunk: int = 512, itl_slack: float = 2.5, metrics=None,
                 speculate=None):
        if speculate is not None and not backend.ragged:
            raise UserError("--speculate rolls rejected drafts back per sequence, which needs the fused graph "
                            "(export --graph fused)")
        self.backend, self.tok, self.metrics, self.speculate = backend, tokenizer, metrics, speculate
        self.draft_lengths = draft_lengths(backend.manifest)  # drafts after a match of 1, 2, 3 tokens, by the export
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_model_len = min(max_model_len or backend.max_context, backend.max_context)
        self.gen = Generator(backend, prefill_chunk)  # chunk sizes and the static-batch prefill
        self.prefill_chunk, self.itl_slack = self.gen.chunk, itl_slack
        self.eos = set(backend.manifest.eos_token_id)
        self.ragged = backend.ragged
        # with speculation the cache holds whole sequences plus a step's drafts: a rollback never meets an eviction
        self.cache = (backend.new_cache(max_batch, self.max_model_len + speculate.k) if speculate else
                      self.gen.new_cache(max_batch, self.max_model_len))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.cv = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        # measured step costs (seconds), for the prefill budget: a decode-only step, and what prefill adds to it
        self.decode_s: float | None = None
        self.mixed: collections.deque = collections.deque(maxlen=32)  # (prefill tokens, extra seconds)

    # -- the API side (any thread) ---------------------------------------------------------------
    def check(self, req: Request) -> None:
        """Refuse what can never run (the caller turns it into a 400)."""
        if len(req.prompt) == 0:
            raise UserError("the prompt is empty")
        if len(req.prompt) + req.max_tokens > self.max_model_len:
            raise UserError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                            f"requested {len(req.prompt) + req.max_tokens} tokens ({len(req.prompt)} in the prompt, "
                            f"{req.max_tokens} for the completion). Please reduce the prompt or max_tokens.")

    def submit(self, req: Request, emit) -> Handle:
        self.check(req)
        seq = Sequence(req, lambda ev: self._deliver(seq, emit, ev), self.tok, self.eos, self.speculate,
                       self.draft_lengths)
        with self.cv:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(seq)
            self.cv.notify()
        self._gauges()
        return Handle(seq)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self.thread.start()

    def begin_shutdown(self) -> None:
        """Admit nothing more: waiting requests end now (an error event), running ones go on."""
        with self.cv:
            self.stopping = True
            waiting, self.waiting = list(self.waiting), collections.deque()
            self.cv.notify()
        for seq in waiting:
            seq._send(Event(finish_reason="error", error="the server is shutting down; retry on another instance"))

    def stop(self, timeout: float = 0.0) -> None:
        """Stop admitting; let running sequences finish for up to `timeout` seconds, then cut them."""
        self.begin_shutdown()
        deadline = time.perf_counter() + timeout
        while self.running and time.perf_counter() < deadline:
            time.sleep(0.01)
        with self.cv:
            self.thread_exit = True
            self.cv.notify()
        if self.thread:
            self.thread.join(timeout=30)
        for seq in list(self.running.values()) + list(self.waiting):
            seq._send(Event(finish_reason="error", error="the server shut down before this request finished"))
        self.running.clear()
        self.waiting.clear()

    @property
    def busy_slots(self) -> int:
        return len(self.running)

    # -- the worker thread ----------------------------------------------------------------------
    thread_exit = False

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.thread_exit and not self.running and (self.stopping or not self.waiting):
                    self.cv.wait(timeout=0.5)
                if self.thread_exit:
                    return
            try:
                self._step()
            except Exception as e:  # a failing step fails its sequences, not the server
                for seq in list(self.running.values()):  # the error event retires each
                    seq._send(Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))
                if self.metrics:
                    self.metrics.step_errors.inc()

    def _admit(self) -> None:
        with self.cv:
            if self.stopping:
                return
            if not self.ragged and self.running:
                return  # static batches: the next one starts when this one has ended
            while self.waiting and len(self.running) < self.max_batch:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    continue
                seq.slot = self.cache.admit()
                self.running[seq.slot] = seq

    def _deliver(self, seq: Sequence, emit, ev: Event) -> None:
        """A sequence's event to its caller. A final one retires the sequence first: a client holding its last
        token reads gauges without it (an idle server shows 0 running, not the last step's count)."""
        if ev.finish_reason:
            self._retire(seq)
        emit(ev)

    def _retire(self, seq: Sequence) -> None:
        if seq.slot is None or self.running.get(seq.slot) is not seq:  # never admitted, or already retired
            return
        del self.running[seq.slot]
        self.cache.release(seq.slot)
        self._gauges()

    def _step(self) -> None:
        for seq in [s for s in self.running.values() if s.cancelled]:  # clients that went away
            self._retire(seq)
        self._admit()
        self._gauges()
        if not self.running:
            return
        if not self.ragged and any(not s.prefilled for s in self.running.values()):
            self._prefill_batch()
            return
        tokens = [np.zeros(0, np.int64)] * self.cache.slots
        decoding = [s for s in self.running.values() if s.prefilled]
        for s in decoding:
            tokens[s.slot] = s.next_tokens()
        # Nothing decoding: every waiting prompt goes in (a burst is prefilled together, then decodes together);
        # else within the budget that keeps running streams' inter-token latency bounded, oldest first.
        budget = self._prefill_budget(len(decoding)) if decoding else 1 << 30
        prefilled = 0
        for s in sorted((s for s in self.running.values() if not s.prefilled), key=lambda s: s.id):
            n = min(budget - prefilled, len(s.req.prompt) - s.fed, self.prefill_chunk)
            if n <= 0:
                break
            tokens[s.slot] = s.req.prompt[s.fed:s.fed + n]
            s.fed += n
            prefilled += n
        t = time.perf_counter()
        wide = any(len(s.drafts) for s in decoding)  # drafts to check: logits of every column fed
        logits = self.backend.step(self.cache, tokens, last=not wide)
        self._measure(time.perf_counter() - t, len(decoding), prefilled)
        for slot, seq in list(self.running.items()):
            n = len(tokens[slot])
            if not n or not seq.prefilled:
                continue
            # a sequence that finishes retires itself with its final event (_deliver)
            if not wide:
                seq.take(logits[slot], self.metrics)
            elif seq in decoding:
                finished, back = seq.take_speculative(logits[slot, :n], self.metrics)
                if back and not finished:
                    self.cache.rollback(slot, back)
            else:  # a prompt's last chunk, in a step that checks drafts: its last column
                seq.take(logits[slot, n - 1], self.metrics)

    def _prefill_batch(self) -> None:
        """Static batch (non-ragged backend): prefill every admitted prompt together, rows ending together."""
        seqs = list(self.running.values())
        logits = self.gen.prefill(self.cache, [s.slot for s in seqs], [s.req.prompt for s in seqs])
        if self.metrics:
            self.metrics.prompt_tokens.inc(sum(len(s.req.prompt) for s in seqs))
        for s, row in zip(seqs, logits):
            s.fed = len(s.req.prompt)
            if s.cancelled or s.take(row, self.metrics):
                self._retire(s)

    def _prefill_budget(self, decoding: int) -> int:
        """Prefill tokens this step may carry: all it wants when nothing decodes; else as many as keep the step
        within itl_slack x a decode-only step, by the measured cost of a prefill beside decoding (a fixed part,
        one more pass over the weights, plus a part per token); at least 16, so prompts always progress."""
        if not decoding:
            return self.prefill_chunk
        fit = self._cost_fit()
        if self.decode_s is None or fit is None:
            return 32
        a, b = fit
        room = ((self.itl_slack - 1) * self.decode_s - a) / b
        return int(min(self.prefill_chunk, max(16, room)))

    def _cost_fit(self) -> tuple[float, float] | None:
        """Least squares over recent mixed steps: extra seconds = a + b * prefill tokens."""
        if len(self.mixed) < 3:
            return None
        x, y = np.array(self.mixed).T
        if x.std() < 1:
            return max(0.0, float(y.mean() - x.mean() * 1e-3)), 1e-3  # no spread yet: assume 1 ms a token
        b, a = np.polyfit(x, y, 1)
        return max(float(a), 0.0), max(float(b), 1e-5)

    def _measure(self, seconds: float, decoding: int, prefilled: int) -> None:
        if self.metrics and prefilled:
            self.metrics.prompt_tokens.inc(prefilled)
        if prefilled == 0:  # a moving average: the machine's speed drifts
            self.decode_s = seconds if self.decode_s is None else 0.8 * self.decode_s + 0.2 * seconds
        elif decoding and self.decode_s is not None:
            self.mixed.append((prefilled, max(seconds - self.decode_s, 0.0)))

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.waiting.set(len(self.waiting))
            self.metrics.running.set(len(self.running))
            self.metrics.slots_in_use.set(len(self.running))
