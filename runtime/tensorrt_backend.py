"""The TensorRT backend (runtime/backend.py's contract) over a native engine folder (runtime/engine.py).

    backend = TensorRTBackend("build/engine/smollm2")     # ENGINE_DIR written by `mistral-trt engine`
    gen = Generator(backend)                              # the same Generator that drives onnxruntime

The engine is built from the portable graph, so its cache is runtime/cache.py's ColumnCache with the
columns in device memory (runtime/cuda.py's DeviceColumns): the same metadata, the same trim. Two execution
contexts, one per optimization profile (prefill: seq up to max_step_tokens; decode: seq = 1), share the engine's
weights, so switching between prefill and decode costs nothing per step. Before anything runs, engine.json
is checked against this machine (TensorRT version, compute capability, driver) and the plan's tensors and
profiles against both manifests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import ColumnCache
from .cuda import Cuda, DeviceColumns, check_cuda_versions, gpu_info, logits_to_host
from .engine import PROFILES, EngineManifest, check_compatible, check_plan_io, prefill_past_max
from .errors import UserError
from .manifest import DTYPE_BYTES, ENGINE_NAME, NUMPY_DTYPE, Manifest


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError("tensorrt is not installed: on a host with an NVIDIA GPU run "
                        "pip install 'mistral-trt[tensorrt-cu12]' (or -cu13; docs/tensorrt.md)") from None
    return trt


class TensorRTBackend:
    ragged = False  # the portable graph: a batch starts together (runtime/cache.py)
    provider = "tensorrt"

    def __init__(self, folder: str | Path, device: int = 0):
        self.folder = Path(folder)
        self.engine_manifest = em = EngineManifest.load(self.folder)
        trt = import_tensorrt()  # first: on a machine without it, that is the one thing to say
        self.manifest = Manifest.load(self.folder)
        where = str(self.folder / ENGINE_NAME)
        if self.manifest.files.get(ENGINE_NAME) != em.engine_sha256:
            raise UserError(f"{self.folder}: manifest.json and engine.json record different plans; rebuild the engine")
        self.manifest.check_files(self.folder)  # the plan and tokenizer files, against their sha256
        self.args = self.manifest.model
        self.kv_dtype = np.dtype(NUMPY_DTYPE[self.manifest.dtype])
        self.cuda = Cuda()
        check_cuda_versions(self.cuda.check(self.cuda.rt.cudaDriverGetVersion()),
                            self.cuda.check(self.cuda.rt.cudaRuntimeGetVersion()))
        self.cuda.check(self.cuda.rt.cudaSetDevice(device))
        name, cc = gpu_info(device)
        self.warnings = check_compatible(em, trt.__version__, name, cc, where=str(self.folder))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = load_plan(self.runtime, self.folder / ENGINE_NAME)
        if self.engine is None:
            raise UserError(f"{where}: TensorRT {trt.__version__} could not deserialize it (messages above)")
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        io = {n: (e.get_tensor_mode(n).name, e.get_tensor_dtype(n).name) for n in names}
        inputs = [n for n in names if io[n][0] == "INPUT"]
        profiles = [{n: [tuple(x) for x in e.get_tensor_profile_shape(n, i)] for n in inputs}
                    for i in range(e.num_optimization_profiles)]
        check_plan_io(io, profiles, self.manifest, em, where)
        self.stream = self.cuda.stream()
        self.stream_handle = int(self.stream)  # TensorRT takes the raw cudaStream_t as an int
        # one execution context per profile, in PROFILES order, over one scratch allocation
        self.contexts, self.scratch = shared_contexts(trt, self.engine, self.cuda, len(PROFILES), self.stream_handle)
        lim = em.limits
        self.max_batch, self.max_step_tokens, self.max_context = lim["max_batch"], lim["max_step_tokens"], lim["max_context"]
        self.max_context = min(self.max_context, self.manifest.max_context)
        self.prefill_past_max = prefill_past_max(em)
        self.past_names = self.manifest.input_names()[3:]
        self.present_names = self.manifest.output_names()[1:]
        # device staging for the small inputs and the logits, sized for the largest call
        self.buf = {
            "input_ids": self.cuda.malloc(self.max_batch * self.max_step_tokens * 8),
            "position_ids": self.cuda.malloc(self.max_batch * self.max_step_tokens * 8),
            "attention_mask": self.cuda.malloc(self.max_batch * self.max_context * 8),
            "logits": self.cuda.malloc(self.max_batch * self.max_step_tokens * self.args.vocab_size
                                       * DTYPE_BYTES[self.manifest.dtype]),
        }

    def new_cache(self, slots: int, capacity: int, trim: bool = True) -> ColumnCache:
        if slots > self.max_batch:
            raise UserError(f"{slots} slots: this engine was built for --max-batch {self.max_batch}")
        a = self.args
        capacity = min(capacity, self.max_context)
        storage = DeviceColumns(self.cuda, self.stream, 2 * a.num_layers, (slots, a.num_kv_heads, a.head_dim),
                                capacity, self.kv_dtype)
        return ColumnCache(storage, slots, capacity, self.manifest.cache["keep"] if trim else None,
                           self.args.sliding_window)

    def step(self, cache: ColumnCache, tokens, last: bool = True) -> np.ndarray:
        meta = cache.metadata([len(t) for t in tokens], last)
        ids = cache.pack(tokens, meta, self.args.vocab_size)
        b, s = ids.shape
        total = cache.columns + s
        if s > self.max_step_tokens or total > self.max_context:
            raise UserError(f"{s} new + {cache.columns} cached positions: this engine was built for "
                            f"--max-step-tokens {self.max_step_tokens} --max-context {self.max_context}")
        if s > 1 and cache.columns > self.prefill_past_max:
            raise UserError(f"a {s}-token step after {cache.columns} cached positions: this engine's prefill profile "
                            f"takes at most {self.prefill_past_max} past positions (--max-context {self.max_context} "
                            f"minus --max-step-tokens {self.max_step_tokens}); feed one token per step past that (Generator does)")
        profile = PROFILES[1 if s == 1 else 0]
        ctx = self.contexts[PROFILES.index(profile)]

        def shape(name, dims):
            if not ctx.set_input_shape(name, dims):  # out of the profile: TensorRT would fail later, unclearly
                lo, _, hi = self.engine_manifest.profiles[profile][name]
                raise UserError(f"input {name} {list(dims)}: outside this engine's {profile} profile "
                                f"({lo} .. {hi}); rebuild it with larger limits (mistral-trt engine)")

        mask, pos = np.ascontiguousarray(meta.attention_mask), np.ascontiguousarray(meta.position_ids)
        for name, arr in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            self.cuda.h2d(self.buf[name], arr, self.stream)
            shape(name, arr.shape)
            ctx.set_tensor_address(name, self.buf[name])
        past_shape, present_shape = cache.storage.shape_for(cache.columns), cache.storage.shape_for(total)
        for name, ptr in zip(self.past_names, cache.past()):
            shape(name, past_shape)
            ctx.set_tensor_address(name, ptr)
        ctx.set_tensor_address("logits", self.buf["logits"])
        for name, ptr in zip(self.present_names, cache.present(meta)):
            ctx.set_tensor_address(name, ptr)
        if tuple(ctx.get_tensor_shape(self.present_names[0])) != present_shape:
            raise RuntimeError(f"engine's present shape {tuple(ctx.get_tensor_shape(self.present_names[0]))} "
                               f"!= expected {present_shape}")
        if not ctx.execute_async_v3(self.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (messages above)")
        logits = logits_to_host(self.cuda, self.buf["logits"], (b, s, self.args.vocab_size), self.kv_dtype, last,
                                self.stream)
        cache.commit(meta)
        self.cuda.sync(self.stream)
        return cache.unpack(logits, meta)

    def close(self) -> None:
        """Free what this backend allocated: the staging buffers and the contexts' scratch (the contexts go first:
        they use it). A cache is its own to close (ColumnCache.close; Generator.run closes the ones it makes)."""
        self.contexts = []
        for p in [*self.buf.values(), *([self.scratch] if self.scratch else [])]:
            self.cuda.free(p)
        self.buf, self.scratch = {}, None


def load_plan(runtime, path: Path):
    """Deserialize the plan from the file mapped read-only: the page cache holds it, so the process never holds a
    second copy (read_bytes would: 14.5 GB of host memory for a 7B fp16 plan, beside TensorRT's own)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with memoryview(mapped) as view:
            return runtime.deserialize_cuda_engine(view)


def shared_contexts(trt, engine, cuda, profiles: int, stream_handle: int) -> tuple[list, int]:
    """One execution context per profile, all on one scratch allocation of the largest profile's size: they run on
    one stream, never at once, so a buffer each (TensorRT's default) would double the activation memory for
    nothing. Returns (contexts, the scratch's device pointer)."""
    size = engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2") else engine.device_memory_size
    scratch = cuda.malloc(size)
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    contexts = []
    for i in range(profiles):
        ctx = (engine.create_execution_context(strategy.USER_MANAGED) if strategy is not None
               else engine.create_execution_context_without_device_memory())
        if hasattr(ctx, "set_device_memory"):  # TensorRT 10.1+: with its size
            ctx.set_device_memory(scratch, size)
        else:
            ctx.device_memory = scratch
        ctx.set_optimization_profile_async(i, stream_handle)
        contexts.append(ctx)
    return contexts, scratch
