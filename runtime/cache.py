"""The KV cache owns every sequence: its slot, how many positions it holds, its next absolute position,
and from those, everything the graph needs for a step (mistral-inference's BufferCache is the model).

A cache has `slots` rows. A sequence is admitted into a free slot, fed tokens step by step, and released
when it ends; the slot then takes the next sequence. For a step the caller says how many tokens each slot
gets (`seqlens`, 0: the slot is idle); the cache answers with the step's `StepMetadata`, derived once and
bound as it is by every backend:

    cache = backend.new_cache(slots=2, capacity=64)
    a, b = cache.admit(), cache.admit()                  # 0, 1
    meta = cache.metadata(np.array([5, 1]), last=True)   # seqlens: [B]
    ids = cache.pack([prompt_a, [token_b]], meta)        # [B, S], padded on the side the graph wants
    ... the backend binds ids, the metadata's arrays and the cache's buffers, runs the graph ...
    cache.commit(meta)
    logits = cache.unpack(raw_logits, meta)              # the contract's layout (runtime/backend.py)
    cache.release(a)

(`prepare` is metadata + pack and `finish` commit + unpack, one call each way for a backend.)

Two layouts, one per graph:

* `ColumnCache` (portable graph, TensorRT): the rows share one column axis, [B, KV, P, D] per layer. The
  graph appends the step's S columns (Concat) and returns `present`; two preallocated sides make that the
  only copy: `past` is bound from one side, `present` straight into the other, and the sides swap. Rows are
  left-padded: row b's new tokens are the last seqlens[b] columns of the step, and `attention_mask` (owned
  here, trimmed with the columns) marks the real ones. With a sliding window W the cache keeps its last
  `keep = W - 1` columns after each step (mistral-inference keeps a rolling buffer of W and unrolls it; here
  the trim is the unroll). That reproduces HF exactly because HF counts the window in columns and the rows
  stay column-aligned, which is also why a ColumnCache admits sequences only while it is empty (a batch
  starts together): a sequence joining later would put padding columns between other rows' tokens.
* `InPlaceCache` (fused graph): one buffer per layer, [B, KV, capacity, D], bound as both past and present;
  GroupQueryAttention writes each row's new keys at that row's own length, so rows are independent
  (`ragged`): a sequence may join while others decode, and one step may prefill a chunk in one slot and
  decode one token in another. Rows are right-padded; positions are implicit (each row's own length).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError


def positions(start: np.ndarray, new_mask: np.ndarray) -> np.ndarray:
    """Absolute positions [B, S] of a left-padded step: row b's real tokens continue from start[b] (its
    real tokens so far); padding columns reuse a real position (the mask hides them). Positions never
    reset when a window trims the cache.

        positions(np.array([0, 5]), np.array([[0, 1, 1], [1, 1, 1]]))   # [[0, 0, 1], [5, 6, 7]]
    """
    return start[:, None] + np.maximum(np.cumsum(new_mask, axis=1) - 1, 0)


def pack_rows(rows, width: int | None = None, align: str = "left", vocab_size: int | None = None) -> np.ndarray:
    """Token rows of different lengths as one int64 matrix [B, width], padded with 0 on the other side:
    align "left" puts row b's tokens in the last len(b) columns, "right" in the first. With vocab_size,
    ids outside [0, vocab_size) are refused by name."""
    rows = [np.asarray(r) for r in rows]
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = np.zeros((len(rows), max(width, 1)), np.int64)
    for b, r in enumerate(rows):
        if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
            raise UserError(f"tokens for slot {b}: expected a 1-D list of integer ids, got {r.dtype} {list(r.shape)}")
        if len(r) > width:
            raise UserError(f"tokens for slot {b}: {len(r)} ids, the step is {width} wide")
        if len(r):
            if vocab_size is not None and (r.min() < 0 or r.max() >= vocab_size):
                raise UserError(f"tokens for slot {b}: ids must lie in [0, {vocab_size}), got {r.min()}..{r.max()}")
            if align == "left":
                ids[b, width - len(r):] = r
            else:
                ids[b, :len(r)] = r
    return ids


@dataclass
class Run:
    """One run of the fused graph over the cache's rows [lo, hi): its inputs, each row padded to the run's width."""

    lo: int
    hi: int
    rows: np.ndarray  # the busy rows it carries (absolute slots, ascending)
    width: int  # S of this run: its widest row, at least 1
    seqlens_k: np.ndarray  # [hi - lo] int32: a row's tokens after the step, minus one (0 for an empty idle row)
    total_sequence_length: np.ndarray  # int32 scalar: the largest seqlens_k + 1
    query_seqlens: np.ndarray  # [hi - lo] int32: tokens each row gets in this run (0: idle)
    logits_index: np.ndarray  # [hi - lo, 1 or width] int64: the columns of each row that get logits


@dataclass
class StepMetadata:
    """What one step feeds the graph, derived once by the cache from its state and `seqlens` (the backend binds
    these arrays as they are)."""

    seqlens: np.ndarray  # [B] int: tokens each slot gets (0: idle)
    width: int  # S: the step's columns, max(seqlens) and at least 1
    last: bool  # logits for each row's last token only (generation), or for every token (scoring)
    # ColumnCache (rows left-padded):
    attention_mask: np.ndarray | None = None  # [B, P + S] int64, 1 = attend
    position_ids: np.ndarray | None = None  # [B, S] int64, absolute
    # InPlaceCache (rows right-padded): the runs the step is split into (runs())
    runs: list[Run] | None = None


class SlotTable:
    """Which slots hold a sequence. Shared by both layouts."""

    ragged = False  # may a sequence join while others are running (and a step mix prefill and decode)?

    def __init__(self, slots: int, capacity: int):
        self.slots, self.capacity = slots, capacity
        self.active = np.zeros(slots, bool)

    def admit(self) -> int:
        """Claim a free slot for a new sequence; returns its index."""
        free = np.flatnonzero(~self.active)
        if not len(free):
            raise UserError(f"all {self.slots} cache slots hold a sequence; release one first")
        if not self._can_admit():
            raise UserError("this cache (portable graph, TensorRT) starts a batch together: admit every sequence "
                            "before the first step, or wait until all have been released")
        slot = int(free[0])
        self.active[slot] = True
        self._reset_slot(slot)
        return slot

    def release(self, slot: int) -> None:
        """The sequence in `slot` ended: its memory takes the next one."""
        self.active[slot] = False

    def admit_prefix(self, prompt: np.ndarray) -> tuple[int, int]:
        """admit(), reusing what a slot already holds of `prompt` where the cache can (InPlaceCache): returns
        (slot, positions already held, so not to be fed again)."""
        return self.admit(), 0

    def prepare(self, tokens, last: bool, vocab_size: int | None = None) -> tuple["StepMetadata", np.ndarray]:
        """A step's metadata and its packed ids [B, S] (metadata(), then pack()): what a backend binds."""
        meta = self.metadata([len(t) for t in tokens], last)
        return meta, self.pack(tokens, meta, vocab_size)

    def finish(self, logits: np.ndarray, meta: "StepMetadata") -> np.ndarray:
        """The graph ran: commit the step and return its logits in the contract's layout (unpack())."""
        self.commit(meta)
        return self.unpack(logits, meta)

    def _check_seqlens(self, seqlens) -> np.ndarray:
        seqlens = np.asarray(seqlens, np.int64)
        if seqlens.shape != (self.slots,) or (seqlens < 0).any():
            raise UserError(f"seqlens {seqlens.tolist()}: expected {self.slots} counts >= 0, one per slot")
        if (seqlens[~self.active] > 0).any():
            raise UserError(f"tokens for slot(s) {np.flatnonzero((seqlens > 0) & ~self.active).tolist()}, which hold "
                            "no sequence: admit() first")
        return seqlens

    def _can_admit(self) -> bool:
        return True

    def _reset_slot(self, slot: int) -> None:
        raise NotImplementedError


