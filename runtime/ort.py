"""The two onnxruntime backends (runtime/backend.py's contract), siblings sharing one session loader:

    PortableBackend   the traced graph (standard ONNX ops): ColumnCache, rows left-padded, the graph's Concat
                      appends to the cache, bound with IOBinding so present lands straight in the other side
                      (in the GPU's memory under a GPU provider: OrtColumns)
    FusedBackend      the fused graph (onnxruntime contrib ops): InPlaceCache, rows right-padded,
                      GroupQueryAttention writes the cache in place; ragged rows

    backend = PortableBackend("build/onnx/smollm2-135m-instruct-fp32")
    cache = backend.new_cache(slots=1, capacity=256); cache.admit()
    logits = backend.step(cache, [prompt_ids])     # [1, V]

Either session is checked before it runs: the folder's files against the manifest's sha256, the provider
against what this onnxruntime has, the graph's inputs and outputs against the manifest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import ColumnCache, ColumnStorage, InPlaceCache, PointerColumns, zeroed
from .errors import UserError
from .manifest import NUMPY_DTYPE, ONNX_NAME, WEIGHT_ONLY, Manifest


PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


ORT_TRT_LIMITS = (16, 512)  # the TensorRT provider's profiles: up to 16 rows, prefill chunks up to 512 tokens


def provider_list(provider: str, folder: str | Path, manifest: Manifest | None = None) -> list:
    """onnxruntime providers for --provider. TensorRT EP: engines and timing cache are cached in
    FOLDER/ort-trt-cache (the first session builds them, later ones load them); the graph's own types
    decide precision (fp16 artifact -> fp16 kernels, Q/DQ artifact -> int8 kernels), as TensorRT 11
    requires, so no fp16/int8 builder flags are passed. With the manifest, the engine gets the prefill and decode
    profiles `mistral-trt engine` builds (trt_profile_options): without them the provider builds for the shapes it
    has seen, and builds again each time the past grows past them."""
    if provider not in PROVIDERS:
        raise UserError(f"--provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    if provider != "tensorrt":
        return list(PROVIDERS[provider])
    cache = Path(folder) / "ort-trt-cache"
    trt = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
           "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
    if manifest is not None:
        trt.update(trt_profile_options(manifest))
    return [("TensorrtExecutionProvider", trt)] + PROVIDERS["tensorrt"][1:]


def trt_profile_options(manifest: Manifest, max_batch: int = ORT_TRT_LIMITS[0],
                        max_step_tokens: int = ORT_TRT_LIMITS[1]) -> dict:
    """onnxruntime's TensorRT provider options for runtime/engine.py's two profiles (prefill, decode) over the model's
    whole context: "name:AxBxC,..." per min/opt/max, each input named once per profile, in profile order."""
    from .engine import PROFILES, profile_shapes

    shapes = profile_shapes(manifest, max_batch, max_step_tokens, manifest.max_context)
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    return {key: ",".join(f"{name}:{'x'.join(map(str, dims[k]))}" for p in PROFILES for name, dims in shapes[p].items())
            for k, key in enumerate(keys)}


ORT_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
             "tensor(float16)": "float16"}


def check_session_io(session, manifest: Manifest, path: Path, without: tuple = ()) -> None:
    """The graph onnxruntime loaded must have the manifest's inputs and outputs (names, dtypes, ranks and
    fixed sizes): another model's ONNX in the folder is refused by name, not run. `without`: inputs the loader
    took out (shared_width_graph)."""
    inputs = [t for t in manifest.inputs if t.name not in without]
    for kind, got, want in (("inputs", session.get_inputs(), inputs),
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


SHARED_WIDTH_BELOW = (1, 32)  # GroupQueryAttention's query_seqlens (right-padded rows of their own lengths) came in 1.32


def shared_width_graph(path: Path) -> bytes:
    """The fused graph as onnxruntime < 1.32 reads it: each GroupQueryAttention without its query_seqlens input,
    and the graph without that input. Every row of a call then takes the call's width (the cache pads the shorter
    rows: runtime/cache.py's shared_width), with the same arithmetic for the real tokens. Weights in
    model.onnx.data stay where they are (not read here); inline ones travel in the bytes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and "query_seqlens" in node.input:
            inputs = [i for i in node.input if i != "query_seqlens"]
            while inputs and not inputs[-1]:
                inputs.pop()  # trailing optional inputs left empty
            del node.input[:]
            node.input.extend(inputs)
    kept = [i for i in model.graph.input if i.name != "query_seqlens"]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model.SerializeToString()


