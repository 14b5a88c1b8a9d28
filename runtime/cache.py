"""The KV cache: preallocated per-layer buffers, double-buffered around the graph.

The exported graph appends this step's keys/values to `past` and returns the result as `present`, so
every step reads the cache once and writes it once (inside the graph's Concat). Two preallocated sides
make that the only work: `past` is bound from one side, `present` is bound straight into the other,
and the sides swap. Nothing is allocated per step and nothing goes through numpy conversion.

With a sliding window W the cache is trimmed to its last `keep = W - 1` positions after each step
(mistral-inference keeps a rolling buffer of W and unrolls it; here the trim is the unroll):

    cache = KVCache(num_layers=2, batch=1, kv_heads=2, head_dim=16, capacity=7 + 512, dtype=np.float32, keep=7)
    past = cache.past()            # 2*L arrays [B, KV, length, D], views into side A
    present = cache.present(n)     # 2*L arrays [B, KV, length + n, D], views into side B
    ... run the graph with past -> present ...
    cache.commit(n)                # swap sides, or copy the last `keep` positions back into side A
"""
from __future__ import annotations

import numpy as np


def positions(start: np.ndarray, new_mask: np.ndarray) -> np.ndarray:
    """Absolute positions [B, S] of a left-padded step: row b's real tokens continue from start[b] (its
    real tokens so far); padding columns reuse a real position (the mask hides them). Positions never
    reset when a window trims the cache.

        positions(np.array([0, 5]), np.array([[0, 1, 1], [1, 1, 1]]))   # [[0, 0, 1], [5, 6, 7]]
    """
    return start[:, None] + np.maximum(np.cumsum(new_mask, axis=1) - 1, 0)


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype, keep: int | None = None):
        self.shape = (batch, kv_heads, head_dim)
        self.capacity, self.keep, self.length = capacity, keep, 0
        n = batch * kv_heads * capacity * head_dim
        # sides[s][i]: flat buffer of tensor i (layer i // 2, key if i is even else value) on side s
        self.sides = [[np.empty(n, dtype) for _ in range(2 * num_layers)] for _ in range(2)]
        self.side = 0

    def _views(self, side: int, length: int) -> list[np.ndarray]:
        b, h, d = self.shape
        # A [B, KV, length, D] tensor is contiguous in its own layout: it lives in the buffer's first
        # B*KV*length*D elements, whatever the capacity.
        return [buf[: b * h * length * d].reshape(b, h, length, d) for buf in self.sides[side]]

    def past(self) -> list[np.ndarray]:
        return self._views(self.side, self.length)

    def present(self, new: int) -> list[np.ndarray]:
        total = self.length + new
        assert total <= self.capacity, f"KV cache overflow: {total} positions > capacity {self.capacity}"
        return self._views(1 - self.side, total)

    def commit(self, new: int) -> int:
        """Make the present the past. Returns how many oldest positions were dropped (window trim)."""
        total = self.length + new
        if self.keep is not None and total > self.keep:
            src = self._views(1 - self.side, total)
            dst = self._views(self.side, self.keep)
            for s, d in zip(src, dst):
                np.copyto(d, s[:, :, total - self.keep:])
            self.length = self.keep
            return total - self.keep
        self.side, self.length = 1 - self.side, total
        return 0


class InPlaceKVCache:
    """The fused graph's cache (export/fused_graph.py): one buffer per layer and kind, [B, KV, capacity, D],
    bound as both `past` and `present`; onnxruntime's GroupQueryAttention writes the new positions into it.

    Nothing is copied between steps, so a decode step reads the cache once and writes one position. Rows
    are independent: `tokens[b]` counts row b's real tokens (padding never enters the buffer). With a
    sliding window the op itself keeps the window resident (capacity >= W, eviction in blocks).
    `length` mirrors KVCache.length (padded columns kept) so Generator's mask bookkeeping is unchanged.

        cache = InPlaceKVCache(num_layers=2, batch=1, kv_heads=2, head_dim=16, capacity=64, dtype=np.float32)
        ... engine.step(ids, mask, pos, cache) ...   # binds cache.buffers, then cache.commit(new, real)
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype, keep: int | None = None, window: int | None = None, device: str = "cpu"):
        assert window is None or capacity >= window, f"capacity {capacity} < window {window}: the op keeps W positions"
        self.capacity, self.keep, self.window, self.length = capacity, keep, window, 0
        shape = (batch, kv_heads, capacity, head_dim)
        if device == "cpu":  # numpy arrays
            self.buffers = [np.zeros(shape, dtype) for _ in range(2 * num_layers)]
        else:  # onnxruntime OrtValues in device memory (CUDA provider): the cache never crosses PCIe
            import onnxruntime as ort

            self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0) for _ in range(2 * num_layers)]
        self.tokens = np.zeros(batch, np.int64)  # real tokens per row, all time (positions are absolute)

    def commit(self, new: int, real: np.ndarray) -> int:
        """`new` padded columns fed, `real[b]` of them real for row b. Returns the mask columns to drop."""
        self.tokens += real
        total = self.length + new
        self.length = min(total, self.keep) if self.keep is not None else total
        return total - self.length
