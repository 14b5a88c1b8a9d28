"""Reduced-precision artifacts from an fp32 export, each a new export folder with its own manifest.

    fp16        the export's strongly typed fp16 mode (re-exported from the source checkpoint): weights,
                activations and KV cache in fp16, with RMSNorm statistics, RoPE and softmax computed in fp32
                inside the graph (HF's own modelling code does the upcasts)
    int8-w8a16  per-output-channel symmetric int8 weights for every MatMul, as explicit
                DequantizeLinear(int8 weight, fp32 scale, zero point 0, axis=1) in front of the MatMul;
                activations, norms, softmax, masks and the residual stream stay float32

Both are what TensorRT 10/11 wants (strongly typed fp16; explicit symmetric Q/DQ) and run on onnxruntime's
CPU provider, so CI checks them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.manifest import ONNX_DATA_NAME, ONNX_NAME, Manifest

PRECISIONS = ("fp16", "int8-w8a16")
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def quantize(src: str | Path, precision: str, out: str | Path, force: bool = False, calib: str | Path | None = None) -> Manifest:
    from mistral_trt.export.atomic import atomic_folder

    src = Path(src)
    m = Manifest.load(src)
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if m.dtype != "fp32":
        raise UserError(f"{src}: quantize starts from an fp32 export, this one is {m.dtype}")
    if precision == "fp16":
        from mistral_trt.export.pipeline import export_model

        new = export_model(m.source["path"], out, dtype="fp16", force=force)
        new.precision = {"name": "fp16", "method": "export --dtype fp16 (HF modelling code, fp32 norms/RoPE/softmax)",
                         "from": str(src.absolute())}
        new.save(out)
        return new
    with atomic_folder(out, force) as tmp:
        stats = weight_only_int8(src / ONNX_NAME, tmp / ONNX_NAME)
        method = "per-channel symmetric int8 weights (DequantizeLinear, zero point 0)"
        for name in m.tokenizer_files:
            shutil.copy2(src / name, tmp / name)
        from mistral_trt.export.checkpoint import sha256

        m.files = {n: sha256(tmp / n) for n in (ONNX_NAME, ONNX_DATA_NAME) if (tmp / n).exists()}
        m.precision = {"name": precision, "method": method,
                       "from": str(src.absolute()), "quantized_matmuls": stats["matmuls"],
                       "weight_bytes": stats["bytes"], "calibration": None}
        m.verification = []
        m.save(tmp)
    return Manifest.load(out)


def weight_only_int8(src: Path, dst: Path) -> dict:
    """Every MatMul whose second input is a 2-D initializer W [K, N] gets
    DequantizeLinear(round(W / s) int8, s float32 [N], zero point int8 0 [N], axis=1), s = max|W[:, n]| / 127."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    fold_weight_transposes(model)  # a tied lm_head reaches its MatMul through a Transpose: quantize it too
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, done, nbytes = [], {}, 0
    for node in g.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            name = node.input[1]
            if name not in done:
                w = numpy_helper.to_array(inits[name])
                if w.ndim != 2 or w.dtype != np.float32:
                    new_nodes.append(node)
                    continue
                scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
                scale[scale == 0] = 1.0
                q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)  # symmetric: -128 unused
                g.initializer.extend([
                    numpy_helper.from_array(q, f"{name}_int8"),
                    numpy_helper.from_array(scale, f"{name}_scale"),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero_point"),
                ])
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
                                                  [f"{name}_dq"], name=f"{name}_DequantizeLinear", axis=1))
                done[name] = f"{name}_dq"
                nbytes += q.nbytes + scale.nbytes
            node.input[1] = done[name]
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    still_used = {i for node in g.node for i in node.input}
    keep = [t for t in g.initializer if t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(keep)
    external = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    onnx.save(model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True, location=ONNX_DATA_NAME)
    return {"matmuls": len(done), "bytes": nbytes}



def fold_weight_transposes(model) -> int:
    """MatMul(x, Transpose(W)) with W an initializer -> MatMul(x, W^T) with W^T a new initializer (the tied
    lm_head of a model like SmolLM2 reaches the graph this way), so weight quantizers see every weight."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    folded = 0
    for node in g.node:
        p = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if p is not None and p.op_type == "Transpose" and p.input[0] in inits:
            w = numpy_helper.to_array(inits[p.input[0]])
            perm = [a.ints for a in p.attribute if a.name == "perm"]
            wt = np.ascontiguousarray(np.transpose(w, list(perm[0]) if perm else None))
            name = f"{p.input[0]}.T"
            if name not in inits:
                g.initializer.append(numpy_helper.from_array(wt, name))
                inits[name] = g.initializer[-1]
            node.input[1] = name
            folded += 1
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    dead = [n for n in g.node if n.op_type == "Transpose" and n.input[0] in inits and n.output[0] not in used]
    for n in dead:
        g.node.remove(n)
    return folded
