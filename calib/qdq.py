"""Explicit Q/DQ in an ONNX graph, the form TensorRT 10/11 reads as int8 and int4 kernels (strongly typed, no
calibrator): integer weights behind `DequantizeLinear` (int8 per output channel, or int4 per block of input
channels; symmetric, zero point 0), and the graph edits that make every weight visible to it. Used by
calib/quantize.py (int8-w8a16, int4-w4a16) and calib/smoothquant.py (int8-w8a8).

    model = onnx.load("EXPORT_DIR/model.onnx")
    fold_weight_transposes(model)        # a tied lm_head reaches its MatMul through a Transpose
    stats = weight_only_model(model, WeightQdq(4, 32))
    save_model(model, Path("NEW_EXPORT_DIR/model.onnx"))
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mistral_trt.export.weights import WeightQdq, raise_opset
from mistral_trt.runtime.manifest import ONNX_DATA_NAME

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def weight_only(src: Path, dst: Path, qdq: WeightQdq) -> dict:
    import onnx

    model = onnx.load(str(src))
    fold_weight_transposes(model)  # a tied lm_head reaches its MatMul through a Transpose: quantize it too
    stats = weight_only_model(model, qdq)
    raise_opset(model, qdq.opset)
    save_model(model, dst)
    return stats


def save_model(model, dst: Path) -> None:
    import onnx

    external = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    onnx.save(model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True, location=ONNX_DATA_NAME)


def weight_only_model(model, qdq: WeightQdq = WeightQdq(8)) -> dict:
    """Every MatMul whose second input is a 2-D initializer W [K, N] gets DequantizeLinear(q, s, zero point 0):
    int8 q = round(W / s), s float32 [N] = max|W[:, n]| / 127, axis=1; or int4 q per block of input channels,
    s [K / block, N], axis=0 (export/weights.py's WeightQdq)."""
    from onnx import helper, numpy_helper

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
                scheme = qdq.for_weight(name)
                q, scale, zero_point = scheme.quantize(w)
                g.initializer.extend([
                    numpy_helper.from_array(q, name + scheme.suffix),
                    numpy_helper.from_array(scale, f"{name}_scale"),
                    numpy_helper.from_array(zero_point, f"{name}_zero_point"),
                ])
                new_nodes.append(helper.make_node("DequantizeLinear", [name + scheme.suffix, f"{name}_scale",
                                                                       f"{name}_zero_point"],
                                                  [f"{name}_dq"], name=f"{name}_DequantizeLinear", **scheme.attrs()))
                done[name] = f"{name}_dq"
                nbytes += q.size * scheme.bits // 8 + scale.nbytes
            node.input[1] = done[name]
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    still_used = {i for node in g.node for i in node.input}
    keep = [t for t in g.initializer if t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(keep)
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