class ColumnStorage:
    """Host memory of a ColumnCache: per side and tensor (layer i // 2, key if i is even else value) one flat
    buffer; a [B, KV, length, D] tensor is contiguous in its own layout, so it is the buffer's first
    B*KV*length*D elements whatever the capacity. (runtime/cuda.py has the same in device memory.)"""

    def __init__(self, tensors: int, shape: tuple[int, int, int], capacity: int, dtype):
        b, h, d = shape
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.sides = [[np.empty(b * h * capacity * d, dtype) for _ in range(tensors)] for _ in range(2)]

    def views(self, side: int, length: int) -> list[np.ndarray]:
        b, h, d = self.shape
        return [buf[: b * h * length * d].reshape(b, h, length, d) for buf in self.sides[side]]

    def keep_tail(self, src: int, dst: int, total: int, keep: int) -> None:
        """The last `keep` of `total` positions of every (batch, head) row, from side src into side dst."""
        for s, d in zip(self.views(src, total), self.views(dst, keep)):
            np.copyto(d, s[:, :, total - keep:])


class PointerColumns:
    """ColumnStorage's three calls over device memory: `sides[side][tensor]` is a device pointer, and a
    [B, KV, length, D] tensor is its buffer's first B*KV*length*D elements, as on the host. Subclasses allocate
    and trim: runtime/cuda.py's DeviceColumns (cuda-python, for TensorRT engines), runtime/ort.py's OrtColumns
    (onnxruntime's allocator, for its GPU providers)."""

    shape: tuple[int, int, int]  # (B, KV, D)
    sides: list[list[int]]

    def views(self, side: int, length: int) -> list[int]:
        """Device pointers; the tensor shape is [B, KV, length, D] (shape_for)."""
        return self.sides[side]

    def shape_for(self, length: int) -> tuple[int, int, int, int]:
        b, h, d = self.shape
        return (b, h, length, d)


