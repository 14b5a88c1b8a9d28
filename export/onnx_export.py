"""Trace MistralForCausalLM with KV-cache inputs into ONNX.

The graph takes the cache as explicit inputs and returns the grown cache as outputs (names in
runtime/manifest.py), so any runtime can own the cache: keep it whole, or trim it to a sliding window.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mistral_trt.runtime.manifest import DTYPE_BYTES, NUMPY_DTYPE, ONNX_NAME, ModelArgs, io_specs

from . import attention

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # protobuf's 2 GB limit, with room for the graph itself
DTYPE = {"fp32": torch.float32, "fp16": torch.float16}


class KVCacheWrapper(nn.Module):
    """Flat tensors in, flat tensors out: (input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # No config= here: with it DynamicCache builds sliding layers that crop in-graph, and the crop
        # bakes trace-time lengths into the ONNX. The window lives in the attention mask instead.
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        # transformers renamed `past_key_values` to `cache` (argument and output) during 5.x: either works
        named = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{named: cache})
        flat = [out.logits]
        for layer in getattr(out, named).layers:
            flat += [layer.keys, layer.values]
        return tuple(flat)


def trace_inputs(args: ModelArgs, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 5):
    """Example inputs for the trace. past > 0 and seq > 1: an empty past or a single token lets the
    tracer take shortcuts (skip the cache concat, drop the sliding-window mask) that are then baked in."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).repeat(batch, 1)
    kv = [torch.zeros(batch, args.num_kv_heads, past, args.head_dim, dtype=dtype) for _ in range(2 * args.num_layers)]
    return (ids, mask, pos, *kv)


def _rename_dims(model, specs) -> None:
    """torch.export names dynamic dims s0, s1, ...: give them the manifest's names (batch, seq, past, total)."""
    by_name = {t.name: t for t in specs}
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        spec = by_name[value.name]
        value.shape = type(value.shape)([d if isinstance(d, int) else spec_d for d, spec_d in zip(value.shape, spec.dims)])


def skeleton(config: dict, dtype: str) -> nn.Module:
    """MistralForCausalLM for `config` with no weights in memory: its parameters are uninitialised CPU storage
    (`to_empty`: reserved, never touched, so never resident) that the trace reads only the shapes of. The
    rotary module holds no checkpoint weight: it is built for real, so inv_freq is Hugging Face's own."""
    from transformers import MistralConfig, MistralForCausalLM
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    cfg = MistralConfig(**config)
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = MistralForCausalLM(cfg).to(DTYPE[dtype])
    model = model.to_empty(device="cpu").eval()
    model.model.rotary_emb = MistralRotaryEmbedding(config=cfg)  # float32 inv_freq, as from_pretrained keeps it
    return model


