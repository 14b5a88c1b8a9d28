"""The model worker: one thread owns the backend and its cache; between steps it admits waiting requests into
free slots and retires finished or cancelled ones (continuous batching; vLLM's scheduler in miniature).

    sched = Scheduler(open_backend(export_dir), tokenizer, max_batch=8, max_context=4096)
    sched.start()
    handle = sched.submit(Request(prompt=ids, max_tokens=64, sampling=Sampling()), emit=print)
    # emit gets Output(text="Hello", ...), ..., Output(finish_reason="stop", ...) from the worker thread
    handle.cancel()      # a client that went away: its slot is free after the next step

The scheduler only schedules: admit, budget, step, retire. Everything about one request (sampling, drafts, text,
stop strings, EOS, logprobs) is runtime/sequence.py's Sequence, the same one `mistral-trt generate` steps.

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
from pathlib import Path

import numpy as np

from mistral_trt.runtime.cache import PrefixStore
from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.generate import Generator
from mistral_trt.runtime.request import Request, fit_context
from mistral_trt.runtime.sequence import Output, Sequence
from mistral_trt.runtime.speculative import draft_lengths
from mistral_trt.runtime.tokenizer import Tokenizer

__all__ = ["Output", "QueueFull", "Request", "Scheduler"]


class QueueFull(Exception):
    """The waiting queue is full: the caller answers 429 with Retry-After."""


class Handle:
    def __init__(self, entry: "Entry", scheduler: "Scheduler"):
        self._entry, self._scheduler = entry, scheduler

    def cancel(self) -> None:
        """The caller went away: a waiting request leaves the queue now (it no longer counts against --max-queue);
        a running one frees its slot at the next step."""
        self._entry.cancelled = True
        self._scheduler._unqueue(self._entry)

    def timings(self) -> dict:
        """Seconds from arrival to admission into a slot and to the first token (None: not yet), for access logs."""
        e = self._entry
        t0, first = e.seq.t0, e.seq.first_token_at
        return {"queue_s": None if e.admitted_at is None else round(e.admitted_at - t0, 4),
                "ttft_s": None if first is None else round(first - t0, 4)}


class Entry:
    """A request in the scheduler: its Sequence, where its outputs go, and what scheduling needs."""

    ids = itertools.count()

    def __init__(self, seq: Sequence, emit):
        self.seq, self.emit = seq, emit
        self.id = next(self.ids)  # arrival order
        self.slot: int | None = None
        self.cancelled = False
        self.admitted_at: float | None = None
        self.last_token_at: float | None = None
        self.leader: Entry | None = None  # n > 1: the first choice, whose prompt this one copies once it is fed
        self.ended = False  # retired or failed: a sibling waits for it no longer


DEFAULT_STORE_MIB = 1024


def available_memory() -> int | None:
    """Bytes of memory the kernel says a new allocation can have (MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def store_budget(cache, mib: float | None) -> int:
    """Bytes for prefixes kept after their slot is taken (`serve --prefix-cache-mib`): `mib`, refused when it and
    the slots' own cache (reserved, filled as used) pass the memory available; unset: 1024 MiB, or a quarter of
    what the slots leave if that is less."""
    slots = sum(b.nbytes for b in cache.buffers)
    free = available_memory()
    if mib is None:
        return int(min(DEFAULT_STORE_MIB * 2**20, max(free - slots, 0) // 4)) if free else DEFAULT_STORE_MIB * 2**20
    want = int(mib * 2**20)
    if free is not None and want + slots > free:
        raise UserError(f"--prefix-cache-mib {mib:g}: {want / 2**30:.1f} GiB for kept prefixes plus "
                        f"{slots / 2**30:.1f} GiB for the {cache.slots} slots' KV cache pass the {free / 2**30:.1f} GiB "
                        f"of memory available; at most {max(free - slots, 0) // 2**20} MiB")
    return want


class Scheduler:
    def __init__(self, backend, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64,
                 max_context: int | None = None, prefill_chunk: int = 512, itl_slack: float = 2.5, metrics=None,
                 speculate=None, prefix_cache: bool = True, prefix_cache_mib: float | None = None):
        self.backend, self.tok, self.metrics, self.speculate = backend, tokenizer, metrics, speculate
        self.draft_lengths = draft_lengths(backend.manifest)  # drafts after a match of 1, 2, 3 tokens, by the export
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = min(max_context or backend.max_context, backend.max_context)
        self.gen = Generator(backend, prefill_chunk)  # chunk sizes, the cache's size, the static-batch prefill
        self.prefill_chunk, self.itl_slack = self.gen.chunk, itl_slack
        self.eos = set(backend.manifest.eos_token_id)
        self.ragged = backend.ragged
        self.cache = self.gen.new_cache(max_batch, self.max_context, speculate)
        self.prefix_cache = prefix_cache  # reuse what a slot holds of a new prompt (the fused graph's cache)
        self.prefix_cache_bytes = 0
        host_slots = self.ragged and not self.cache.whole_rows  # prefixes can be copied out of and into slots
        if prefix_cache_mib is not None and not host_slots:
            raise UserError(f"--prefix-cache-mib {prefix_cache_mib}: prefixes are kept in host memory for the fused "
                            "graph's cache on the CPU" + ("" if self.ragged else " (this export's cache starts each "
                            "static batch fresh: export --graph fused)"))
        if prefix_cache and host_slots:
            self.prefix_cache_bytes = store_budget(self.cache, prefix_cache_mib)
            if self.prefix_cache_bytes:
                self.cache.store = PrefixStore(self.prefix_cache_bytes)
        self.waiting: collections.deque[Entry] = collections.deque()
        self.running: dict[int, Entry] = {}  # slot -> entry
        self.cv = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        # measured step costs (seconds), for the prefill budget: a decode-only step, and what prefill adds to it
        self.decode_s: float | None = None
        self.mixed: collections.deque = collections.deque(maxlen=32)  # (prefill tokens, extra seconds)

    # -- the API side (any thread) ---------------------------------------------------------------
    def check(self, req: Request) -> None:
        """Refuse what can never run (the caller turns it into a 400): runtime/generate.py's one context rule."""
        fit_context(req.prompt, req.max_tokens, self.max_context, names={"max_new_tokens": "max_tokens"})

    def submit(self, req: Request, emit, after: Handle | None = None) -> Handle:
        """Queue `req`; `emit(Output)` gets its outputs (the worker's thread). `after`: a request with the same
        prompt (n > 1's first choice): this one is admitted once that one's prompt is in the cache, and copies it
        from there (the prefix cache), so n choices prefill their prompt once."""
        self.check(req)
        entry = Entry(Sequence(req, self.tok, self.eos, self.speculate, self.draft_lengths), None)
        entry.leader = after._entry if after is not None else None
        entry.emit = lambda out: self._deliver(entry, emit, out)
        with self.cv:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(entry)
            self.cv.notify()
        self._gauges()
        return Handle(entry, self)

    def _unqueue(self, entry: "Entry") -> None:
        with self.cv:
            try:
                self.waiting.remove(entry)
            except ValueError:  # admitted already, or never queued
                return
        self._gauges()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self.thread.start()

    def begin_shutdown(self) -> None:
        """Admit nothing more: waiting requests end now (an error event), running ones go on."""
        with self.cv:
            self.stopping = True
            waiting, self.waiting = list(self.waiting), collections.deque()
            self.cv.notify()
        for e in waiting:
            self._fail(e, "the server is shutting down; retry on another instance")

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
            self.thread.join(timeout=5)  # a step in flight; the process may exit without it (a daemon)
        for e in list(self.running.values()) + list(self.waiting):
            self._fail(e, "the server shut down before this request finished")
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
            except Exception as err:  # a failing step fails its sequences, not the server
                for e in list(self.running.values()):  # the error event retires each
                    self._fail(e, f"{type(err).__name__}: {err}")
                if self.metrics:
                    self.metrics.step_errors.inc()

    def _fail(self, e: Entry, why: str) -> None:
        e.ended = True
        seq = e.seq
        e.emit(Output(finish_reason="error", error=why, prompt_tokens=len(seq.prompt),
                      completion_tokens=len(seq.generated)))

    def _admit(self) -> None:
        with self.cv:
            if self.stopping:
                return
            if not self.ragged and self.running:
                return  # static batches: the next one starts when this one has ended
            held: list[Entry] = []  # siblings whose leader's prompt is not in the cache yet: they keep their place
            while self.waiting and len(self.running) < self.max_batch:
                e = self.waiting.popleft()
                if e.cancelled:
                    continue
                lead = e.leader
                if lead is not None and self.prefix_cache and not (lead.seq.prefilled or lead.cancelled or lead.ended):
                    held.append(e)
                    continue
                try:
                    if self.prefix_cache:
                        e.slot, cached = self.cache.admit_prefix(e.seq.prompt)
                        e.seq.skip(cached)
                        if self.metrics:
                            self.metrics.prefix_queries.inc(len(e.seq.prompt))
                            self.metrics.prefix_hits.inc(cached)
                    else:
                        e.slot = self.cache.admit()
                except Exception as err:  # out of the queue and not running: it must end here, or it waits forever
                    self._fail(e, f"{type(err).__name__}: {err}")
                    if self.metrics:
                        self.metrics.step_errors.inc()
                    continue
                e.admitted_at = time.perf_counter()
                self.running[e.slot] = e
            self.waiting.extendleft(reversed(held))

    def _deliver(self, e: Entry, emit, out: Output) -> None:
        """An entry's output to its caller. A final one retires the entry first: a client holding its last
        token reads gauges without it (an idle server shows 0 running, not the last step's count)."""
        if out.finish_reason:
            self._retire(e)
            if self.metrics:
                end = time.perf_counter()
                admitted = e.admitted_at or end
                self.metrics.observe_request(e.seq.t0, admitted, e.seq.first_token_at or end, end,
                                             len(e.seq.prompt), len(e.seq.generated))
        emit(out)

    def _retire(self, e: Entry) -> None:
        e.ended = True
        if e.slot is None or self.running.get(e.slot) is not e:  # never admitted, or already retired
            return
        del self.running[e.slot]
        self.cache.release(e.slot)
        self._gauges()

    def _observe(self, e: Entry, tokens: list[int]) -> None:
        """Time to first token and inter-token latency, per token taken."""
        now = time.perf_counter()
        for _ in tokens:
            if self.metrics:
                if e.last_token_at is None:
                    self.metrics.ttft.observe(now - e.seq.t0)
                else:
                    self.metrics.itl.observe(now - e.last_token_at)
                self.metrics.generation_tokens.inc()
            e.last_token_at = now

    def _update(self, e: Entry, logits: np.ndarray) -> None:
        """Hand the entry's logits [m, V] to its sequence, and what comes back to the cache and the caller."""
        st = e.seq.stats
        drafted, accepted = st.drafted, st.accepted
        u = e.seq.update(logits)
        self._observe(e, u.tokens)
        if self.metrics and st.drafted > drafted:
            self.metrics.drafted.inc(st.drafted - drafted)
            self.metrics.accepted.inc(st.accepted - accepted)
        if u.rollback:
            self.cache.rollback(e.slot, u.rollback)
        if u.output is not None:
            e.emit(u.output)  # a final output retires the entry (_deliver)

    def _step(self) -> None:
        for e in [e for e in self.running.values() if e.cancelled]:  # clients that went away
            self._retire(e)
        self._admit()
        self._gauges()
        if not self.running:
            return
        if not self.ragged and any(not e.seq.prefilled for e in self.running.values()):
            self._prefill_batch()
            return
        tokens = [np.zeros(0, np.int64)] * self.cache.slots
        decoding = [e for e in self.running.values() if e.seq.prefilled]
        for e in decoding:
            tokens[e.slot] = e.seq.decode_tokens()
        # Nothing decoding: every waiting prompt goes in (a burst is prefilled together, then decodes together);
        # else within the budget that keeps running streams' inter-token latency bounded, oldest first.
        budget = self._prefill_budget(len(decoding)) if decoding else 1 << 30
        prefilled = 0
        for e in sorted((e for e in self.running.values() if not e.seq.prefilled), key=lambda e: e.id):
            n = min(budget - prefilled, len(e.seq.prompt) - e.seq.fed, self.prefill_chunk)
            if n <= 0:
                break
            tokens[e.slot] = e.seq.feed(n)
            prefilled += n
        t = time.perf_counter()
        wide = any(e.seq.wants_all_logits for e in decoding)  # drafts to check: logits of every column fed
        logits = self.backend.step(self.cache, tokens, last=not wide)
        self._measure(time.perf_counter() - t, len(decoding), prefilled)
        for slot, e in list(self.running.items()):
            n = len(tokens[slot])
            if n and e.seq.prefilled:  # decoding, or a prompt whose last chunk this was
                self._update(e, logits[slot, :n] if wide else logits[slot][None])

    def _prefill_batch(self) -> None:
        """Static batch (non-ragged backend): prefill every admitted prompt together, rows ending together."""
        entries = list(self.running.values())
        logits = self.gen.prefill_together(self.cache, [e.slot for e in entries], [e.seq for e in entries])
        if self.metrics:
            self.metrics.prompt_tokens.inc(sum(len(e.seq.prompt) for e in entries))
        for e, row in zip(entries, logits):
            if e.cancelled:
                self._retire(e)
            else:
                self._update(e, row[None])

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
            held = getattr(self.cache, "held", None)
            if held is not None:
                cap = self.cache.capacity
                self.metrics.kv_usage.set(sum(min(len(h), cap) for h in held) / (self.cache.slots * cap))
            if self.prefix_cache_bytes:
                self.metrics.prefix_kept_bytes.set(self.cache.store.bytes)