def ort_version(text: str) -> tuple[int, int]:
    """'1.31.1' -> (1, 31); '1.32.0.dev20261101' -> (1, 32)."""
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def open_session(folder: Path, manifest: Manifest, providers: list | None, graph: str, exact: bool = False):
    """An onnxruntime session on folder/model.onnx, after every check (module docstring). `exact`: compute what the
    artifact says where the provider's fast path would approximate it (weight-only artifacts on the CPU provider)."""
    import onnxruntime as ort  # imported here: `import mistral_trt.runtime` stays cheap

    if manifest.graph != graph:
        raise UserError(f"{folder}/manifest.json: graph {manifest.graph!r}; this backend runs graph {graph!r} "
                        "(open it with runtime.backend.open_backend)")
    path = folder / ONNX_NAME
    if not path.is_file():
        raise UserError(f"{path}: missing (the export folder is incomplete)")
    manifest.check_files(folder)  # weights changed after export would run and print garbage
    providers = providers or ["CPUExecutionProvider"]
    first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if first not in ort.get_available_providers():
        raise UserError(f"--provider: this onnxruntime ({ort.__version__}) has no {first}; available: "
                        f"{', '.join(ort.get_available_providers())} (GPU providers come with onnxruntime-gpu)")
    if first != "CPUExecutionProvider" and hasattr(ort, "preload_dlls"):
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # it prints each library it misses; the check below says so
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels (torch's too) where the library path has none
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    precision = (manifest.precision or {}).get("name")
    if exact and precision in WEIGHT_ONLY and first == "CPUExecutionProvider":
        # The CPU provider fuses each DequantizeLinear -> MatMul of a weight-only artifact into MatMulNBits, whose
        # default accuracy level (4) quantizes the activations to int8 per block: fast (int8-w8a16 decodes in 11 ms
        # on the demo, against 20 for fp32), but not what the artifact, TensorRT or the CUDA provider computes (their
        # logits differed by up to 2 on an H200). Level 0 keeps the activations float, the unfused graph's logits to
        # 3e-4, at 10-20x the time on this provider: what `eval` measures, not what `generate` runs.
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if precision == "int8-w8a8" and first == "CPUExecutionProvider":
        # int8-w8a8 is a TensorRT artifact (int8 GEMMs, int32 accumulation). onnxruntime's CPU provider would fuse
        # its Q/DQ pairs into integer kernels that saturate 16-bit intermediates on CPUs without VNNI (AVX2 only:
        # microsoft/onnxruntime#6004), a different answer per machine; unfused, DequantizeLinear -> float MatMul
        # computes what TensorRT's exact int8 GEMM does, on every CPU.
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    source, without = str(path), ()
    if graph == "fused" and ort_version(ort.__version__) < SHARED_WIDTH_BELOW:  # onnxruntime-gpu's newest is 1.31
        source, without = shared_width_graph(path), ("query_seqlens",)
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    try:
        session = ort.InferenceSession(source, opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise UserError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0][:300]}") from None
    if session.get_providers()[0] != first:  # onnxruntime falls back to its CPU provider with only a log line
        raise UserError(f"--provider: onnxruntime could not start {first} here (no GPU or driver, or its CUDA or "
                        f"cuDNN libraries did not load; onnxruntime {ort.__version__}), and would have run on "
                        f"{session.get_providers()[0]}")
    check_session_io(session, manifest, path, without)
    return session


