"""`mistral-trt export` and `mistral-trt verify`: stages, progress, atomic output, the manifest.

    export_model("build/smollm2-135m-instruct", "build/onnx/smollm2-135m-instruct", dtype="fp32")

writes the export folder EXPORT_DIR, built beside it and renamed into place only when everything passed
(export/atomic.py):

    EXPORT_DIR/model.onnx            graph (+ weights when under 2 GB)
    EXPORT_DIR/model.onnx.data       weights, only above 2 GB
    EXPORT_DIR/manifest.json         everything a runtime needs (docs/manifest.md)
    EXPORT_DIR/tokenizer.*           the checkpoint's tokenizer files
"""
from __future__ import annotations

import gc
import math
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mistral_trt.runtime.errors import UserError, check_interrupted
from mistral_trt.runtime.integrity import hash_file
from mistral_trt.runtime.manifest import (DTYPE_BYTES, DTYPES, EXPORT_PRECISIONS, GRAPHS, NBITS_PRECISIONS, ONNX_DATA_NAME,
                                          ONNX_NAME, QDQ_PRECISIONS, WEIGHT_ONLY, Manifest, fused_io_specs, io_specs)
from mistral_trt.runtime.backend import open_backend

from . import checkpoint as ck
from . import verify as vf
from .atomic import atomic_folder, check_target
from .weights import WeightQdq, block_size_for, check_block_size, weight_only_record


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def stage(n: int, total: int, what: str):
    t = time.perf_counter()
    check_interrupted()
    log(f"[{n}/{total}] {what} ...")
    yield
    check_interrupted()
    log(f"[{n}/{total}] {what}: done in {time.perf_counter() - t:.1f}s (peak RSS {peak_rss_gib():.2f} GiB)")


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def load_model(c: ck.Checkpoint, dtype: str):
    import torch
    from transformers import MistralForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model, info = MistralForCausalLM.from_pretrained(
        c.path,
        dtype={"fp32": torch.float32, "fp16": torch.float16}[dtype],
        attn_implementation="eager",  # plain ops: exports everywhere, softmax in fp32 even for fp16
        output_loading_info=True,
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys", "unexpected_keys") and v}
    if bad.get("missing_keys") and c.config.get("tie_word_embeddings"):
        bad["missing_keys"] = [k for k in bad["missing_keys"] if k != "lm_head.weight"]
    if any(bad.values()):
        raise UserError(f"{c.path}: weights do not match config.json: {bad}")
    return model.eval()


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from mistral_trt import __version__

    return {
        "mistral_trt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


CALIBRATED_PRECISIONS = ("int8-w8a8", "int4", "int4-w4a16")
CALIB_MESSAGE = "--calib goes with --precision int8-w8a8 (SmoothQuant), int4 or int4-w4a16 (AWQ + GPTQ)"


def check_memory(c: ck.Checkpoint, dtype: str, run_verify: bool, provider: str) -> None:
    """Refuse early, not after minutes of work, when the machine cannot hold the model.

    Both writers stream the checkpoint tensor by tensor: a few float32 copies of the largest tensor plus a fixed
    part (torch, the graph; measured on Mistral-7B shapes: docs/precision.md). Verifying on CPU loads the
    PyTorch model, and onnxruntime's CPU provider holds the weights in float32 (it upcasts fp16 MatMuls),
    plus about 1.5 GiB.
    """
    shapes, _ = ck.expected_shapes(c.config)
    params = sum(math.prod(s) for s in shapes.values())
    largest = max(math.prod(s) for s in shapes.values())
    need = {"export": 4 * largest * 4 / 2**30 + 1.5}
    if run_verify and provider == "cpu":
        need["verify on CPU"] = params * 4 / 2**30 + 1.5
    have = available_gib()
    for what, gib in need.items():
        if gib > have:
            hint = ("pass --no-verify here and run `mistral-trt verify EXPORT_DIR --provider cuda` on a GPU host"
                    if what.startswith("verify") else "use a larger machine")
            raise UserError(f"{c.path}: {what} of {params / 1e9:.2f}B parameters in {dtype} needs about {gib:.1f} GiB, "
                            f"{have:.1f} GiB available: {hint}")


@dataclass(frozen=True)
class Target:
    """What an export writes, as its calibration needs to know it: the precision, the weight block, lm_head's
    bits and the activations' dtype (export_model's own values, so the calibration and the writer cannot
    disagree)."""

    precision: str
    block_size: int
    lm_head_bits: int
    dtype: str = "fp32"


class Calibration:
    """A calibration export_model runs as its first stage (calib/quantize.py's CheckpointW8a8, CheckpointInt4):
    `preflight(checkpoint)` refuses what cannot finish (memory) before the output folder and any work;
    `run(weights, checkpoint, target, log)` returns the edits the graph writer applies."""

    def preflight(self, c) -> None:
        pass

    def run(self, weights, c, target: Target, log):
        raise NotImplementedError


def export_model(model: str, out: str | Path, dtype: str | None = None, force: bool = False, run_verify: bool = True,
                 max_window_check: int = vf.MAX_WINDOW_CHECK, provider: str = "cpu", graph: str = "portable",
                 precision: str | None = None, block_size: int | None = None, calibrate: Calibration | None = None,
                 lm_head_bits: int | None = None) -> Manifest:
    """`dtype` None: fp16 for the weight-only Q/DQ precisions (TensorRT runs their GEMMs on fp16 activations, the
    DequantizeLinear's scale type), else fp32. `block_size` None: the precision's (export/weights.py block_size_for).
    `calibrate` (calib/quantize.py's CheckpointW8a8 or CheckpointInt4), run as the first stage, returns int8-w8a8's
    graph and weight edits (export/onnx_export.py applies them) or int4's calibration (AWQ's scales and GPTQ's
    weights: export/fused_graph.py, or the portable writer's edits); both carry the precision record and their
    report."""
    if dtype is None:
        dtype = "fp16" if precision in WEIGHT_ONLY else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if graph not in GRAPHS:
        raise UserError(f"--graph {graph!r}: expected one of {', '.join(GRAPHS)}")
    if precision is not None:
        if precision not in EXPORT_PRECISIONS:
            raise UserError(f"--precision {precision!r}: expected one of {', '.join(EXPORT_PRECISIONS)}")
        want = "fp16" if precision == "fp16" else "fp32"
        # MatMulNBits takes fp16 activations as well: --dtype fp16 is the GPU form (onnxruntime's CUDA provider runs
        # GroupQueryAttention in fp16 only), fp32 the CPU one (int8 dot products, accuracy_level 4). The weight-only
        # Q/DQ precisions take either (fp16 scales make fp16 GEMMs in TensorRT); int8-w8a8's calibration is fp32.
        free = precision in NBITS_PRECISIONS or precision in WEIGHT_ONLY
        if dtype != want and dtype != "fp32" and not free:
            raise UserError(f"--precision {precision} computes in {want}; leave out --dtype {dtype}")
        dtype = dtype if free else want
        if precision in NBITS_PRECISIONS and graph != "fused":
            hint = "; int4 for TensorRT (Q/DQ, portable graph) is --precision int4-w4a16" if precision == "int4" else ""
            raise UserError(f"--precision {precision} writes onnxruntime MatMulNBits weights: add --graph fused{hint}")
        if precision in QDQ_PRECISIONS and graph != "portable":
            raise UserError(f"--precision {precision} writes explicit Q/DQ (TensorRT): it takes --graph portable")
    if precision == "int8-w8a8" and calibrate is None:
        raise UserError("--precision int8-w8a8 calibrates activations: pass --calib CALIB (from `mistral-trt calibrate`)")
    if calibrate is not None and precision not in CALIBRATED_PRECISIONS:
        raise UserError(CALIB_MESSAGE)
    if lm_head_bits is not None and precision not in ("int4", "int4-w4a16"):
        raise UserError(f"--lm-head-bits goes with --precision int4 or int4-w4a16, not {precision or dtype}")
    if lm_head_bits is None:
        from .fused_graph import LM_HEAD_BITS

        lm_head_bits = LM_HEAD_BITS
    if lm_head_bits not in (4, 8):
        raise UserError(f"--lm-head-bits {lm_head_bits}: expected 4 or 8")
    if block_size is not None:  # a power of two, before anything is read (int4-w4a16's TensorRT rule: below)
        check_block_size(precision, block_size)
    if precision not in (None, "fp32", "fp16"):
        run_verify = False  # quantized weights are not PyTorch's: `mistral-trt eval` measures their quality
    if graph == "fused" and provider == "tensorrt":
        raise UserError("--graph fused runs on onnxruntime's cpu or cuda provider; TensorRT takes --graph portable")
    if max_window_check < 1:
        raise UserError(f"--max-window-check {max_window_check}: expected an integer >= 1")
    src = ck.resolve(model)
    out = check_target(out, "export", force, inputs=[src])  # before the (slow) checks of the checkpoint
    c = ck.inspect_checkpoint(src)
    ck.check_weights(c)
    specials = ck.special_tokens(c)
    tokenizer = ck.tokenizer_record(c, specials)
    args = c.args
    block_size = block_size_for(precision, block_size, args)  # int4-w4a16: TensorRT's blocks divide the model's sizes
    nbits = qdq = None
    if precision in NBITS_PRECISIONS:
        from .fused_graph import NBits

        bits = NBITS_PRECISIONS[precision]
        nbits = NBits(bits=bits, block_size=block_size, lm_head_bits=lm_head_bits if bits == 4 else None)
    elif precision in QDQ_PRECISIONS:
        qdq = WeightQdq.of(precision, block_size, lm_head_bits, dtype)
    from .weights import CheckpointWeights

    weights = CheckpointWeights(c.weight_files, args.tie_word_embeddings)
    if graph == "fused":
        from .fused_graph import output_bytes as fused_bytes

        need_bytes = fused_bytes(weights, args, dtype, nbits) + (64 << 20)
    else:
        need_bytes = output_bytes(c, "fp16" if precision in QDQ_PRECISIONS else dtype)  # int8 + scales < fp16
    check_memory(c, dtype, run_verify, provider)
    if calibrate is not None:
        calibrate.preflight(c)  # a calibration's own refusals (memory), before the output folder and any work
    kinds = ", ".join(sorted({t.dtype for t in weights.index.values()}))
    what = (f"{precision} (MatMulNBits, block {block_size})" if nbits else
            "int8-w8a16 (per-channel int8 weights behind DequantizeLinear)" if precision == "int8-w8a16" else
            f"int4-w4a16 (int4 weights per block of {block_size} behind DequantizeLinear)" if precision == "int4-w4a16" else
            "int8-w8a8 (SmoothQuant, int8 weights and activations as Q/DQ)" if precision == "int8-w8a8" else dtype)
    with atomic_folder(out, force, kind="export", inputs=[src], need_bytes=need_bytes) as tmp:
        total = (3 if run_verify else 2) + (calibrate is not None)
        n, edits = 0, None
        if calibrate is not None:
            n += 1
            with stage(n, total, f"calibrate activations on {src}, one decoder layer at a time (torch)"):
                edits = calibrate.run(weights, c, Target(precision, block_size, lm_head_bits, dtype), log)

        def progress(i, count):
            check_interrupted()
            if i == count or i % max(1, count // 8) == 0:
                log(f"  {i}/{count} {'layers' if graph == 'fused' else 'weights'} written ({time.perf_counter() - t0:.0f}s, "
                    f"peak RSS {peak_rss_gib():.2f} GiB)")

        n += 1
        t0 = time.perf_counter()
        if graph == "portable":
            with stage(n, total, f"trace {args.num_layers} layers into ONNX (opset 18, KV-cache inputs) and stream "
                                 f"{src} ({kinds}) into it as {what}, tensor by tensor"):
                from .onnx_export import export_streaming

                stats = export_streaming(c.config, args, dtype, weights, tmp, qdq=qdq,
                                         edits=edits, progress=progress)
        else:
            with stage(n, total, f"stream {src} ({kinds}) into {what}: {args.num_layers} layers of onnxruntime fused "
                                 "ops, tensor by tensor"):
                from .fused_graph import build_graph

                stats = build_graph(weights, c.config, args, dtype, tmp, nbits=nbits, progress=progress,
                                    awq=edits.scales if edits is not None else None,
                                    int4=edits.int4_weight if edits is not None else None)
        n += 1
        with stage(n, total, "save manifest, tokenizer files and sha256 hashes"):
            precision_record = None
            if precision in ("int4", "int4-w4a16") and edits is not None:  # calibrated (calib/awq.py, gptq.py)
                for name, text in edits.files().items():
                    (tmp / name).write_text(text)
                precision_record = {**edits.record(), "block_size": block_size, "lm_head_bits": lm_head_bits,
                                    "from": str(src.absolute()), "quantized_matmuls": stats["matmuls"],
                                    "weight_bytes": stats["bytes"]}
            elif nbits is not None:
                from .fused_graph import nbits_record

                precision_record = {**nbits_record(precision, block_size, nbits.lm_head_bits, dtype),
                                    "from": str(src.absolute()),
                                    "quantized_matmuls": stats["matmuls"], "weight_bytes": stats["bytes"]}
            elif precision in WEIGHT_ONLY:
                precision_record = {**weight_only_record(precision, block_size, lm_head_bits, dtype), "from": str(src.absolute()),
                                    "quantized_matmuls": stats["matmuls"], "weight_bytes": stats["bytes"]}
            elif precision == "int8-w8a8":
                for name, text in edits.files().items():
                    (tmp / name).write_text(text)
                precision_record = {**edits.record(), "from": str(src.absolute()), "quantized_matmuls": stats["matmuls"],
                                    "weight_bytes": stats["bytes"]}
            elif precision == "fp16":
                precision_record = {"name": "fp16", "method": "export --dtype fp16 (HF modelling code, fp32 norms/RoPE/"
                                    "softmax)", "from": str(src.absolute())}
            manifest = _write_manifest(c, args, dtype, tmp, graph, specials, tokenizer, precision_record)
        if run_verify:
            with stage(n + 1, total, "verify against PyTorch"):
                scen = vf.scenarios(args, max_window_check=max_window_check)
                refs = vf.reference_logits(load_model(c, dtype), scen)
                gc.collect()  # free the model before onnxruntime maps the weights: a 7B model fits only once
                _check(tmp, manifest, scen, refs, provider)
        elif precision not in (None, "fp32", "fp16"):
            log("not checked against PyTorch: quantized weights differ from it by design; "
                "`mistral-trt eval` measures their quality")
    log(f"wrote {out}")
    return manifest


def output_bytes(c: ck.Checkpoint, dtype: str) -> int:
    """What an export writes: the weights in `dtype` (a tied embedding once), plus a little for the graph."""
    shapes, _ = ck.expected_shapes(c.config)
    params = sum(math.prod(s) for s in shapes.values())
    return int(params * DTYPE_BYTES[dtype] * 1.02) + (64 << 20)


def _check(folder: Path, manifest: Manifest, scen, refs, provider: str) -> list[vf.CheckResult]:
    backend = open_backend(folder, provider)
    log(f"onnxruntime providers: {', '.join(backend.session.get_providers())}")
    results = vf.verify(backend, scen, refs)
    print(vf.table(results, manifest.dtype), flush=True)
    manifest.verification = vf.as_rows(results)
    manifest.save(folder)
    failed = [r.name for r in results if not r.passed]
    if failed:
        raise VerifyFailed(f"verification failed ({vf.criteria(manifest.dtype)}): {', '.join(failed)}")
    return results


class VerifyFailed(UserError):
    pass


def verify_export(export_dir: str | Path, model: str | None = None, max_window_check: int = vf.MAX_WINDOW_CHECK,
                  provider: str = "cpu"):
    """`mistral-trt verify EXPORT_DIR [--model CHECKPOINT]`: reload the PyTorch model and check the ONNX again."""
    export_dir = Path(export_dir)
    manifest = Manifest.load(export_dir)
    if manifest.graph != "portable" and provider == "tensorrt":
        raise UserError("--provider tensorrt runs the portable graph; this export is graph 'fused'")
    log(f"checking the sha256 of every file against {export_dir / 'manifest.json'} ...")
    manifest.check_files(export_dir, full=True)  # always in full here, whatever was remembered
    path = model or manifest.source.get("path")
    if not isinstance(path, str) or not path:
        raise UserError(f"{export_dir / 'manifest.json'}: field 'source.path' names no checkpoint; pass --model MODEL")
    src = ck.resolve(path)
    c = ck.inspect_checkpoint(src)
    if c.args != manifest.model:
        raise UserError(f"{src}: its config.json does not describe the model in {export_dir}/manifest.json")
    log(f"reference: {src} in {manifest.dtype}")
    scen = vf.scenarios(manifest.model, max_window_check=max_window_check)
    refs = vf.reference_logits(load_model(c, manifest.dtype), scen)
    gc.collect()
    return _check(export_dir, manifest, scen, refs, provider)


def _write_manifest(c: ck.Checkpoint, args, dtype: str, folder: Path, graph: str, specials: dict,
                    tokenizer: dict, precision: dict | None = None) -> Manifest:
    for f in c.tokenizer_files:
        shutil.copy2(f, folder / f.name)
    fmt, template = ck.chat_format(c)
    inputs, outputs = (io_specs if graph == "portable" else fused_io_specs)(args, dtype)
    tokenizer_files = [f.name for f in c.tokenizer_files]
    if "tokenizer_config.json" not in tokenizer_files:
        tokenizer_files.append("tokenizer_config.json")  # written below (export/interop.py)
    m = Manifest(
        model=args,
        dtype=dtype,
        inputs=inputs,
        outputs=outputs,
        **specials,
        chat_format=fmt,
        chat_template=template,
        tokenizer=tokenizer,
        tokenizer_files=tokenizer_files,
        files={},
        cache={
            "position_ids": "absolute" if graph == "portable" else "implicit",  # never reset when the cache is trimmed
            "keep": None if args.sliding_window is None else args.sliding_window - 1,
            "max_context": args.max_position_embeddings,
            # fused: one buffer per layer bound as past and present, capacity >= the window when there is one
            "layout": "double-buffer" if graph == "portable" else "in-place",
        },
        graph=graph,
        source={"path": str(c.path.absolute()), "weights": {f.name: ck.sha256(f) for f in c.weight_files}},
        versions=versions(),
        precision=precision or {},
    )
    return save_with_files(m, folder)


def save_with_files(m: Manifest, folder: Path) -> Manifest:
    """Write the files other clients read (export/interop.py), hash every file a runtime reads into the
    manifest, save it and read it back: the schema check runs on what every runtime will read, now."""
    from mistral_trt.runtime.tokenizer import Tokenizer

    from .interop import write_interop_files

    tok = Tokenizer.load(folder / m.tokenizer["file"])
    interop = write_interop_files(folder, m, tok.id_to_piece)
    names = [n for n in (ONNX_NAME, ONNX_DATA_NAME) if (folder / n).exists()]
    names += [n for n in dict.fromkeys(m.tokenizer_files + interop)]
    m.files = {n: hash_file(folder / n) for n in names}
    m.save(folder)
    return Manifest.load(folder)
