"""The KV cache owns every sequence: its slot, how many positions it holds, its next absolute position,
and from those, everything the graph needs for a step (mistral-inference's BufferCache is the model).

A cache has `slots` rows. A sequence is admitted into a free slot, fed tokens step by step, and released
when it ends; the slot then takes the next sequence. For a step the caller says how many tokens each slot
gets (`seqlens`, 0: the slot is idle); the cache answers with a `StepPlan`:

    cache = backend.new_cache(slots=2, capacity=64)
    a, b = cache.admit(), cache.admit()                  # 0, 1
    plan = cache.plan(np.array([5, 1]), last=True)       # seqlens: [B]
    ids = cache.pack([prompt_a, [token_b]], plan)        # [B, S], padded on the side the graph wants
    ... the backend binds ids, the plan's arrays and the cache's buffers, runs the graph ...
    cache.commit(plan)
    cache.release(a)

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
class StepPlan:
    """What one step feeds the graph, derived by the cache from its state and `seqlens`."""

    seqlens: np.ndarray  # [B] int: tokens each slot gets (0: idle)
    width: int  # S: the step's columns, max(seqlens) and at least 1
    last: bool  # logits for each row's last token only (generation), or for every token (scoring)
    # ColumnCache (rows left-padded):
    attention_mask: np.ndarray | None = None  # [B, P + S] int64, 1 = attend
    position_ids: np.ndarray | None = None  # [B, S] int64, absolute
    # InPlaceCache (rows right-padded):
    seqlens_k: np.ndarray | None = None  # [B] int32: row b's tokens after this step, minus one
    total_sequence_length: np.ndarray | None = None  # int32 scalar: the largest seqlens_k + 1
    query_seqlens: np.ndarray | None = None  # [B] int32: = seqlens
    logits_index: np.ndarray | None = None  # [B, 1 or S] int64: the columns of each row that get logits


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
        self.side, self.length = 0, 0  # the side `past` is read from; columns held
        self.mask = np.zeros((slots, 0), np.int64)  # [B, length]: which held columns are real tokens
        self.next_pos = np.zeros(slots, np.int64)  # [B]: absolute position of each row's next token

    def _can_admit(self) -> bool:
        return self.length == 0  # no step taken since the cache was empty

    def _reset_slot(self, slot: int) -> None:
        self.next_pos[slot] = 0

    def release(self, slot: int) -> None:
        super().release(slot)
        if not self.active.any():  # the batch is over: start the next one from an empty cache
            self.length, self.mask = 0, np.zeros((self.slots, 0), np.int64)

    def plan(self, seqlens, last: bool = True) -> StepPlan:
        seqlens = self._check_seqlens(seqlens)
        s = max(int(seqlens.max()), 1)
        skipped = self.active & (self.next_pos > 0) & (seqlens == 0)
        if self.sliding_window is not None and skipped.any() and seqlens.any():
            # its padding column would sit between its tokens and widen its window (counted in columns)
            raise UserError(f"slot(s) {np.flatnonzero(skipped).tolist()} take no token this step: with a sliding window "
                            "the rows of this cache (portable graph, TensorRT) advance together; release a "
                            "finished sequence first")
        if self.length + s > self.capacity:
            raise UserError(f"KV cache overflow: {self.length} + {s} positions > capacity {self.capacity}")
        new = (np.arange(s)[None] >= s - seqlens[:, None]).astype(np.int64)  # left-padded: real tokens last
        return StepPlan(seqlens, s, last, attention_mask=np.concatenate([self.mask, new], axis=1),
                        position_ids=positions(self.next_pos, new))

    def pack(self, tokens, plan: StepPlan, vocab_size: int | None = None) -> np.ndarray:
        return pack_rows(tokens, plan.width, "left", vocab_size)

    def past(self) -> list:
        return self.storage.views(self.side, self.length)

    def present(self, plan: StepPlan) -> list:
        return self.storage.views(1 - self.side, self.length + plan.width)

    def commit(self, plan: StepPlan) -> None:
        """The graph ran: `present` becomes the past (with a window: its last `keep` columns, copied back)."""
        total = self.length + plan.width
        self.next_pos += plan.seqlens
        if self.keep is not None and total > self.keep:
            self.storage.keep_tail(1 - self.side, self.side, total, self.keep)
            self.length, self.mask = self.keep, plan.attention_mask[:, total - self.keep:]
        else:
            self.side, self.length, self.mask = 1 - self.side, total, plan.attention_mask


class InPlaceCache(SlotTable):
    """The fused graph's cache (module docstring). `buffers`: 2 * num_layers arrays (or onnxruntime
    OrtValues in device memory) [B, KV, capacity, D], bound as both past_key_values.* and present.*.
    With a sliding window the op itself keeps the window resident (capacity >= W, eviction in blocks)."""

    ragged = True

    def __init__(self, buffers: list, slots: int, capacity: int, sliding_window: int | None):
        super().__init__(slots, capacity)
        if sliding_window is not None and capacity < sliding_window:
            raise UserError(f"capacity {capacity} < sliding_window {sliding_window}: the op keeps W positions")
        self.buffers, self.sliding_window = buffers, sliding_window
        self.tokens = np.zeros(slots, np.int64)  # [B]: tokens each row has seen (= its next absolute position)

    def _reset_slot(self, slot: int) -> None:
        self.tokens[slot] = 0  # the op writes from position 0 again; what was there is never read

    @property
    def next_pos(self) -> np.ndarray:
        return self.tokens

    def plan(self, seqlens, last: bool = True) -> StepPlan:
        seqlens = self._check_seqlens(seqlens)
        s = max(int(seqlens.max()), 1)
        total = self.tokens + seqlens
        if self.sliding_window is None and total.max() > self.capacity:
            raise UserError(f"KV cache overflow: {int(total.max())} positions > capacity {self.capacity}")
        # An idle row (query_seqlens 0) with no tokens yet has seqlens_k 0: the op leaves its cache alone.
        index = (np.maximum(seqlens - 1, 0)[:, None] if last else np.tile(np.arange(s), (self.slots, 1)))
        return StepPlan(seqlens, s, last, seqlens_k=np.maximum(total - 1, 0).astype(np.int32),
                        total_sequence_length=np.array(max(int(total.max()), 1), np.int32),
                        query_seqlens=seqlens.astype(np.int32), logits_index=index.astype(np.int64))

    def pack(self, tokens, plan: StepPlan, vocab_size: int | None = None) -> np.ndarray:
        return pack_rows(tokens, plan.width, "right", vocab_size)

    def commit(self, plan: StepPlan) -> None:
        self.tokens += plan.seqlens

    def rollback(self, slot: int, n: int) -> None:
        """Forget the last n positions of `slot` (speculative drafts the model rejected): the next step writes over
        them. Exact while the op has evicted nothing, i.e. while capacity holds the whole sequence."""
        if not 0 <= n <= self.tokens[slot]:
            raise UserError(f"rollback of {n} positions: slot {slot} holds {int(self.tokens[slot])}")
        self.tokens[slot] -= n