class ColumnCache(SlotTable):
    """Rows on one column axis, double-buffered (module docstring). `storage`: ColumnStorage (host numpy) or a
    PointerColumns in device memory (runtime/cuda.py's DeviceColumns for TensorRT engines, runtime/ort.py's
    OrtColumns for onnxruntime's GPU providers): the same three calls."""

    def __init__(self, storage, slots: int, capacity: int, keep: int | None, sliding_window: int | None = None):
        super().__init__(slots, capacity)
        self.storage, self.keep, self.sliding_window = storage, keep, sliding_window
        self.side, self.columns = 0, 0  # the side `past` is read from; columns held (shared by every row)
        self.mask = np.zeros((slots, 0), np.int64)  # [B, columns]: which held columns are real tokens
        self.next_pos = np.zeros(slots, np.int64)  # [B]: absolute position of each row's next token

    def _can_admit(self) -> bool:
        return self.columns == 0  # no step taken since the cache was empty

    def _reset_slot(self, slot: int) -> None:
        self.next_pos[slot] = 0

    def release(self, slot: int) -> None:
        super().release(slot)
        if not self.active.any():  # the batch is over: start the next one from an empty cache
            self.columns, self.mask = 0, np.zeros((self.slots, 0), np.int64)

    def close(self) -> None:
        """Give the storage's memory back now (device memory is not the garbage collector's: DeviceColumns)."""
        close = getattr(self.storage, "close", None)
        if close is not None:
            close()

    def metadata(self, seqlens, last: bool = True) -> StepMetadata:
        seqlens = self._check_seqlens(seqlens)
        s = max(int(seqlens.max()), 1)
        skipped = self.active & (self.next_pos > 0) & (seqlens == 0)
        if self.sliding_window is not None and skipped.any() and seqlens.any():
            # its padding column would sit between its tokens and widen its window (counted in columns)
            raise UserError(f"slot(s) {np.flatnonzero(skipped).tolist()} take no token this step: with a sliding window "
                            "the rows of this cache (portable graph, TensorRT) advance together; release a "
                            "finished sequence first")
        if self.columns + s > self.capacity:
            raise UserError(f"KV cache overflow: {self.columns} + {s} positions > capacity {self.capacity}")
        new = (np.arange(s)[None] >= s - seqlens[:, None]).astype(np.int64)  # left-padded: real tokens last
        return StepMetadata(seqlens, s, last, attention_mask=np.concatenate([self.mask, new], axis=1),
                            position_ids=positions(self.next_pos, new))

    def pack(self, tokens, meta: StepMetadata, vocab_size: int | None = None) -> np.ndarray:
        return pack_rows(tokens, meta.width, "left", vocab_size)

    def unpack(self, logits: np.ndarray, meta: StepMetadata) -> np.ndarray:
        """The graph's logits [B, S, V] (row b's tokens in its last seqlens[b] columns; S = 1 where only the last
        column came back) in the contract's layout (runtime/backend.py's Backend.step)."""
        if meta.last:
            out = logits[:, -1]
            out[meta.seqlens == 0] = 0
            return out
        s = logits.shape[1]
        out = np.zeros_like(logits)
        for b, n in enumerate(meta.seqlens):
            out[b, :n] = logits[b, s - n:]
        return out

    def past(self) -> list:
        return self.storage.views(self.side, self.columns)

    def present(self, meta: StepMetadata) -> list:
        return self.storage.views(1 - self.side, self.columns + meta.width)

    def commit(self, meta: StepMetadata) -> None:
        """The graph ran: `present` becomes the past (with a window: its last `keep` columns, copied back)."""
        total = self.columns + meta.width
        self.next_pos += meta.seqlens
        if self.keep is not None and total > self.keep:
            self.storage.keep_tail(1 - self.side, self.side, total, self.keep)
            self.columns, self.mask = self.keep, meta.attention_mask[:, total - self.keep:]
        else:
            self.side, self.columns, self.mask = 1 - self.side, total, meta.attention_mask


