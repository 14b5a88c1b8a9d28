"""`mistral-trt engine EXPORT_DIR -o ENGINE_DIR`: build a TensorRT engine from an export folder.

The ONNX is parsed into a strongly typed network (TensorRT 11 has no other kind; TensorRT 10.12+ takes the
STRONGLY_TYPED creation flag), so precision comes from the artifact itself: the fp16 export gives fp16
kernels, a Q/DQ export gives int8 kernels, no builder precision flags. Two optimization profiles
(runtime/engine.py: prefill with seq up to --max-step-tokens, decode with seq = 1) cover batch/seq/past. The timing
cache is loaded before and saved after the build (--timing-cache to share one across engines), so a
rebuild on the same GPU skips kernel timing.

    mistral-trt engine build/onnx/smollm2-135m-instruct-fp16 --max-step-tokens 512 --max-context 4096 -o build/engine/fp16
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path

from mistral_trt.export.weights import TENSORRT_INT4_BLOCKS
from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.integrity import hash_file
from mistral_trt.runtime.manifest import ONNX_NAME, WEIGHT_ONLY, Manifest
from mistral_trt.runtime.cuda import gpu_info
from mistral_trt.runtime.engine import PROFILES, TIMING_CACHE, EngineManifest, profile_shapes
from mistral_trt.runtime.manifest import ENGINE_NAME
from mistral_trt.runtime.tensorrt_backend import import_tensorrt


def build_engine(export_dir: str | Path, out: str | Path, max_batch: int = 1, max_step_tokens: int = 512, max_context: int | None = None,
                 timing_cache: str | Path | None = None, workspace_gib: float | None = None, force: bool = False,
                 log=lambda s: print(s, file=sys.stderr, flush=True)) -> EngineManifest:
    from mistral_trt.export.atomic import atomic_folder, check_target

    export_dir = Path(export_dir)
    m = Manifest.load(export_dir)
    check_target(out, "engine", force, inputs=[export_dir])  # before minutes of building
    if m.graph != "portable":
        raise UserError(f"{export_dir}: graph {m.graph!r} uses onnxruntime contrib ops TensorRT does not have; build from "
                        "a --graph portable export")
    precision = (m.precision or {}).get("name")
    if precision == "int4-w4a16" and m.precision.get("block_size") not in TENSORRT_INT4_BLOCKS:
        raise UserError(f"{export_dir}: int4-w4a16 in blocks of {m.precision.get('block_size')}; TensorRT's INT4 "
                        "weight-only GEMM takes blocks of 64 or 128: export it again (the default block is one of those)")
    if precision in WEIGHT_ONLY and m.dtype == "fp32":
        log(f"  warning: {export_dir}: {precision} with fp32 scales: the dequantized weights are fp32, so every GEMM "
            "runs in fp32; export with --dtype fp16 (the default) for TensorRT's fp16 weight-only GEMMs")
    if max_context is None:  # the model's limit, at most 4096 (a 32k profile costs device memory for nothing)
        max_context = min(4096, m.max_context)
    shapes = profile_shapes(m, max_batch, max_step_tokens, max_context)  # bad limits fail before TensorRT is needed
    onnx_path = export_dir / ONNX_NAME
    m.check_files(export_dir)  # building a plan from weights changed after export would hide the change under a new hash
    onnx_sha = m.files[ONNX_NAME]
    trt = import_tensorrt()
    gpu_name, cc = gpu_info(0)  # the builder uses the current device, 0 unless CUDA_VISIBLE_DEVICES says otherwise
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # 10.x: opt in; 11.x: accepted, always on
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    log(f"[1/3] parse {onnx_path} ...")
    if not parser.parse_from_file(str(onnx_path)):  # reads model.onnx.data beside it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse it: " + "; ".join(errors[:3]))
    log(f"[1/3] parsed: {network.num_layers} layers ({time.perf_counter() - t0:.1f}s)")

    config = builder.create_builder_config()
    if m.dtype == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 artifacts are the reference: no 10-bit-mantissa matmuls
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    for name in PROFILES:  # profile index = position in PROFILES; runtime/tensorrt_backend.py relies on it
        profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in shapes[name].items():
            profile.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache_state = use_timing_cache(config, cache_bytes)
    if cache_state in ("foreign", "damaged"):
        what = "a timing cache of another GPU or TensorRT version" if cache_state == "foreign" else "not a timing cache"
        log(f"  warning: {cache_path}: {what}; starting a new one")
    monitor = _Progress(trt, log) if hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:  # the local keeps the Python object alive for the whole build
        config.progress_monitor = monitor

    log(f"[2/3] build on {gpu_name} (compute capability {cc}), TensorRT {trt.__version__}, "
        f"timing cache {'reused' if cache_state == 'reused' else 'new'} ...")
    t1 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"{onnx_path}: TensorRT could not build an engine (its messages are above)")
    build_s = time.perf_counter() - t1
    nbytes = memoryview(plan).nbytes
    log(f"[2/3] built: {nbytes / 2**20:.1f} MiB in {build_s:.0f}s")

    log("[3/3] save engine, timing cache, manifests ...")
    with atomic_folder(out, force, kind="engine", inputs=[export_dir], need_bytes=2 * nbytes) as tmp:
        plan_sha = write_plan(plan, tmp / ENGINE_NAME)
        del plan  # TensorRT's own buffer: the only copy there was
        timing = bytes(config.get_timing_cache().serialize())
        (tmp / TIMING_CACHE).write_bytes(timing)
        if cache_path and cache_state != "damaged":  # never over a file that was not a timing cache
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            part = cache_path.with_suffix(".partial")
            part.write_bytes(timing)
            part.replace(cache_path)
        elif cache_path:
            log(f"  {cache_path} left as it was (not a timing cache); the new one is {out}/{TIMING_CACHE}")
        for name in m.tokenizer_files:
            shutil.copy2(export_dir / name, tmp / name)
        # the export's manifest (model args, IO names, tokenizer, chat format); its files: the plan, the tokenizer
        m.files = {n: hash_file(tmp / n) for n in [ENGINE_NAME, *m.tokenizer_files]}
        m.save(tmp)
        em = EngineManifest(
            tensorrt_version=trt.__version__,
            gpu={"name": gpu_name, "compute_capability": cc},
            profiles=shapes,
            limits={"max_batch": max_batch, "max_step_tokens": max_step_tokens, "max_context": max_context},
            source={"export": str(export_dir.absolute()), "onnx_sha256": onnx_sha, "precision": m.precision.get("name", m.dtype)},
            engine_sha256=plan_sha,
            build={"seconds": round(build_s, 1), "timing_cache": str(cache_path) if cache_path else TIMING_CACHE,
                   "timing_cache_reused": cache_state == "reused", "network_layers": network.num_layers},
        )
        em.save(tmp)
    log(f"wrote {out}")
    return em


def write_plan(plan, path: Path) -> str:
    """Write TensorRT's serialized plan (IHostMemory, a buffer) and return its sha256, straight from TensorRT's
    buffer: bytes(plan) would hold a second copy in host memory (14.5 GB for a 7B fp16 plan)."""
    view = memoryview(plan).cast("B")
    with open(path, "wb") as f:
        f.write(view)
    return hashlib.sha256(view).hexdigest()


def use_timing_cache(config, blob: bytes) -> str:
    """Give the builder the timing cache in `blob`. Returns "reused"; "foreign" (a timing cache of another GPU
    or TensorRT version: TensorRT's set_timing_cache returns False) or "damaged" (not a timing cache at all:
    create_timing_cache returns None, and set_timing_cache(None) would raise TypeError), both of which start
    an empty cache instead; or "new" for an empty blob."""
    cache = config.create_timing_cache(blob) if blob else None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return "reused"
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return "new" if not blob else "damaged" if cache is None else "foreign"


def _Progress(trt, log):
    """A TensorRT IProgressMonitor that prints phases (kernel timing of a 7B model takes minutes)."""

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.t0 = time.perf_counter()
            self.last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                log(f"  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            now = time.perf_counter()
            if now - self.last > 10:  # at most one line per 10 s
                self.last = now
                log(f"  {phase_name}: step {step + 1} ({now - self.t0:.0f}s)")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Progress()