def _run(backend, io, options=None) -> None:
    """Run a bound step. The inputs come from the cache and the manifest, checked against the session at load, so a
    failure is onnxruntime's refusal of this step (a kernel's limit, such as GroupQueryAttention's cache capacity) or a
    graph edited since: name the file and say both."""
    try:
        backend.session.run_with_iobinding(io, options)
    except Exception as e:  # onnxruntime's own exception types
        msg = str(e).split("Status Message:")[-1].strip().splitlines()[0][:300]
        raise UserError(f"{backend.folder / ONNX_NAME}: onnxruntime failed running the graph ({msg}); its inputs "
                        "and outputs matched the manifest when loaded, so onnxruntime refused this step or the graph "
                        "was edited after export") from None


def _open(backend, folder, providers, manifest: Manifest | None, graph: str, exact: bool = False) -> None:
    """What both onnxruntime backends set up: the manifest, the checked session, the names they bind."""
    backend.folder = Path(folder)
    backend.manifest = m = manifest or Manifest.load(backend.folder)
    backend.session = open_session(backend.folder, m, providers, graph, exact)
    backend.provider = backend.session.get_providers()[0]
    backend.args, backend.kv_dtype = m.model, np.dtype(NUMPY_DTYPE[m.dtype])
    backend.past_names = [n for n in m.input_names() if n.startswith("past_key_values.")]
    backend.present_names = m.output_names()[1:]
    backend.max_context, backend.max_step_tokens, backend.prefill_past_max = m.max_context, None, None


def cache_device(session) -> str | None:
    """Where a backend's KV cache lives: "cuda" (OrtValues in the GPU's memory) under onnxruntime's CUDA or TensorRT
    provider, None (host numpy arrays) under any other, which onnxruntime then copies to its device itself."""
    return "cuda" if session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else None


class OrtColumns(PointerColumns):
    """runtime/cache.py's ColumnStorage in an onnxruntime device's memory (the CUDA provider's, or the TensorRT
    provider's): the same two sides and three calls (PointerColumns), device pointers for numpy views, so the portable
    graph's cache never crosses PCIe. Bound from host memory instead, onnxruntime copies the whole past to the
    GPU and the whole present back every step (docs/tensorrt.md has what that cost). onnxruntime allocates the
    buffers (no cuda-python); `device` "cpu" runs the same code on host OrtValues (the tests).

        storage = OrtColumns("cuda", tensors=2 * L, shape=(B, KV, D), capacity=4096, dtype=np.float16)
        ptrs = storage.views(0, length)     # device pointers of [B, KV, length, D] tensors
    """

    def __init__(self, device: str, tensors: int, shape: tuple[int, int, int], capacity: int, dtype):
        import onnxruntime as ort

        b, h, d = shape
        self.device, self.shape, self.dtype = device, shape, np.dtype(dtype)
        self.values = [[ort.OrtValue.ortvalue_from_shape_and_type((b * h * capacity * d,), self.dtype, device, 0)
                        for _ in range(tensors)] for _ in range(2)]
        self.sides = [[v.data_ptr() for v in side] for side in self.values]

    def close(self) -> None:
        self.values, self.sides = [[], []], [[], []]  # onnxruntime frees an OrtValue with its last reference

    def keep_tail(self, src: int, dst: int, total: int, keep: int) -> None:
        """The window trim through host memory: onnxruntime's Python API copies whole tensors only, not the
        strided tail of each row. Only a windowed model past its window pays it (Mistral v0.2 has no window)."""
        b, h, d = self.shape
        for s, t in zip(self.values[src], self.values[dst]):
            rows = s.numpy()[: b * h * total * d].reshape(b, h, total, d)
            full = np.zeros(t.shape(), self.dtype)
            full[: b * h * keep * d] = rows[:, :, total - keep:].reshape(-1)
            t.update_inplace(full)