RUN_COST_TOKENS = 16  # a run's fixed cost (one more pass over the weights) in prefill tokens' worth (CPU: ~18 vs ~1.2 ms)


def runs(q: np.ndarray, room: np.ndarray | None = None, alone: bool = False) -> list[np.ndarray]:
    """How a fused-graph step with q[b] tokens per row splits into runs (each padded to its widest row):
    rows of one token together; rows of several merged while one wider run costs less than separate ones.

        runs(np.array([1, 1, 0, 40, 0, 1]))    # [array([0, 1, 5]), array([3])]

    `room[b]`: positions row b's cache has left. The op pads every row a run spans, busy or idle, to the run's
    width and refuses one whose cached tokens plus that width pass the capacity, so with `room` a run is split
    where a row in its span lacks the room (found as serve --speculate's drafts merged with a prefill chunk).
    `alone`: every row of several tokens runs by itself (onnxruntime < 1.32's op takes several tokens after a past
    in a batch of one only).
    """
    ones, multi = np.flatnonzero(q == 1), np.flatnonzero(q > 1)
    groups = [ones] if len(ones) else []
    if alone:
        groups += [np.array([r]) for r in multi]
    elif len(multi):  # the cost rule even when every busy row is wider: speculative rows of 3-8 tokens beside a
        cur = [int(multi[0])]  # 512-token chunk would otherwise all be padded to 512
        cost = lambda rows: RUN_COST_TOKENS + (rows[-1] - rows[0] + 1) * int(q[rows].max())  # noqa: E731
        for r in multi[1:]:
            if cost(cur + [int(r)]) <= cost(cur) + cost([int(r)]):
                cur.append(int(r))
            else:
                groups.append(np.array(cur))
                cur = [int(r)]
        groups.append(np.array(cur))
    return groups if room is None else [part for g in groups for part in _fitting(g, q, room)]


def _fitting(rows: np.ndarray, q: np.ndarray, room: np.ndarray) -> list[np.ndarray]:
    """A run's rows (ascending) as consecutive runs whose every spanned row has room for the run's width. A row
    alone always fits (the cache's metadata refused an overflow), so this always ends."""
    out, cur = [], [int(rows[0])]
    for r in map(int, rows[1:]):
        if room[cur[0]:r + 1].min() >= max(int(q[cur].max()), int(q[r])):
            cur.append(r)
        else:
            out.append(np.array(cur))
            cur = [r]
    return out + [np.array(cur)]


@dataclass(eq=False)  # entries are compared by identity (their arrays have no single truth value)
class Stored:
    ids: np.ndarray  # [n]: the ids whose keys and values these are, from position 0
    kv: list  # per cache buffer: [KV, n, D]
    used: int  # the store's clock when last matched or put


