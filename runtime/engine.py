"""The engine: one forward step of the exported graph, behind a small interface.

    engine = OrtEngine("build/onnx/smollm2-135m-instruct")
    logits, present = engine.forward(input_ids, attention_mask, position_ids, past)
    # input_ids: [B, S] int64, attention_mask: [B, P+S], position_ids: [B, S], past: 2*L arrays [B, KV, P, D]

Inputs are checked against the manifest before onnxruntime sees them, so a wrong shape or dtype is
reported by name instead of as an onnxruntime stack trace.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .cache import InPlaceKVCache, KVCache, positions
from .errors import UserError
from .manifest import NUMPY_DTYPE, ONNX_NAME, Manifest, ModelArgs


PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def provider_list(provider: str, folder: str | Path) -> list:
    """onnxruntime providers for --provider. TensorRT EP: engines and timing cache are cached in
    FOLDER/ort-trt-cache (the first session builds them, later ones load them); the graph's own types
    decide precision (fp16 artifact -> fp16 kernels, Q/DQ artifact -> int8 kernels), as TensorRT 11
    requires, so no fp16/int8 builder flags are passed."""
    if provider not in PROVIDERS:
        raise UserError(f"--provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    if provider != "tensorrt":
        return list(PROVIDERS[provider])
    cache = Path(folder) / "ort-trt-cache"
    trt = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
           "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
    return [("TensorrtExecutionProvider", trt)] + PROVIDERS["tensorrt"][1:]


ORT_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
             "tensor(float16)": "float16"}


def check_session_io(session, manifest: Manifest, path: Path) -> None:
    """The graph onnxruntime loaded must have the manifest's inputs and outputs (names, dtypes, ranks and
    fixed sizes): another model's ONNX in the folder is refused by name, not run."""
    for kind, got, want in (("inputs", session.get_inputs(), manifest.inputs),
                            ("outputs", session.get_outputs(), manifest.outputs)):
        have = {t.name: t for t in got}
        for spec in want:
            t = have.pop(spec.name, None)
            if t is None:
                raise UserError(f"{path}: the graph has no {kind[:-1]} {spec.name!r} that manifest.json lists; "
                                "not the graph this manifest describes")
            dtype = ORT_TYPES.get(t.type, t.type)
            fixed = [d for d in spec.dims]
            if dtype != spec.dtype or len(t.shape) != len(fixed) or any(
                    isinstance(w, int) and w != g for w, g in zip(fixed, t.shape)):
                raise UserError(f"{path}: {kind[:-1]} {spec.name!r} is {dtype} {list(t.shape)} in the graph, "
                                f"manifest.json says {spec.dtype} {fixed}; not the graph this manifest describes")
        if have:
            raise UserError(f"{path}: the graph has {kind} manifest.json does not list ({', '.join(sorted(have)[:3])}); "
                            "not the graph this manifest describes")


class Backend(Protocol):
    """What generation needs from an engine. OrtEngine implements it over onnxruntime (CPU, CUDA and
    TensorRT execution providers), FusedEngine over the fused graph (onnxruntime CPU and CUDA, in-place
    cache); TrtEngine (runtime/trt.py) implements it over a native TensorRT engine."""

    manifest: Manifest
    args: ModelArgs
    kv_dtype: np.dtype

    def step(self, input_ids, attention_mask, position_ids, cache, logits_out=None,
             last_only: bool = False) -> np.ndarray: ...

    def new_cache(self, batch: int, capacity: int, keep: int | None): ...