class Buffers:
    """Output arrays reused while their shape repeats (every decode step): no allocation, and a bound
    output's address stays the same, so an IOBinding need not be redone. One-column outputs (decode steps,
    `last` logits) are held apart from wider ones, so a prefill between two decode steps does not evict them."""

    def __init__(self, dtype):
        self.dtype, self.held = np.dtype(dtype), {}

    def get(self, name: str, shape: tuple) -> np.ndarray:
        key = (name, shape[1] == 1)
        arr = self.held.get(key)
        if arr is None or arr.shape != shape:
            arr = self.held[key] = np.empty(shape, self.dtype)
        return arr


class PortableBackend:
    ragged = False

    def __init__(self, folder: str | Path, providers: list | None = None, manifest: Manifest | None = None,
                 exact: bool = False):
        _open(self, folder, providers, manifest, "portable", exact)
        self.buffers = Buffers(self.kv_dtype)
        self.cache_device = cache_device(self.session)

    def new_cache(self, slots: int, capacity: int, trim: bool = True) -> ColumnCache:
        a = self.args
        shape, tensors = (slots, a.num_kv_heads, a.head_dim), 2 * a.num_layers
        storage = (ColumnStorage(tensors, shape, capacity, self.kv_dtype) if self.cache_device is None else
                   OrtColumns(self.cache_device, tensors, shape, capacity, self.kv_dtype))
        return ColumnCache(storage, slots, capacity, self.manifest.cache["keep"] if trim else None,
                           self.args.sliding_window)

    def step(self, cache: ColumnCache, tokens, last: bool = True) -> np.ndarray:
        """One step through IOBinding: past bound from the cache's side, present written into the other.
        The graph computes logits for every column anyway; `last` only picks them."""
        meta, ids = cache.prepare(tokens, last, self.args.vocab_size)
        b, s = ids.shape
        logits = self.buffers.get("logits", (b, s, self.args.vocab_size))
        io = self.session.io_binding()
        for name, arr in (("input_ids", ids), ("attention_mask", meta.attention_mask), ("position_ids", meta.position_ids)):
            arr = np.ascontiguousarray(arr)
            io.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        io.bind_output("logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        storage = cache.storage
        if isinstance(storage, OrtColumns):  # pointers into the provider's memory
            past, present = storage.shape_for(cache.columns), storage.shape_for(cache.columns + s)
            for name, ptr in zip(self.past_names, cache.past()):
                io.bind_input(name, storage.device, 0, storage.dtype, past, ptr)
            for name, ptr in zip(self.present_names, cache.present(meta)):
                io.bind_output(name, storage.device, 0, storage.dtype, present, ptr)
        else:
            for name, arr in zip(self.past_names, cache.past()):
                io.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
            for name, arr in zip(self.present_names, cache.present(meta)):
                io.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        _run(self, io)
        return cache.finish(logits, meta)


class FusedBackend:
    """The fused graph (export/fused_graph.py): the in-place cache is bound once per cache and reused every
    step; small inputs of a decode step are copied into the arrays already bound (binding again would cost a large
    part of a small model's step). With the CUDA provider the cache lives in device memory as OrtValues."""

    ragged = True

    def __init__(self, folder: str | Path, providers: list | None = None, manifest: Manifest | None = None,
                 exact: bool = False, cuda_graph: bool | None = None):
        """`cuda_graph`: capture the decode step once and replay it (onnxruntime's CUDA provider only; None: on there,
        unless MISTRAL_TRT_CUDA_GRAPH=0)."""
        import os

        first = (providers or ["CPUExecutionProvider"])[0]
        on_cuda = (first[0] if isinstance(first, tuple) else first) == "CUDAExecutionProvider"
        if cuda_graph is None:
            cuda_graph = on_cuda and os.environ.get("MISTRAL_TRT_CUDA_GRAPH", "1") != "0"
        if cuda_graph and not on_cuda:
            raise UserError("CUDA graphs need onnxruntime's CUDA provider (--provider cuda)")
        if cuda_graph:  # the provider captures the first run it is asked to, and replays that graph after
            providers = [("CUDAExecutionProvider", {**(first[1] if isinstance(first, tuple) else {}),
                                                    "enable_cuda_graph": "1"}), *providers[1:]]
        _open(self, folder, providers, manifest, "fused", exact)
        self.cache_device = cache_device(self.session)
        # onnxruntime < 1.32 loads the graph without query_seqlens: one width per call (shared_width_graph)
        self.shared_width = "query_seqlens" not in {i.name for i in self.session.get_inputs()}
        self.buffers = Buffers(self.kv_dtype)
        self._bound = None  # (cache, {rows: [IOBinding, {name: bound array}, bound logits]})
        # A device cache's decode steps run through StaticDecode (every address and shape fixed), captured as a CUDA
        # graph where cuda_graph; other steps tell the provider not to capture them.
        self.cuda_graph, self.static_decode = cuda_graph, self.cache_device is not None
        self._static: StaticDecode | None = None
        self._eager = None
        if cuda_graph:
            import onnxruntime as ort

            self._eager = ort.RunOptions()
            self._eager.add_run_config_entry("gpu_graph_id", "-1")  # this run: no capture, no replay

    def new_cache(self, slots: int, capacity: int, trim: bool = True) -> InPlaceCache:
        """(`trim` has no meaning here: the op keeps the window itself.)"""
        a = self.args
        w = a.sliding_window
        shape = (slots, a.num_kv_heads, max(capacity, w or 0), a.head_dim)
        if self.cache_device is None:
            buffers = [zeroed(shape, self.kv_dtype) for _ in range(2 * a.num_layers)]
        else:  # the cache never crosses PCIe
            import onnxruntime as ort

            buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.cache_device, 0)
                       for _ in range(2 * a.num_layers)]
        return InPlaceCache(buffers, slots, shape[2], w, shared_width=self.shared_width)

    def _binding(self, cache: InPlaceCache, lo: int, hi: int):
        """An IOBinding of the cache's rows [lo, hi) (a contiguous view of each buffer), made once per (cache,
        rows) and kept: only the small inputs change from step to step."""
        if self._bound is None or self._bound[0] is not cache:
            self._bound = (cache, {})
        held = self._bound[1].get((lo, hi))
        if held is None:
            io = self.session.io_binding()
            for name, out, buf in zip(self.past_names, self.present_names, cache.buffers):
                if isinstance(buf, np.ndarray):
                    view = buf[lo:hi]
                    io.bind_input(name, "cpu", 0, view.dtype, view.shape, view.ctypes.data)
                    io.bind_output(out, "cpu", 0, view.dtype, view.shape, view.ctypes.data)
                else:  # an OrtValue in device memory: its rows [lo, hi) by address
                    shape = buf.shape()
                    ptr = buf.data_ptr() + lo * int(np.prod(shape[1:])) * self.kv_dtype.itemsize
                    view = (hi - lo, *shape[1:])
                    io.bind_input(name, self.cache_device, 0, self.kv_dtype, view, ptr)
                    io.bind_output(out, self.cache_device, 0, self.kv_dtype, view, ptr)
            held = self._bound[1][(lo, hi)] = [io, {}, None]
        return held

    def step(self, cache: InPlaceCache, tokens, last: bool = True) -> np.ndarray:
        """The cache's metadata splits the step into runs (runtime/cache.py's runs(): the graph pads every row of a
        run to its widest, so decoding one token in some slots and prefilling chunks in others runs as several).
        Each run binds only the rows it spans (rows are independent; slots above the last busy one cost nothing)."""
        meta, ids = cache.prepare(tokens, last, self.args.vocab_size)
        if self.static_decode and cache.whole_rows and last and meta.width == 1 and len(meta.runs) == 1:
            if self._static is None or self._static.cache is not cache:
                self._static = StaticDecode(self, cache)
            return cache.finish(self._static.step(meta.runs[0], ids), meta)
        width = 1 if last else meta.width
        out = self.buffers.get("logits", (cache.slots, width, self.args.vocab_size))
        for run in meta.runs:
            small = {"input_ids": ids[run.lo:run.hi, :run.width], "seqlens_k": run.seqlens_k,
                     "total_sequence_length": run.total_sequence_length, "logits_index": run.logits_index}
            if not self.shared_width:
                small["query_seqlens"] = run.query_seqlens
            logits = self._run_rows(cache, run.lo, run.hi, small, run.logits_index.shape[1])
            if len(meta.runs) > 1 or (run.lo, run.hi) != (0, cache.slots):
                out[run.lo:run.hi, :run.logits_index.shape[1]][run.rows - run.lo] = logits[run.rows - run.lo]
            else:
                out = logits
        return cache.finish(out, meta)

    def _run_rows(self, cache, lo: int, hi: int, small: dict, width: int) -> np.ndarray:
        io, held, bound_logits = bound = self._binding(cache, lo, hi)
        for name, arr in small.items():  # the bound arrays are kept alive here: no dangling pointers
            h = held.get(name)
            if h is not None and h.shape == arr.shape:
                np.copyto(h, arr)
                continue
            h = held[name] = np.ascontiguousarray(arr)
            io.bind_input(name, "cpu", 0, h.dtype, h.shape, h.ctypes.data)
        logits = self.buffers.get(f"logits{lo}:{hi}", (hi - lo, width, self.args.vocab_size))
        if logits is not bound_logits:
            io.bind_output("logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
            bound[2] = logits
        _run(self, io, self._eager)
        return logits


class StaticDecode:
    """A device cache's decode step with every address and shape fixed, as onnxruntime-genai runs GPUs: the cache
    bound whole, once; the small inputs and the logits [B, 1, V] in device buffers bound once and written in place;
    total_sequence_length the cache's capacity (the op reads each row's length from seqlens_k). A CUDA graph of this
    step then replays every token as one launch (FusedBackend's cuda_graph); without one (the CPU provider, in the
    tests) it is the same arithmetic. Built per cache; the step's logits come back as one column per row.

        static = StaticDecode(backend, cache)       # cache.whole_rows: OrtValue buffers
        logits = static.step(run, ids)              # [B, 1, V] on the host
    """

    def __init__(self, backend: FusedBackend, cache: InPlaceCache):
        import onnxruntime as ort

        self.backend, self.cache = backend, cache
        device, b = backend.cache_device, cache.slots

        def value(shape, dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(dtype), device, 0)

        self.small = {"input_ids": value((b, 1), np.int64), "seqlens_k": value((b,), np.int32),
                      "logits_index": value((b, 1), np.int64)}
        if not backend.shared_width:
            self.small["query_seqlens"] = value((b,), np.int32)
        # a host scalar the op reads on the host: fixed, so a captured graph stays valid
        self.total = ort.OrtValue.ortvalue_from_numpy(np.array(cache.capacity, np.int32))
        self.logits = value((b, 1, backend.args.vocab_size), backend.kv_dtype)
        io = self.io = backend.session.io_binding()
        for name, out, buf in zip(backend.past_names, backend.present_names, cache.buffers):
            io.bind_ortvalue_input(name, buf)
            io.bind_ortvalue_output(out, buf)
        for name, v in self.small.items():
            io.bind_ortvalue_input(name, v)
        io.bind_ortvalue_input("total_sequence_length", self.total)
        io.bind_ortvalue_output("logits", self.logits)
        self.options = None
        if backend.cuda_graph:
            self.options = ort.RunOptions()
            self.options.add_run_config_entry("gpu_graph_id", "1")  # captured on its first run, replayed after

    def step(self, run, ids: np.ndarray) -> np.ndarray:
        """One decode step of every row (idle ones padded: their logits are dropped by the cache)."""
        arrays = {"input_ids": ids[:, :1], "seqlens_k": run.seqlens_k, "logits_index": run.logits_index,
                  "query_seqlens": run.query_seqlens}
        for name, v in self.small.items():
            v.update_inplace(np.ascontiguousarray(arrays[name]))
        try:
            _run(self.backend, self.io, self.options)
        except UserError as e:
            if self.options is None:
                raise
            raise UserError(f"{e}; the decode step runs as a CUDA graph: MISTRAL_TRT_CUDA_GRAPH=0 runs it without") from None
        return self.logits.numpy()