class PrefixStore:
    """Prefixes kept in host memory once their slot is taken for another sequence (serve --prefix-cache-mib): a
    returning conversation finds its history here when every slot has turned over since. At most `budget` bytes;
    the least recently used entry goes first. An entry whose ids begin another's is dropped (the longer one serves
    both)."""

    def __init__(self, budget: int):
        self.budget, self.bytes, self.clock = budget, 0, 0
        self.entries: list[Stored] = []

    def match(self, prompt: np.ndarray) -> tuple[Stored | None, int]:
        """The entry sharing the longest prefix with `prompt`, and its length."""
        best, n = None, 0
        for e in self.entries:
            k = common_prefix(e.ids, prompt)
            if k > n:
                best, n = e, k
        if best is not None:
            self.clock += 1
            best.used = self.clock
        return best, n

    def put(self, ids: np.ndarray, kv: list) -> None:
        size = sum(a.nbytes for a in kv)
        if size > self.budget or any(len(e.ids) >= len(ids) and common_prefix(e.ids, ids) == len(ids)
                                     for e in self.entries):
            return  # too large for the whole budget, or held already
        for e in [e for e in self.entries if common_prefix(e.ids, ids) == len(e.ids)]:
            self._drop(e)  # it begins the new one
        while self.bytes + size > self.budget:
            self._drop(min(self.entries, key=lambda e: e.used))
        self.clock += 1
        self.entries.append(Stored(ids, kv, self.clock))
        self.bytes += size

    def _drop(self, e: Stored) -> None:
        self.entries.remove(e)
        self.bytes -= sum(a.nbytes for a in e.kv)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


STORE_MIN_TOKENS = 16  # a shorter prefix is cheaper to feed again than to keep
TAIL_SHARE = 4  # a free slot's content past the matched prefix, up to 1/4 of it, is overwritten rather than kept


def zeroed(shape, dtype) -> np.ndarray:
    """A zero array for KV-cache memory, in anonymous pages asked to be huge (Linux: MADV_HUGEPAGE). Like np.zeros
    its pages are committed only when first written, but 2 MiB at a time: on the 2-core VMs measured, writing a
    slot's 47 MB for the first time took 200-600 ms in np.zeros' memory and 30-60 ms here (a prefix copied into a
    slot never used before, or into the store, pays exactly that)."""
    import mmap

    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size < 2**21 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.zeros(shape, dtype)
    m = mmap.mmap(-1, size)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    return np.frombuffer(m, dtype).reshape(shape)


