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
from pathlib import Path

from mistral_trt.runtime.errors import UserError, check_interrupted
from mistral_trt.runtime.integrity import hash_file
from mistral_trt.runtime.manifest import (DTYPE_BYTES, DTYPES, GRAPHS, ONNX_DATA_NAME, ONNX_NAME, Manifest,
                                          fused_io_specs, io_specs)
from mistral_trt.runtime.backend import open_backend

from . import checkpoint as ck
from . import verify as vf
from .atomic import atomic_folder, check_target


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


def check_memory(c: ck.Checkpoint, dtype: str, run_verify: bool, provider: str) -> None:
    """Refuse early, not after minutes of work, when the machine cannot hold the model.

    Measured on Mistral-7B widths (README): export peaks at about one copy of the weights in `dtype`
    plus 1 GiB; onnxruntime's CPU provider holds the weights in float32 (it upcasts fp16 MatMuls),
    plus about 1.5 GiB.
    """
    shapes, _ = ck.expected_shapes(c.config)
    params = sum(math.prod(s) for s in shapes.values())
    need = {"export": params * DTYPE_BYTES[dtype] / 2**30 + 1.0}
    if run_verify and provider == "cpu":
        need["verify on CPU"] = params * 4 / 2**30 + 1.5
    have = available_gib()
    for what, gib in need.items():
        if gib > have:
            hint = ("pass --no-verify here and run `mistral-trt verify EXPORT_DIR --provider cuda` on a GPU host"
                    if what.startswith("verify") else "try --dtype fp16" if dtype == "fp32" else "use a larger machine")
            raise UserError(f"{c.path}: {what} of {params / 1e9:.2f}B parameters in {dtype} needs about {gib:.1f} GiB, "
                            f"{have:.1f} GiB available: {hint}")


def export_model(model: str, out: str | Path, dtype: str = "fp32", force: bool = False, run_verify: bool = True,
                 max_window_check: int = vf.MAX_WINDOW_CHECK, provider: str = "cpu", graph: str = "portable") -> Manifest:
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if graph not in GRAPHS:
        raise UserError(f"--graph {graph!r}: expected one of {', '.join(GRAPHS)}")
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
    check_memory(c, dtype, run_verify, provider)
    with atomic_folder(out, force, kind="export", inputs=[src], need_bytes=output_bytes(c, dtype)) as tmp:
        total = 4 if run_verify else 3
        with stage(1, total, f"load {src} ({dtype})"):
            args = c.args
            torch_model = load_model(c, dtype)
        if graph == "portable":
            with stage(2, total, f"trace {args.num_layers} layers into ONNX (opset 18, KV-cache inputs)"):
                from .onnx_export import export_onnx

                export_onnx(torch_model, args, dtype, tmp)
        else:
            with stage(2, total, f"write {args.num_layers} layers as onnxruntime fused ops (in-place KV cache)"):
                from .fused_graph import build_graph

                build_graph(torch_model, args, dtype, tmp)
        with stage(3, total, "save manifest, tokenizer files and sha256 hashes"):
            manifest = _write_manifest(c, args, dtype, tmp, graph, specials, tokenizer)
        if run_verify:
            with stage(4, total, "verify against PyTorch"):
                scen = vf.scenarios(args, max_window_check=max_window_check)
                refs = vf.reference_logits(torch_model, scen)
                del torch_model  # free it before onnxruntime maps the weights: a 7B model fits only once
                gc.collect()
                _check(tmp, manifest, scen, refs, provider)
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
                    tokenizer: dict) -> Manifest:
    for f in c.tokenizer_files:
        shutil.copy2(f, folder / f.name)
    fmt, template = ck.chat_format(c)
    inputs, outputs = (io_specs if graph == "portable" else fused_io_specs)(args, dtype)
    # every file a runtime reads, so it can refuse one changed after export (runtime/integrity.py)
    names = [n for n in (ONNX_NAME, ONNX_DATA_NAME) if (folder / n).exists()] + [f.name for f in c.tokenizer_files]
    m = Manifest(
        model=args,
        dtype=dtype,
        inputs=inputs,
        outputs=outputs,
        **specials,
        chat_format=fmt,
        chat_template=template,
        tokenizer=tokenizer,
        tokenizer_files=[f.name for f in c.tokenizer_files],
        files={n: hash_file(folder / n) for n in names},
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
    )
    m.save(folder)
    return Manifest.load(folder)  # what every runtime will read: the schema check runs on it now, not later