class OrtEngine:
    graph = "portable"

    def __init__(self, folder: str | Path, providers: list[str] | None = None, manifest: Manifest | None = None):
        import onnxruntime as ort  # imported here: `import mistral_trt.runtime` stays cheap

        self.folder = Path(folder)
        self.manifest = manifest or Manifest.load(self.folder)
        if self.manifest.graph != self.graph:
            raise UserError(f"{self.folder}/manifest.json: graph {self.manifest.graph!r}; {type(self).__name__} runs "
                            f"graph {self.graph!r} (load it with runtime.trt.load_engine)")
        path = self.folder / ONNX_NAME
        if not path.is_file():
            raise UserError(f"{path}: missing (the export folder is incomplete)")
        self.manifest.check_files(self.folder)  # weights changed after export would run and print garbage
        providers = providers or ["CPUExecutionProvider"]
        first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if first not in ort.get_available_providers():
            raise UserError(f"--provider: this onnxruntime ({ort.__version__}) has no {first}; available: "
                            f"{', '.join(ort.get_available_providers())} (GPU providers come with onnxruntime-gpu)")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise UserError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0][:300]}") from None
        check_session_io(self.session, self.manifest, path)
        self.args = self.manifest.model
        self.kv_dtype = np.dtype(NUMPY_DTYPE[self.manifest.dtype])
        self.past_names = [n for n in self.manifest.input_names() if n.startswith("past_key_values.")]
        self.output_names = self.manifest.output_names()

    def new_cache(self, batch: int, capacity: int, keep: int | None) -> KVCache:
        a = self.args
        return KVCache(a.num_layers, batch, a.num_kv_heads, a.head_dim, capacity, self.kv_dtype, keep)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        a = self.args
        return [np.zeros((batch, a.num_kv_heads, 0, a.head_dim), self.kv_dtype) for _ in self.past_names]

    def step(self, input_ids, attention_mask, position_ids, cache, logits_out: np.ndarray | None = None,
             last_only: bool = False) -> np.ndarray:
        """One step on a preallocated KVCache through onnxruntime IOBinding: past is bound from the
        cache, present is written straight into the cache's other side. Returns logits [B, S, V], or
        [B, 1, V] for the last column with `last_only` (the portable graph computes every column anyway)."""
        a = self.args
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        pos = np.ascontiguousarray(position_ids, dtype=np.int64)
        if mask.shape != (b, cache.length + s) or pos.shape != (b, s):
            raise UserError(f"attention_mask {list(mask.shape)} / position_ids {list(pos.shape)}: expected "
                            f"[{b}, {cache.length + s}] / [{b}, {s}] for {cache.length} cached positions")
        if last_only and s > 1:
            return self.step(ids, mask, pos, cache)[:, -1:]
        logits = logits_out if logits_out is not None else np.empty((b, s, a.vocab_size), self.kv_dtype)
        io = self.session.io_binding()
        for name, arr in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            io.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        for name, arr in zip(self.past_names, cache.past()):
            io.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        io.bind_output("logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        for name, arr in zip(self.output_names[1:], cache.present(s)):
            io.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:  # onnxruntime's own exception types
            raise self._failed(e) from None
        cache.commit(s)
        return logits

    def forward(self, input_ids, attention_mask, position_ids, past):
        """One step. Returns (logits [B, S, V], present: list of 2*L arrays [B, KV, P+S, D])."""
        feed = self._feed(input_ids, attention_mask, position_ids, past)
        try:
            out = self.session.run(self.output_names, feed)
        except Exception as e:  # onnxruntime's own exception types
            raise self._failed(e) from None
        return out[0], out[1:]

    def _failed(self, e: Exception) -> UserError:
        """Inputs were checked against the manifest, so a failure here is the graph's: name it, briefly."""
        msg = str(e).split("Status Message:")[-1].strip().splitlines()[0][:300]
        return UserError(f"{self.folder / ONNX_NAME}: onnxruntime failed running the graph ({msg}); "
                         "the ONNX does not match its manifest or was edited after export")

    def _feed(self, input_ids, attention_mask, position_ids, past) -> dict:
        a = self.args
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise UserError(f"input_ids: expected shape [batch, seq] with seq >= 1, got {list(ids.shape)}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"input_ids: expected integer token ids, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= a.vocab_size):
            raise UserError(f"input_ids: ids must lie in [0, {a.vocab_size}), got {ids.min()}..{ids.max()}")
        b, s = ids.shape
        if len(past) != len(self.past_names):
            raise UserError(f"past: expected {len(self.past_names)} arrays (key and value per layer), got {len(past)}")
        p = past[0].shape[2] if past[0].ndim == 4 else -1
        want = (b, a.num_kv_heads, p, a.head_dim)
        for name, t in zip(self.past_names, past):
            if t.shape != want or t.dtype != self.kv_dtype:
                raise UserError(f"{name}: expected {self.kv_dtype} {list(want)}, got {t.dtype} {list(t.shape)}")
        mask = np.asarray(attention_mask)
        if mask.shape != (b, p + s):
            raise UserError(f"attention_mask: expected shape [batch, past + seq] = [{b}, {p + s}], got {list(mask.shape)}")
        pos = np.asarray(position_ids)
        if pos.shape != (b, s):
            raise UserError(f"position_ids: expected shape [batch, seq] = [{b}, {s}], got {list(pos.shape)}")
        feed = {
            "input_ids": ids.astype(np.int64, copy=False),
            "attention_mask": mask.astype(np.int64, copy=False),
            "position_ids": pos.astype(np.int64, copy=False),
        }
        feed.update(zip(self.past_names, past))
        return feed


class FusedEngine(OrtEngine):
    """The fused graph (export/fused_graph.py) on onnxruntime: same `step` contract as OrtEngine, so
    Generator, verify, eval and bench drive it unchanged; underneath, rows are right-padded and the KV
    cache is one in-place buffer per layer (InPlaceKVCache) bound once and reused every step.

        engine = FusedEngine("build/onnx/smollm2-135m-instruct-fused")
        cache = engine.new_cache(batch=1, capacity=256, keep=None)
        logits = engine.step(ids, np.ones((1, 5)), np.arange(5)[None], cache)   # ids: [1, 5]
    """

    graph = "fused"

    def __init__(self, folder: str | Path, providers: list[str] | None = None, manifest: Manifest | None = None):
        super().__init__(folder, providers, manifest)
        if "logits_index" not in self.manifest.input_names():
            raise UserError(f"{self.folder}/manifest.json: a fused graph without the logits_index input (exported "
                            "before it existed); export it again with `mistral-trt export --graph fused`")
        self._bound = None  # (cache, IOBinding): the cache's buffers stay bound between steps
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def new_cache(self, batch: int, capacity: int, keep: int | None) -> InPlaceKVCache:
        a = self.args
        w = a.sliding_window
        return InPlaceKVCache(a.num_layers, batch, a.num_kv_heads, a.head_dim, max(capacity, w or 0),
                              self.kv_dtype, keep, w, self.device)

    IN_PLACE = "the fused graph updates its KV cache in place: use new_cache() and step(), not forward()"

    def empty_past(self, batch: int):
        raise UserError(self.IN_PLACE)

    def forward(self, input_ids, attention_mask, position_ids, past):
        raise UserError(self.IN_PLACE)

    def _binding(self, cache: InPlaceKVCache):
        if self._bound is None or self._bound[0] is not cache:
            io = self.session.io_binding()
            for name, out, buf in zip(self.past_names, self.output_names[1:], cache.buffers):
                if isinstance(buf, np.ndarray):
                    io.bind_input(name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
                    io.bind_output(out, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
                else:  # an OrtValue in device memory
                    io.bind_ortvalue_input(name, buf)
                    io.bind_ortvalue_output(out, buf)
            self._bound, self._small, self._logits = (cache, io), {}, None
        return self._bound[1]

    def _bind_small(self, io, small: dict, logits: np.ndarray) -> None:
        """Decode steps repeat the same shapes: copy the new values into the arrays already bound instead of
        binding again (each bind costs a few microseconds, a rebind of everything ~0.5 ms per step). The
        engine keeps the bound arrays alive, so the binding never points at freed memory."""
        for name, arr in small.items():
            held = self._small.get(name)
            if held is not None and held.shape == arr.shape:
                np.copyto(held, arr)
                continue
            held = self._small[name] = np.ascontiguousarray(arr)
            io.bind_input(name, "cpu", 0, held.dtype, held.shape, held.ctypes.data)
        if logits is not self._logits:
            io.bind_output("logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
            self._logits = logits

    def step(self, input_ids, attention_mask, position_ids, cache: InPlaceKVCache,
             logits_out: np.ndarray | None = None, last_only: bool = False) -> np.ndarray:
        """The caller's batch is left-padded (Generator, verify): row b's real tokens of this step are its
        last q[b] columns. The graph wants them first: shift, run, shift the logits back. Decode steps
        (one real token per row) need no shift at all. Returns logits [B, S, V], left-aligned like the input;
        with `last_only`, [B, 1, V] for each row's last token, and lm_head runs on those rows alone."""
        a = self.args
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        mask = np.asarray(attention_mask)
        if mask.shape != (b, cache.length + s):
            raise UserError(f"attention_mask {list(mask.shape)}: expected [{b}, {cache.length + s}] "
                            f"for {cache.length} cached positions")
        new = mask[:, -s:]
        q = new.sum(1).astype(np.int32)  # real tokens per row in this step
        if (np.diff(new, axis=1) < 0).any():
            raise UserError("attention_mask: the fused graph needs left-padded rows (padding only before real tokens)")
        pos = np.asarray(position_ids)
        want = positions(cache.tokens, new)  # what Generator feeds
        if pos.shape != (b, s) or ((new == 1) & (pos != want)).any():
            raise UserError(f"position_ids: the fused graph derives positions from the cache; expected {want.tolist()[:2]} "
                            f"(absolute, counting real tokens), got {np.asarray(position_ids).tolist()[:2]}")
        total = cache.tokens + q
        if cache.window is None and total.max() > cache.capacity:
            raise UserError(f"KV cache overflow: {total.max()} positions > capacity {cache.capacity}")
        ragged = bool((q != s).any())
        if ragged:  # left-padded -> right-padded
            shifted = np.zeros_like(ids)
            for r in range(b):
                shifted[r, : q[r]] = ids[r, s - q[r]:]
            ids = shifted
        # A row with no token yet and none now (a long prompt's first chunk beside a short one) is idle:
        # query_seqlens 0 with seqlens_k 0 leaves its cache untouched and its output rows unspecified.
        # logits_index: every column, or (last_only) each row's last real one, which is already in place.
        keep = np.maximum(q - 1, 0).astype(np.int64)[:, None] if last_only else np.tile(np.arange(s), (b, 1))
        small = {"input_ids": ids, "seqlens_k": np.maximum(total - 1, 0).astype(np.int32), "query_seqlens": q,
                 "total_sequence_length": np.array(max(int(total.max()), 1), np.int32), "logits_index": keep}
        shift_back = ragged and not last_only
        shape = (b, keep.shape[1], a.vocab_size)
        out = logits_out if logits_out is not None and not shift_back else np.empty(shape, self.kv_dtype)
        io = self._binding(cache)
        self._bind_small(io, small, out)
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:  # onnxruntime's own exception types
            raise self._failed(e) from None
        cache.commit(s, q)
        if not shift_back:
            out[q == 0] = 0  # idle rows: zeros, as the left-aligned layout gives padding
            return out
        logits = logits_out if logits_out is not None else np.empty((b, s, a.vocab_size), self.kv_dtype)
        for r in range(b):  # right-padded -> left-aligned; padded columns get zeros
            logits[r, s - q[r]:] = out[r, : q[r]]
            logits[r, : s - q[r]] = 0
        return logits