class InPlaceCache(SlotTable):
    """The fused graph's cache (module docstring). `buffers`: 2 * num_layers arrays (or onnxruntime
    OrtValues in device memory) [B, KV, capacity, D], bound as both past_key_values.* and present.*.
    With a sliding window the op itself keeps the window resident (capacity >= W, eviction in blocks)."""

    ragged = True

    def __init__(self, buffers: list, slots: int, capacity: int, sliding_window: int | None,
                 shared_width: bool = False):
        super().__init__(slots, capacity)
        if sliding_window is not None and capacity < sliding_window:
            raise UserError(f"capacity {capacity} < sliding_window {sliding_window}: the op keeps W positions")
        self.buffers, self.sliding_window = buffers, sliding_window
        self.lengths = np.zeros(slots, np.int64)  # [B]: positions each row holds (= its next absolute position)
        # a device cache's runs span every row (rows are not copied between its OrtValues, and a decode step keeps one
        # shape: StaticDecode); under shared_width a row of several tokens runs alone
        self.whole_rows = bool(buffers) and not isinstance(buffers[0], np.ndarray)
        # onnxruntime < 1.32 (runtime/ort.py's shared-width graph): no query_seqlens, so every row a run spans takes
        # the run's width; a shorter row's padding (and an idle row's) lands past its length, written over later
        self.shared_width = shared_width
        # The prefix cache: the ids whose keys and values each slot holds, from position 0, kept after release
        # until the slot is taken again (least recently used first), so a prompt that begins the same way is
        # fed only from where it differs (admit_prefix).
        self.held: list[list[int]] = [[] for _ in range(slots)]
        self.last_used = np.zeros(slots, np.int64)
        self.clock = 0
        self._fed: list | None = None  # the ids of the step being run (pack -> commit)
        self.store: PrefixStore | None = None  # where a taken slot's prefix goes (host buffers only)

    def _reset_slot(self, slot: int) -> None:
        self.lengths[slot] = 0  # the op writes from position 0 again; what was there is never read
        self.held[slot] = []

    def close(self) -> None:
        """Drop the buffers (host arrays, or OrtValues in device memory, freed with their last reference)."""
        self.buffers = []

    def release(self, slot: int) -> None:
        super().release(slot)
        self._touch(slot)

    def _touch(self, slot: int) -> None:
        """`slot` was used now (least recently used slots are taken first)."""
        self.clock += 1
        self.last_used[slot] = self.clock

    def reusable(self, slot: int) -> int:
        """How many of the slot's held positions a new sequence may start from: all of them, unless the op has
        evicted (a sliding window past its capacity): then position 0 is gone, and no prefix is whole."""
        held = len(self.held[slot])
        return held if self.sliding_window is None or self.lengths[slot] <= self.capacity else 0

    def admit_prefix(self, prompt: np.ndarray) -> tuple[int, int]:
        """A slot for `prompt`, starting from the longest prefix of it (matched on ids) that any slot holds, and
        how many positions that is (at most len(prompt) - 1: the last prompt token is always fed, for its logits).

        The prefix is used where it is if its slot is free and holds nothing more; otherwise (a running slot, or a
        free one whose longer content is worth keeping) it is copied into another free slot, an empty one or else
        the least recently used (host buffers; a device cache reuses free slots in place only). A running
        sequence's slot is never taken or written."""
        free = [int(s) for s in np.flatnonzero(~self.active)]
        if not free:
            return self.admit(), 0
        match = [self._common(s, prompt) for s in range(self.slots)]
        cap = max(len(prompt) - 1, 0)
        candidates = free if self.whole_rows else range(self.slots)
        src = max(candidates, key=lambda s: (match[s], not self.active[s], self.last_used[s]))
        n = min(match[src], cap)
        stored, m = self.store.match(prompt) if self.store is not None else (None, 0)
        others = [s for s in free if s != src]
        if min(m, cap) > n:  # the store holds more of it than any slot: into an empty or the LRU free slot
            n, slot = min(m, cap), self._vacate(free)
            for buf, kv in zip(self.buffers, stored.kv):
                buf[slot, :, :n] = kv[:, :n]
            self.held[slot] = stored.ids[:n].tolist()
        elif n and not self.active[src] and (len(self.held[src]) - n <= n // TAIL_SHARE or not others
                                             or self.whole_rows):
            # in place: what is overwritten is a short tail (an old reply after a repeated prompt: cheaper to lose
            # than copying the whole prefix elsewhere), or nothing, or there is nowhere else to go (then a long
            # tail is kept in the store first)
            slot = src
            if len(self.held[slot]) - n > n // TAIL_SHARE:
                self._spill(slot)
        else:
            slot = self._vacate(others if n else free)
            if n:
                for buf in self.buffers:  # [B, KV, capacity, D]
                    buf[slot, :, :n] = buf[src, :, :n]
                self.held[slot] = self.held[src][:n]
        self.active[slot] = True
        self.lengths[slot] = n
        del self.held[slot][n:]
        self._touch(slot)
        return slot, n

    def _vacate(self, pool: list[int]) -> int:
        """A slot of `pool` to write a new sequence into: an empty one, else the least recently used, whose prefix
        goes to the store first."""
        slot = next((s for s in pool if not self.held[s]), None)
        if slot is None:
            slot = min(pool, key=lambda s: self.last_used[s])
            self._spill(slot)
        self.held[slot] = []
        return slot

    def _spill(self, slot: int) -> None:
        """Copy what `slot` holds into the store (before it is overwritten)."""
        n = self.reusable(slot)
        if self.store is not None and not self.whole_rows and n >= STORE_MIN_TOKENS:
            kv = []
            for buf in self.buffers:
                kv.append(zeroed(buf[slot, :, :n].shape, buf.dtype))
                kv[-1][...] = buf[slot, :, :n]
            self.store.put(np.asarray(self.held[slot][:n], np.int64), kv)

    def _common(self, slot: int, prompt: np.ndarray) -> int:
        """Positions at the start of `slot` that hold `prompt`'s first ids."""
        n = self.reusable(slot)
        return common_prefix(np.asarray(self.held[slot][:n], np.int64), prompt) if n else 0

    @property
    def next_pos(self) -> np.ndarray:
        return self.lengths

    def metadata(self, seqlens, last: bool = True) -> StepMetadata:
        """The runs the step is split into (runs(): the graph pads each row of a run to the run's widest), each with
        its rows' inputs. Without a window a row's room is capacity - length (with one the op evicts: it always has
        room); a device cache binds every row in every run, which no split can help."""
        seqlens = self._check_seqlens(seqlens)
        s = max(int(seqlens.max()), 1)
        if self.sliding_window is None and (self.lengths + seqlens).max() > self.capacity:
            raise UserError(f"KV cache overflow: {int((self.lengths + seqlens).max())} positions > capacity "
                            f"{self.capacity}")
        room = None if self.sliding_window is not None or self.whole_rows else self.capacity - self.lengths
        out = []
        for rows in runs(seqlens, room, alone=self.shared_width):  # none when every row is idle
            whole = self.whole_rows and not (self.shared_width and len(rows) == 1 and seqlens[rows[0]] > 1)
            lo, hi = (0, self.slots) if whole else (int(rows[0]), int(rows[-1]) + 1)
            q = np.zeros(hi - lo, np.int64)
            q[rows - lo] = seqlens[rows]
            w = int(q.max())
            if self.shared_width:
                # each row's positions run from its length; a row of several tokens runs alone, so the only padding
                # is an idle row's one column in a decode run, past its length (its length counts real tokens only)
                self._make_room(lo, hi, q, w)
                k = self.lengths[lo:hi] + w - 1
            else:  # an idle row (query_seqlens 0) with no tokens yet has seqlens_k 0: the op leaves its cache alone
                k = np.maximum(self.lengths[lo:hi] + q - 1, 0)
            index = np.maximum(q - 1, 0)[:, None] if last else np.tile(np.arange(w), (hi - lo, 1))
            out.append(Run(lo, hi, rows, w, k.astype(np.int32), np.array(int(k.max()) + 1, np.int32),
                           q.astype(np.int32), index.astype(np.int64)))
        return StepMetadata(seqlens, s, last, runs=out)

    def _make_room(self, lo: int, hi: int, q: np.ndarray, w: int) -> None:
        """A shared-width run writes `w` columns into every row it spans, idle ones too (a decode run's one column).
        An idle row whose cache is full gives up the last positions of the prefix it keeps for them; the op would
        refuse the step otherwise (a busy row's overflow was refused before this)."""
        for r in np.flatnonzero((self.lengths[lo:hi] + w > self.capacity) & (q == 0)):
            slot = lo + int(r)
            if self.sliding_window is not None and self.lengths[slot] > self.capacity:
                continue  # past its capacity the op evicts, as with query_seqlens (no whole prefix is kept there)
            self.lengths[slot] = max(self.capacity - w, 0)
            del self.held[slot][self.lengths[slot]:]

    def pack(self, tokens, meta: StepMetadata, vocab_size: int | None = None) -> np.ndarray:
        self._fed = tokens
        return pack_rows(tokens, meta.width, "right", vocab_size)

    def unpack(self, logits: np.ndarray, meta: StepMetadata) -> np.ndarray:
        """The graph's logits [B, L, V] (L = 1 with last; row b's in its first seqlens[b] columns) in the
        contract's layout."""
        if meta.last:
            out = logits[:, 0]
            out[meta.seqlens == 0] = 0
            return out
        for b, n in enumerate(meta.seqlens):
            logits[b, n:] = 0
        return logits

    def commit(self, meta: StepMetadata) -> None:
        self.lengths += meta.seqlens
        if self._fed is not None:
            for slot in np.flatnonzero(meta.seqlens):
                self.held[slot].extend(int(t) for t in self._fed[slot])
            self._fed = None

    def rollback(self, slot: int, n: int) -> None:
        """Forget the last n positions of `slot` (speculative drafts the model rejected): the next step writes over
        them. Exact while the op has evicted nothing, i.e. while capacity holds the whole sequence."""
        if not 0 <= n <= self.lengths[slot]:
            raise UserError(f"rollback of {n} positions: slot {slot} holds {int(self.lengths[slot])}")
        self.lengths[slot] -= n
        del self.held[slot][len(self.held[slot]) - n:]
