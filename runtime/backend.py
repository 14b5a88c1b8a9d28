"""One step contract for every way of running an export: `Backend`.

    backend = open_backend("build/onnx/smollm2-135m-instruct-fused-fp32")  # portable, fused or a TensorRT engine
    cache = backend.new_cache(slots=2, capacity=256)                       # runtime/cache.py
    a, b = cache.admit(), cache.admit()
    logits = backend.step(cache, [prompt_a, prompt_b])   # tokens per slot -> [2, V]: each row's next-token logits
    logits = backend.step(cache, [[5], []])              # slot b idle this step: its row is zeros
    all_ = backend.step(cache, [[7, 8], [9]], last=False)  # [2, 2, V]: logits of every token, row b's first n_b

Three siblings implement it: `PortableBackend` and `FusedBackend` (runtime/ort.py, onnxruntime) and
`TensorRTBackend` (runtime/tensorrt_backend.py, a native engine). Each asks its cache for the step's metadata
(positions, mask or sequence lengths and runs: the cache owns them, runtime/cache.py), has the cache pack the
tokens on the side its graph wants, binds, runs, and has the cache unpack the logits and commit. `ragged` says whether slots advance independently: the fused graph's do (a sequence
may join a running batch; one step may prefill one slot and decode another); the portable graph's and
TensorRT's share a column axis, so a batch starts together (runtime/cache.py says why), and a caller with
new sequences waits for the batch to end.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .engine import ENGINE_MANIFEST
from .errors import UserError
from .manifest import Manifest, ModelArgs
from .ort import FusedBackend, PortableBackend, provider_list


class Backend(Protocol):
    manifest: Manifest
    args: ModelArgs
    kv_dtype: np.dtype  # of the KV cache and the logits
    ragged: bool  # slots advance independently (module docstring)
    max_context: int  # positions one sequence may reach: the model's limit, or a TensorRT engine's max_context
    max_step_tokens: int | None  # tokens per slot in one step (a TensorRT engine's prefill profile); None: any
    prefill_past_max: int | None  # past positions a multi-token step may follow (an engine's prefill profile)
    provider: str  # what runs the graph: onnxruntime's provider name (CPUExecutionProvider, ...) or "tensorrt"

    def new_cache(self, slots: int, capacity: int, trim: bool = True):
        """A cache of `slots` sequences of up to `capacity` positions. trim=False keeps every position even with
        a sliding window (the graph's own window mask then applies: export/verify.py checks both ways)."""
        ...

    def step(self, cache, tokens: Sequence, last: bool = True) -> np.ndarray:
        """tokens[b]: the ids slot b gets this step (empty: idle). Returns logits [B, V] of each row's last
        token (last=True; idle rows zeros) or [B, S, V] of every token, row b's in its first seqlens[b]
        columns (last=False; the rest zeros). The array is valid until the next step."""
        ...


def open_backend(folder: str | Path, provider: str = "cpu", exact: bool = False):
    """An engine folder (engine.json) -> TensorRTBackend; an export folder -> PortableBackend or FusedBackend
    (by the manifest's graph) on onnxruntime's `provider`. The files are checked against the manifest first.
    `exact`: the artifact's own arithmetic where the provider would approximate it for speed (weight-only
    int8-w8a16 / int4-w4a16 on the CPU provider: float activations, not int8; 10-20x slower): `eval` asks for it."""
    if (Path(folder) / ENGINE_MANIFEST).is_file():
        from .tensorrt_backend import TensorRTBackend  # imports nothing of TensorRT's until it opens one

        return TensorRTBackend(folder)
    m = Manifest.load(folder)
    if m.graph == "fused" and provider == "tensorrt":
        raise UserError(f"{folder}: the fused graph uses onnxruntime contrib ops TensorRT does not have; "
                        "export the portable graph for TensorRT (mistral-trt export --graph portable)")
    cls = FusedBackend if m.graph == "fused" else PortableBackend
    return cls(folder, providers=provider_list(provider, folder, m), manifest=m, exact=exact)
