"""Native TensorRT backend: the engine manifest, a device KV cache, and one step per call.

    engine = TrtEngine("build/engine/smollm2")   # ENGINE_DIR written by `mistral-trt engine`
    gen = Generator(engine)                       # the same Generator that drives onnxruntime

An engine folder holds the export's manifest.json and tokenizer files (so it is a complete artifact on
its own), model.engine (the serialized plan), timing.cache, and engine.json:

    {"tensorrt_version": "11.4.0", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
     "profiles": {"prefill": {"input_ids": [[1, 1], [1, 256], [1, 512]], ...}, "decode": {...}},
     "limits": {"max_batch": 1, "max_seq": 512, "max_context": 4096}, "source": {"onnx_sha256": ...}, ...}

A plan only deserializes on the TensorRT version that built it and on GPUs of the same compute
capability, so both are checked against engine.json before TensorRT sees the file, and a mismatch names
both sides. Two execution contexts, one per profile (prefill: seq up to max_seq; decode: seq = 1), share
the engine's weights, so switching between prefill and decode costs nothing per step.

Device memory goes through cuda-python's runtime API (no torch, no pycuda). The KV cache mirrors
runtime/cache.py on the device: two sides per layer, past bound from one and present written into the
other, window trim as one strided device-to-device copy.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError, read_json
from .manifest import DTYPE_BYTES, ENGINE_NAME, NUMPY_DTYPE, Manifest

ENGINE_MANIFEST = "engine.json"
TIMING_CACHE = "timing.cache"
ENGINE_SCHEMA_VERSION = 1
PROFILES = ("prefill", "decode")


@dataclass
class EngineManifest:
    tensorrt_version: str
    gpu: dict  # {"name": str, "compute_capability": "9.0"}
    profiles: dict  # profile -> input name -> [min, opt, max] shapes
    limits: dict  # max_batch, max_seq, max_context (past positions the decode profile accepts + 1)
    source: dict  # onnx_sha256, export folder, precision
    engine_sha256: str
    build: dict = field(default_factory=dict)  # seconds, timing cache hit, builder settings
    schema_version: int = ENGINE_SCHEMA_VERSION

    def save(self, folder: Path) -> None:
        (Path(folder) / ENGINE_MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "EngineManifest":
        path = Path(folder) / ENGINE_MANIFEST
        if not path.is_file():
            raise UserError(f"{path}: missing (is {folder} a folder written by `mistral-trt engine`?)")
        raw = read_json(path)
        if raw.get("schema_version") != ENGINE_SCHEMA_VERSION:
            raise UserError(f"{path}: schema_version {raw.get('schema_version')!r}, this runtime reads "
                            f"{ENGINE_SCHEMA_VERSION}: rebuild the engine")
        names = set(cls.__dataclass_fields__)
        missing = [k for k in names - {"build", "schema_version"} if k not in raw]
        if missing:
            raise UserError(f"{path}: field {missing[0]!r} missing")
        em = cls(**{k: v for k, v in raw.items() if k in names})
        for key in ("name", "compute_capability"):
            if not isinstance(em.gpu, dict) or not isinstance(em.gpu.get(key), str):
                raise UserError(f"{path}: field 'gpu.{key}' must be a string")
        if set(em.profiles) != set(PROFILES):
            raise UserError(f"{path}: field 'profiles' must hold {' and '.join(PROFILES)}, got {sorted(em.profiles)}")
        return em


def check_compatible(em: EngineManifest, tensorrt_version: str, gpu_name: str, compute_capability: str,
                     where: str = "engine") -> list[str]:
    """Refuse a plan TensorRT would refuse (or crash on), naming both sides. Returns warnings: the same
    compute capability under another GPU name loads and runs correctly, but was tuned for the other card."""
    if em.tensorrt_version != tensorrt_version:
        raise UserError(f"{where}: built with TensorRT {em.tensorrt_version}, this machine has TensorRT "
                        f"{tensorrt_version}; a plan only loads on the version that built it: rebuild it here "
                        f"(`mistral-trt engine`) or install TensorRT {em.tensorrt_version}")
    if em.gpu["compute_capability"] != compute_capability:
        raise UserError(f"{where}: built for {em.gpu['name']} (compute capability {em.gpu['compute_capability']}), "
                        f"this machine has {gpu_name} (compute capability {compute_capability}): rebuild it here")
    if em.gpu["name"] != gpu_name:
        return [f"{where}: built on {em.gpu['name']}, running on {gpu_name} (same compute capability "
                f"{compute_capability}: it runs, but kernels were timed on the other card)"]
    return []


def profile_shapes(m: Manifest, max_batch: int, max_seq: int, max_context: int) -> dict:
    """min/opt/max shapes per input for the two optimization profiles.

    max_context bounds past + seq. With a sliding window the runtime trims the cache to `min_keep`
    positions after every step, so past never exceeds min_keep however long the conversation runs.

    Worked example (max_batch 2, max_seq 64, max_context 1024, no window):
      prefill input_ids [1, 1] .. [1, 64] .. [2, 64], past [1, KV, 0, D] .. [2, KV, 960, D]
      decode  input_ids [1, 1] .. [1, 1]  .. [2, 1],  past [1, KV, 0, D] .. [2, KV, 1023, D]
    """
    a = m.model
    if max_batch < 1 or max_seq < 1 or max_context < 2:
        raise UserError(f"--max-batch {max_batch} / --max-seq {max_seq} / --max-context {max_context}: "
                        "expected >= 1 / >= 1 / >= 2")
    limit = m.cache.get("max_context") or a.max_position_embeddings
    if max_context > limit:
        raise UserError(f"--max-context {max_context}: the model's limit is {limit} positions")
    if max_seq >= max_context:
        raise UserError(f"--max-seq {max_seq}: must be below --max-context {max_context}")
    keep = m.cache.get("min_keep")
    out = {}
    for name, seq in (("prefill", (1, max(1, max_seq // 2), max_seq)), ("decode", (1, 1, 1))):
        past_max = max_context - seq[2]
        if keep is not None:
            past_max = min(past_max, keep)
        past = (0, past_max // 2, past_max)
        shapes = {}
        for spec in m.inputs:
            dims = []
            for k in range(3):  # min, opt, max
                b = (1, 1, max_batch)[k]
                size = {"batch": b, "seq": seq[k], "past": past[k], "total": past[k] + seq[k]}
                dims.append([size.get(d, d) if isinstance(d, str) else d for d in spec.dims])
            for d in spec.dims:
                if isinstance(d, str) and d not in ("batch", "seq", "past", "total"):
                    raise UserError(f"input {spec.name}: unknown dynamic dimension {d!r}")
            shapes[spec.name] = dims
        out[name] = shapes
    return out


def gpu_info(device: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of CUDA device `device`."""
    cuda = Cuda()
    props = cuda.check(cuda.rt.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


def check_cuda_versions(driver: int, runtime: int) -> None:
    """CUDA versions as CUDA reports them (12080 = 12.8). A CUDA 13 build (TensorRT 11.2+'s plain `tensorrt`
    wheel, cuda-python 13) on a driver that only knows CUDA 12 fails deep inside TensorRT; say it here."""
    if driver == 0:
        raise UserError("no NVIDIA driver found (cudaDriverGetVersion reports 0): this backend needs an NVIDIA GPU host")
    if driver // 1000 < runtime // 1000:
        d, r = f"{driver // 1000}.{driver % 1000 // 10}", f"{runtime // 1000}.{runtime % 1000 // 10}"
        raise UserError(f"the NVIDIA driver supports CUDA {d}, the installed TensorRT/cuda-python are built for CUDA {r}: "
                        f"pip install 'mistral-trt[tensorrt-cu{driver // 1000}]' (a matched pair), or update the driver "
                        f"(CUDA {runtime // 1000} needs r{580 if runtime // 1000 == 13 else 525}+)")


TRT_DTYPES = {"INT64": "int64", "INT32": "int32", "FLOAT": "float32", "HALF": "float16"}


def check_plan_io(io: dict[str, tuple[str, str]], profiles: list[dict[str, list]], m: Manifest,
                  em: "EngineManifest", where: str) -> None:
    """A plan must have the manifest's tensors with the manifest's dtypes, and exactly engine.json's
    profiles with its shapes; a mismatch would run and give wrong results. `io`: name -> (mode, dtype) as
    the plan reports them ("INPUT"/"OUTPUT", TensorRT's DataType name); `profiles`: per profile, input
    name -> [min, opt, max]."""
    for kind, specs in (("INPUT", m.inputs), ("OUTPUT", m.outputs)):
        for spec in specs:
            got = io.get(spec.name)
            if got is None or got[0] != kind:
                raise UserError(f"{where}: the plan has no {kind.lower()} {spec.name!r} that manifest.json lists; "
                                "rebuild it from this export")
            if TRT_DTYPES.get(got[1], got[1]) != spec.dtype:
                raise UserError(f"{where}: {kind.lower()} {spec.name!r} is {got[1]} in the plan, manifest.json says "
                                f"{spec.dtype}; rebuild it from this export")
    extra = sorted(set(io) - set(m.input_names()) - set(m.output_names()))
    if extra:
        raise UserError(f"{where}: the plan has tensors manifest.json does not list ({', '.join(extra[:3])})")
    if len(profiles) != len(PROFILES):
        raise UserError(f"{where}: the plan has {len(profiles)} optimization profiles, engine.json describes "
                        f"{len(PROFILES)} ({', '.join(PROFILES)})")
    for i, name in enumerate(PROFILES):
        want = em.profiles[name]
        for tensor, shapes in profiles[i].items():
            if [list(x) for x in shapes] != want.get(tensor):
                raise UserError(f"{where}: profile {name!r} input {tensor!r} is {[list(x) for x in shapes]} in the plan, "
                                f"engine.json says {want.get(tensor)}")


def prefill_past_max(em: "EngineManifest") -> int:
    """Past positions the prefill profile accepts (a prefill chunk after more than this many cached
    positions must go through the decode profile, one token per step)."""
    return em.profiles["prefill"]["past_key_values.0.key"][2][2]


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError("tensorrt is not installed: on a host with an NVIDIA GPU run "
                        "pip install 'mistral-trt[tensorrt]' (README: TensorRT)") from None
    return trt


class Cuda:
    """The few CUDA runtime calls the backend needs, through cuda-python; errors become exceptions."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as rt  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart as rt  # older cuda-python
            except ImportError:
                raise UserError("cuda-python is not installed: pip install 'mistral-trt[tensorrt]'") from None
        self.rt = rt

    def check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorString(err)[1]
            raise RuntimeError(f"CUDA error {int(err)}: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else rest or None

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr))

    def stream(self):
        return self.check(self.rt.cudaStreamCreate())

    def h2d(self, dst: int, arr: np.ndarray, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(dst, arr.ctypes.data, arr.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def d2h(self, arr: np.ndarray, src: int, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(arr.ctypes.data, src, arr.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def d2d_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None:
        self.check(self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                             self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))

    def sync(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream))


class DeviceKVCache:
    """runtime/cache.py's KVCache in device memory: same sides, same trim, device pointers instead of views."""

    def __init__(self, cuda: Cuda, stream, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 capacity: int, dtype, keep: int | None = None):
        self.cuda, self.stream = cuda, stream
        self.shape = (batch, kv_heads, head_dim)
        self.capacity, self.keep, self.length = capacity, keep, 0
        self.itemsize = np.dtype(dtype).itemsize
        n = batch * kv_heads * capacity * head_dim * self.itemsize
        self.sides = [[cuda.malloc(n) for _ in range(2 * num_layers)] for _ in range(2)]
        self.side = 0

    def shape_for(self, length: int) -> tuple[int, int, int, int]:
        b, h, d = self.shape
        return (b, h, length, d)

    def past(self) -> list[int]:
        return self.sides[self.side]

    def present(self, new: int) -> list[int]:
        assert self.length + new <= self.capacity, \
            f"KV cache overflow: {self.length + new} positions > capacity {self.capacity}"
        return self.sides[1 - self.side]

    def commit(self, new: int) -> int:
        total = self.length + new
        if self.keep is not None and total > self.keep:
            b, h, d = self.shape
            row = d * self.itemsize  # one position of one head
            for src, dst in zip(self.sides[1 - self.side], self.sides[self.side]):
                # [B*KV rows] x [last `keep` positions]: one strided copy per tensor
                self.cuda.d2d_2d(dst, self.keep * row, src + (total - self.keep) * row, total * row,
                                 self.keep * row, b * h, self.stream)
            self.length = self.keep
            return total - self.keep
        self.side, self.length = 1 - self.side, total
        return 0

    def close(self) -> None:
        for side in self.sides:
            for p in side:
                self.cuda.free(p)
        self.sides = [[], []]


class TrtEngine:
    """The runtime's Backend over a native TensorRT engine."""

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
        plan = (self.folder / ENGINE_NAME).read_bytes()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError(f"{where}: TensorRT {trt.__version__} could not deserialize it (messages above)")
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        io = {n: (e.get_tensor_mode(n).name, e.get_tensor_dtype(n).name) for n in names}
        inputs = [n for n in names if io[n][0] == "INPUT"]
        profiles = [{n: [tuple(x) for x in e.get_tensor_profile_shape(n, i)] for n in inputs}
                    for i in range(e.num_optimization_profiles)]
        check_plan_io(io, profiles, self.manifest, em, where)
        self.prefill_past_max = prefill_past_max(em)
        self.stream = self.cuda.stream()
        self.stream_handle = int(self.stream)  # TensorRT takes the raw cudaStream_t as an int
        # one execution context per profile: prefill (index 0) and decode (index 1)
        self.contexts = []
        for i in range(len(PROFILES)):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, self.stream_handle)
            self.contexts.append(ctx)
        lim = self.engine_manifest.limits
        self.max_batch, self.max_seq, self.max_context = lim["max_batch"], lim["max_seq"], lim["max_context"]
        self.input_names = self.manifest.input_names()
        self.output_names = self.manifest.output_names()
        # device staging for the small inputs and the logits, sized for the largest call
        self.buf = {
            "input_ids": self.cuda.malloc(self.max_batch * self.max_seq * 8),
            "position_ids": self.cuda.malloc(self.max_batch * self.max_seq * 8),
            "attention_mask": self.cuda.malloc(self.max_batch * self.max_context * 8),
            "logits": self.cuda.malloc(self.max_batch * self.max_seq * self.args.vocab_size
                                       * DTYPE_BYTES[self.manifest.dtype]),
        }

    def new_cache(self, batch: int, capacity: int, keep: int | None) -> DeviceKVCache:
        if batch > self.max_batch:
            raise UserError(f"batch {batch}: this engine was built for --max-batch {self.max_batch}")
        a = self.args
        return DeviceKVCache(self.cuda, self.stream, a.num_layers, batch, a.num_kv_heads, a.head_dim,
                             min(capacity, self.max_context), self.kv_dtype, keep)

    def step(self, input_ids, attention_mask, position_ids, cache: DeviceKVCache, logits_out=None,
             last_only: bool = False) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        pos = np.ascontiguousarray(position_ids, dtype=np.int64)
        total = cache.length + s
        if mask.shape != (b, total) or pos.shape != (b, s):
            raise UserError(f"attention_mask {list(mask.shape)} / position_ids {list(pos.shape)}: expected "
                            f"[{b}, {total}] / [{b}, {s}] for {cache.length} cached positions")
        if s > self.max_seq or total > self.max_context or b > self.max_batch:
            raise UserError(f"batch {b}, {s} new + {cache.length} cached positions: this engine was built for "
                            f"--max-batch {self.max_batch} --max-seq {self.max_seq} --max-context {self.max_context}")
        if s > 1 and cache.length > self.prefill_past_max:
            raise UserError(f"a {s}-token step after {cache.length} cached positions: this engine's prefill profile "
                            f"takes at most {self.prefill_past_max} past positions (--max-context {self.max_context} "
                            f"minus --max-seq {self.max_seq}); feed one token per step past that (Generator does)")
        ctx = self.contexts[1 if s == 1 else 0]
        profile = PROFILES[1 if s == 1 else 0]

        def shape(name, dims):
            if not ctx.set_input_shape(name, dims):  # out of the profile: TensorRT would fail later, unclearly
                lo, _, hi = self.engine_manifest.profiles[profile][name]
                raise UserError(f"input {name} {list(dims)}: outside this engine's {profile} profile "
                                f"({lo} .. {hi}); rebuild it with larger limits (mistral-trt engine)")

        for name, arr in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            self.cuda.h2d(self.buf[name], arr, self.stream)
            shape(name, arr.shape)
            ctx.set_tensor_address(name, self.buf[name])
        past_shape, present_shape = cache.shape_for(cache.length), cache.shape_for(total)
        for name, ptr in zip(self.input_names[3:], cache.past()):
            shape(name, past_shape)
            ctx.set_tensor_address(name, ptr)
        ctx.set_tensor_address("logits", self.buf["logits"])
        for name, ptr in zip(self.output_names[1:], cache.present(s)):
            ctx.set_tensor_address(name, ptr)
        if tuple(ctx.get_tensor_shape(self.output_names[1])) != present_shape:
            raise RuntimeError(f"engine's present shape {tuple(ctx.get_tensor_shape(self.output_names[1]))} "
                               f"!= expected {present_shape}")
        if not ctx.execute_async_v3(self.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (messages above)")
        if last_only and s > 1:
            logits_out = None  # shaped for the last column; the engine writes every column
        logits = logits_out if logits_out is not None else np.empty((b, s, self.args.vocab_size), self.kv_dtype)
        self.cuda.d2h(logits, self.buf["logits"], self.stream)
        cache.commit(s)
        self.cuda.sync(self.stream)
        return logits[:, -1:] if last_only else logits

    def close(self) -> None:
        for p in self.buf.values():
            self.cuda.free(p)
        self.buf = {}


def load_engine(folder: str | Path, provider: str = "cpu"):
    """An engine folder (engine.json) -> TrtEngine; an export folder -> OrtEngine (portable graph) or
    FusedEngine (fused graph) on `provider`."""
    if (Path(folder) / ENGINE_MANIFEST).is_file():
        return TrtEngine(folder)
    from .engine import FusedEngine, OrtEngine, provider_list

    m = Manifest.load(folder)
    if m.graph == "fused" and provider == "tensorrt":
        raise UserError(f"{folder}: the fused graph uses onnxruntime contrib ops TensorRT does not have; "
                        "export the portable graph for TensorRT (mistral-trt export --graph portable)")
    cls = FusedEngine if m.graph == "fused" else OrtEngine
    return cls(folder, providers=provider_list(provider, folder), manifest=m)