def export_streaming(config: dict, args: ModelArgs, dtype: str, weights, folder: Path, qdq=None,
                     edits=None, progress=lambda done, total: None) -> dict:
    """The portable graph straight from the checkpoint, one tensor at a time (export/weights.py).

    The graph is traced from `skeleton` (shapes only) by torch.export (dynamo: the sliding-window mask stays
    symbolic) and optimized by onnxscript's pass, with the weights held out so nothing folds them; then each weight is read from the
    safetensors files, written and freed. What the optimizer would have folded, this writer folds itself:
    MatMul(x, Transpose(W)) -> MatMul(x, W^T), W^T a new initializer. With `qdq` (export/weights.py's WeightQdq) each
    such W^T becomes int8 per channel (int8-w8a16, int8-w8a8) or int4 per block (int4-w4a16) behind
    DequantizeLinear, as it is written.

    `edits` (int8-w8a8: calib/smoothquant.py's SmoothQuantEdits) changes the graph and its weights as they
    stream: edits.prepare(nodes, shapes) once the structure is known (MatMuls read their W^T by name, shapes
    of every float initializer as written), edits.weight(name, w) for every weight before it is written (and
    before int8), edits.finish(graph, add) for the nodes and small initializers it adds.
    Returns {"matmuls": quantized MatMuls, "bytes": their integer + scale bytes}."""
    import onnx
    import onnx_ir as ir
    from onnx import helper
    from torch.export import Dim

    from .weights import TensorSink, raise_opset

    model = skeleton(config, dtype)
    inputs, outputs = io_specs(args, dtype)
    batch, seq, past = Dim("batch"), Dim("seq"), Dim("past")
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: seq},
                      tuple({0: batch, 2: past} for _ in range(2 * args.num_layers)))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    for name in ("onnxscript", "onnx_ir"):  # "skipped deduplication" per held-out weight
        logging.getLogger(name).setLevel(logging.ERROR)
    model.set_attn_implementation(attention.register())
    wrapper = KVCacheWrapper(model, args.num_layers).eval()
    params = {name for name, _ in wrapper.named_parameters()}  # "model.model.layers.0...": the wrapper's prefix
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, trace_inputs(args, DTYPE[dtype]), input_names=[t.name for t in inputs],
                                    output_names=[t.name for t in outputs], dynamic_shapes=dynamic_shapes,
                                    opset_version=OPSET, dynamo=True, optimize=False, verbose=False)
        held = {}
        for name, value in list(program.model.graph.initializers.items()):
            if name in params:  # the checkpoint's weights: out of the optimizer's reach, and never read
                held[name] = value.shape
                value.const_value = None
        program.optimize()
    _rename_dims(program.model, inputs + outputs)
    for name in held:
        if name in program.model.graph.initializers:
            program.model.graph.initializers.pop(name)  # written below, from the checkpoint
    proto = ir.serde.serialize_model(program.model)
    del program, model, wrapper
    g = proto.graph
    for i, n in enumerate(g.node):
        n.name = n.name or f"node_{i}"
    position = {n.name: i for i, n in enumerate(g.node)}
    assert len(position) == len(g.node), "node names must be unique"
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    order = sorted((n for n in held if n in consumers), key=lambda n: min(position[c.name] for c in consumers[n]))
    # The structure first (no weight read yet): which weights are read as they are (embedding Gather, norm Mul),
    # which reach MatMuls through a Transpose (folded: W^T becomes the initializer), and the shapes as written.
    plain, folded, readers, shapes, dead = set(), {}, {}, {}, set()
    for name in order:
        users, shape = consumers[name], tuple(held[name])
        folds = [u for u in users if u.op_type == "Transpose" and all(c.op_type == "MatMul" for c in consumers.get(u.output[0], []))
                 and len(shape) == 2 and [list(a.ints) for a in u.attribute if a.name == "perm"] in ([], [[1, 0]])]
        if len(folds) < len(users):
            plain.add(name)
            shapes[name] = shape
        if folds:
            t_name = folded[name] = f"{name}.T"
            shapes[t_name] = shape[::-1]
            readers[name] = [c for t in folds for c in consumers[t.output[0]]]
            for t in folds:
                dead.add(t.name)
                for c in consumers[t.output[0]]:
                    c.input[:] = [t_name if i == t.output[0] else i for i in c.input]
    if edits is not None:
        edits.prepare([n for n in g.node if n.name not in dead], shapes)
    edit = edits.weight if edits is not None else (lambda name, w: w)
    np_dtype = NUMPY_DTYPE[dtype]
    item = qdq.bits / 8 if qdq is not None else DTYPE_BYTES[dtype]
    sink = TensorSink(folder, external=sum(math.prod(s) for s in held.values()) * item >= EXTERNAL_DATA_THRESHOLD)
    stats = {"matmuls": 0, "bytes": 0}
    new_inits, extra_nodes = [], {}
    first_transpose = {name: next(u.name for u in consumers[name] if u.name in dead) for name in folded}
    for k, name in enumerate(order):
        # checkpoint name: without the wrapper's prefix; a weight to quantize is read in fp32 (an fp16 graph's too)
        w = weights.get(name[len("model."):], "float32" if qdq is not None and name in folded else np_dtype)
        if name in plain:
            new_inits.append(sink.add(name, edit(name, w).astype(np_dtype, copy=False)))
        if name in folded:
            t_name = folded[name]
            wt = edit(t_name, np.ascontiguousarray(w.T))
            del w
            if qdq is not None:
                scheme = qdq.for_weight(t_name)
                calibrated = getattr(edits, "int4_weight", None) if scheme.bits == 4 else None  # GPTQ's weights
                q, scale, zero_point = scheme.quantize(wt.astype(np.float32, copy=False),
                                                       calibrated(name[len("model."):]) if calibrated else None)
                q_name = t_name + scheme.suffix
                new_inits += [sink.add(q_name, q), sink.add(f"{t_name}_scale", scale),
                              sink.add(f"{t_name}_zero_point", zero_point)]
                extra_nodes[first_transpose[name]] = helper.make_node(
                    "DequantizeLinear", [q_name, f"{t_name}_scale", f"{t_name}_zero_point"], [f"{t_name}_dq"],
                    name=f"{t_name}_DequantizeLinear", **scheme.attrs())
                stats["matmuls"] += 1
                stats["bytes"] += q.size * scheme.bits // 8 + scale.nbytes
                for c in readers[name]:
                    c.input[:] = [f"{t_name}_dq" if i == t_name else i for i in c.input]
            else:
                new_inits.append(sink.add(t_name, wt))
            del wt
        progress(k + 1, len(order))
    nodes = []
    for n in g.node:  # the DequantizeLinear takes the place of the Transpose it replaces: order stays topological
        if n.name in extra_nodes:
            nodes.append(extra_nodes[n.name])
        if n.name not in dead:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    if edits is not None:
        edits.finish(g, lambda name, arr: new_inits.append(sink.add(name, arr)))
    sink.close()
    g.initializer.extend(new_inits)
    if qdq is not None:
        raise_opset(proto, qdq.opset)
    onnx.save_model(proto, str(folder / ONNX_NAME))
    return stats

