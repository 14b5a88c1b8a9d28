"""The fused graph: Mistral written directly with onnxruntime's fused contrib ops.

`mistral-trt export --graph fused` writes this instead of the traced portable graph. Same weights,
same logits (verify checks it against PyTorch), about a sixth of the nodes, and a KV cache the graph
updates *in place*: one preallocated buffer per layer is bound as both `past` and `present`, so a decode
step reads the cache once and copies nothing (the portable graph's Concat re-writes the whole cache every
step: 5.8 of ~30 ms at 2048 positions on the demo model, scripts/profile_decode.py).

Per layer (x: [B, S, H]):

    x, residual = SkipSimplifiedLayerNormalization(down_prev, residual)    # layer 0: SimplifiedLayerNormalization
    qkv    = MatMul(x, Wqkv)                                                # [B, S, (N + 2 KV) D], q|k|v packed
    attn   = GroupQueryAttention(qkv, past_k, past_v, seqlens_k, ...)      # rotary inside; writes K/V in place
    o      = MatMul(attn, Wo)
    x, residual = SkipSimplifiedLayerNormalization(o, residual)
    gate   = MatMul(x, Wgate); up = MatMul(x, Wup)                         # [B, S, I] each
    down   = MatMul(gate * Sigmoid(gate) * up, Wdown)                       # onnxruntime fuses the SiLU (QuickGelu)

then logits = MatMul(GatherND(norm(x), logits_index), Wlm): only the columns asked for reach lm_head.

The batch is right-padded: row b holds `query_seqlens[b]` real tokens of this step at columns
[0, query_seqlens[b]), and `seqlens_k[b] + 1` is its token count after the step. Positions are implicit
(row b's column s is at absolute position seqlens_k[b] + 1 - query_seqlens[b] + s), which is exactly
what the portable graph computes from attention_mask and position_ids. With a sliding window W the op
keeps the window itself (`sliding_window_cache=1`): the buffer holds C >= W positions and the op evicts
in blocks; queries see keys i-W+1..i, as in Hugging Face.

Only onnxruntime runs this (CPU and CUDA providers); TensorRT takes the portable graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mistral_trt.runtime.manifest import NBITS_PRECISIONS, NUMPY_DTYPE, ONNX_NAME, ModelArgs, fused_io_specs

from .weights import CheckpointWeights, TensorSink, rotary_tables

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # protobuf's 2 GB limit, with room for the graph itself
# int4's lm_head in 8 bits by default (demo, round to nearest: +28.7 % -> +21.8 % perplexity; 2 % more bytes on
# Mistral-7B, 16 % on the demo, whose tied 49k x 576 lm_head is a fifth of its weights), as llama.cpp keeps its
# output tensor at 6 bits.
LM_HEAD_BITS = 8

OPSET = 18
IR_VERSION = 10  # what opset 18 needs, and what the portable exports carry
MS = "com.microsoft"


@dataclass(frozen=True)
class NBits:
    """Weights written as onnxruntime MatMulNBits: symmetric integer blocks of `block_size` input channels, one
    scale per block (in the graph's dtype), activations quantized per block at run time on onnxruntime's CPU
    provider (accuracy_level 4: int8 dot products; its CUDA provider computes in the activations' dtype)."""
    bits: int = 8
    block_size: int = 32
    accuracy_level: int = 4
    lm_head_bits: int | None = None  # int4's lm_head in 8 bits (the default recipe: docs/precision.md), None: `bits`

    def for_lm_head(self) -> "NBits":
        return NBits(self.lm_head_bits or self.bits, self.block_size, self.accuracy_level)

    def quantize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """W [K, N] float32 -> (packed uint8 [N, K/block, block*bits/8], scales float32 [N, K/block]), by the
        same onnxruntime kernel its MatMulNBitsQuantizer calls, so the bits equal `quantize`'s (round to nearest;
        calibrated int4 comes from calib/gptq.py instead)."""
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

        rows, cols = w.shape
        kpack = 8 // self.bits
        blocks = -(-rows // self.block_size)
        if blocks * self.block_size != rows:
            w = np.pad(w, ((0, blocks * self.block_size - rows), (0, 0)))
        packed = np.zeros((cols, blocks, (self.block_size + kpack - 1) // kpack), np.uint8)
        scales = np.zeros((cols, blocks), np.float32)
        zero_points = np.zeros((cols, (blocks + kpack - 1) // kpack), np.uint8)  # symmetric: unused
        fn = {8: quantize_matmul_8bits, 4: quantize_matmul_4bits}[self.bits]
        fn(packed, np.ascontiguousarray(w, np.float32), scales, zero_points, self.block_size, cols, rows, True)
        return packed, scales

    def nbytes(self, k: int, n: int, scale_bytes: int = 4) -> int:
        blocks = -(-k // self.block_size)
        return n * blocks * (self.block_size * self.bits // 8 + scale_bytes)


def activations(dtype: str) -> str:
    """How a MatMulNBits graph of `dtype` computes, for the precision record: fp32 is the CPU form (int8 dot products),
    fp16 the GPU form (the CUDA provider's GroupQueryAttention takes fp16 only)."""
    return ("int8 activations per block at run time (accuracy_level 4)" if dtype == "fp32" else
            "fp16 activations and scales (onnxruntime's CUDA provider form; its CPU provider quantizes them to int8 "
            "per block, accuracy_level 4)")


def nbits_record(precision: str, block_size: int, lm_head_bits: int | None, dtype: str = "fp32") -> dict:
    """The manifest's precision record of the fused MatMulNBits precisions, round to nearest (both roads)."""
    bits = NBITS_PRECISIONS[precision]
    head = f"; lm_head int{lm_head_bits}" if lm_head_bits and lm_head_bits != bits else ""
    return {"name": precision, "method": f"onnxruntime MatMulNBits: symmetric int{bits} weights per block of "
            f"{block_size}{head}, {activations(dtype)}, round to nearest",
            "calibration": None, "block_size": block_size, **({"lm_head_bits": lm_head_bits} if bits == 4 else {})}


def output_bytes(weights: CheckpointWeights, args: ModelArgs, dtype: str, nbits: NBits | None) -> int:
    """Bytes of the weights this writer will produce (the tied embedding is written twice: Gather and lm_head)."""
    item = np.dtype(NUMPY_DTYPE[dtype]).itemsize
    total = 0
    for name, t in weights.index.items():
        n = math.prod(t.shape)
        nb = nbits.for_lm_head() if nbits and name == "lm_head.weight" else nbits
        matrix = nb and len(t.shape) == 2 and name != "model.embed_tokens.weight"
        total += nb.nbytes(t.shape[1], t.shape[0], item) if matrix else n * item
    return total + args.max_position_embeddings * args.head_dim * item  # cos/sin caches


def build_graph(weights: CheckpointWeights, config: dict, args: ModelArgs, dtype: str, folder: Path,
                nbits: NBits | None = None, progress=lambda layer, total: None, awq: dict | None = None,
                int4=None) -> dict:
    """Write folder/model.onnx straight from the checkpoint, one tensor at a time (export/weights.py).

    Each weight is read, converted (transposed to [in, out] for MatMul; with `nbits`, quantized to MatMulNBits
    blocks), written and freed before the next is read; above protobuf's 2 GB limit they stream into
    folder/model.onnx.data. Peak memory is a few copies of the largest tensor, not the model.
    `awq` ((layer, group) -> (s, ...), calib/awq.py): activation-aware scales, applied as the weights stream: the
    rows of the MatMuls reading the group's input times s, 1/s folded into its producer (the RMSNorm gamma before
    q/k/v and gate/up; up_proj's columns before down_proj). `int4` (checkpoint weight name -> MatMulNBits-packed
    (packed, scales) or None; calib/gptq.py's weights, already in AWQ's scaled space): written instead of quantizing.
    Returns {"matmuls": quantized MatMuls, "bytes": their packed weight + scale bytes}."""
    import onnx
    from onnx import TensorProto, helper

    np_dtype = np.dtype(NUMPY_DTYPE[dtype])
    sink = TensorSink(folder, external=output_bytes(weights, args, dtype, nbits) >= EXTERNAL_DATA_THRESHOLD)
    inits: list = []
    nodes: list = []
    stats = {"matmuls": 0, "bytes": 0}

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(sink.add(name, arr))
        return name

    def w(name: str) -> np.ndarray:
        return weights.get(name, np_dtype.name)  # fp16 stays fp16: no fp32 detour

    # the weights of quantized MatMuls are read in fp32 whatever the dtype, so an fp16 graph holds the fp32 graph's
    # integer blocks to the bit and only its scales are rounded to fp16
    wm = w if nbits is None else (lambda name: weights.get(name, "float32"))

    def node(op: str, ins: list[str], outs: list[str], domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, ins, outs, name=f"{op}_{len(nodes)}", domain=domain, **attrs))
        return outs

    def quantized(names: list[str]):
        """The calibrated int4 weights of checkpoint tensors `names`, packed side by side (one MatMul), or None."""
        got = [int4(n) for n in names] if int4 is not None else [None]
        if any(g is None for g in got):
            return None
        return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])

    def matmul(x: str, name: str, wt: np.ndarray, out: str, nb: NBits | None = nbits, sources: list[str] = ()) -> str:
        """x @ wt (wt [in, out]); with nbits the weight is quantized here and never stored as float, or, where
        `int4` holds the checkpoint tensors `sources` (calibrated), written as calibration quantized it."""
        if nb is None:
            return node("MatMul", [x, init(name, wt)], [out])[0]
        pre = quantized(list(sources)) if nb.bits == 4 and sources else None
        packed, scales = pre if pre is not None else nb.quantize(wt)
        k, n = wt.shape
        del wt
        scales = scales.astype(np_dtype)  # MatMulNBits' scales share the activations' type
        stats["matmuls"] += 1
        stats["bytes"] += packed.nbytes + scales.nbytes
        # names as onnxruntime's MatMulNBitsQuantizer gives them, so the two artifacts read alike
        ins = [x, init(f"{name}_Q{nb.bits}", packed), init(f"{name}_scales", scales)]
        nodes.append(helper.make_node("MatMulNBits", ins, [out], name=f"MatMul_{len(nodes)}_Q{nb.bits}", domain=MS,
                                      K=k, N=n, bits=nb.bits, block_size=nb.block_size,
                                      accuracy_level=nb.accuracy_level))
        return out

    a = args
    eps = float(a.rms_norm_eps)
    cos, sin = rotary_tables(config, a.head_dim, a.max_position_embeddings)
    init("cos_cache", cos.astype(np_dtype))
    init("sin_cache", sin.astype(np_dtype))
    init("embed_tokens", w("model.embed_tokens.weight"))
    node("Gather", ["embed_tokens", "input_ids"], ["embeds"])

    gqa = dict(num_heads=a.num_heads, kv_num_heads=a.num_kv_heads, do_rotary=1, rotary_interleaved=0)
    if a.sliding_window is not None:
        gqa.update(local_window_size=a.sliding_window, sliding_window_cache=1)  # W keys, itself included

    awq = awq or {}

    def s_of(i: int, group: str, size: int) -> np.ndarray:
        return awq[i, group][0] if (i, group) in awq else np.ones(size, np.float32)

    down, residual = None, "embeds"
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        s_qkv, s_gu, s_down = s_of(i, "qkv", a.hidden_size), s_of(i, "gate_up", a.hidden_size), \
            s_of(i, "down", a.intermediate_size)
        g_in = init(f"{p}input_layernorm", (w(p + "input_layernorm.weight") / s_qkv).astype(np_dtype)
                    if (i, "qkv") in awq else w(p + "input_layernorm.weight"))
        if i == 0:
            x = node("SimplifiedLayerNormalization", ["embeds", g_in], [f"l{i}.x"], axis=-1, epsilon=eps)[0]
        else:
            x, _, _, residual = node("SkipSimplifiedLayerNormalization", [down, residual, g_in],
                                     [f"l{i}.x", "", "", f"l{i}.res_attn"], domain=MS, epsilon=eps)
        wqkv = np.concatenate([wm(p + f"self_attn.{n}_proj.weight") for n in "qkv"], axis=0).T  # [H, (N+2KV)D]
        qkv = matmul(x, f"{p}qkv_proj", wqkv * s_qkv[:, None] if (i, "qkv") in awq else wqkv, f"l{i}.qkv",
                     sources=[p + f"self_attn.{n}_proj.weight" for n in "qkv"])
        attn = node("GroupQueryAttention",
                    [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                     "total_sequence_length", "cos_cache", "sin_cache"] + [""] * 7 + ["query_seqlens"],
                    [f"l{i}.attn", f"present.{i}.key", f"present.{i}.value"], domain=MS, **gqa)[0]
        o = matmul(attn, f"{p}o_proj", wm(p + "self_attn.o_proj.weight").T, f"l{i}.o",
                   sources=[p + "self_attn.o_proj.weight"])
        g_post = init(f"{p}post_attention_layernorm", (w(p + "post_attention_layernorm.weight") / s_gu).astype(np_dtype)
                      if (i, "gate_up") in awq else w(p + "post_attention_layernorm.weight"))
        x, _, _, residual = node("SkipSimplifiedLayerNormalization", [o, residual, g_post],
                                 [f"l{i}.x2", "", "", f"l{i}.res_mlp"], domain=MS, epsilon=eps)
        # gate and up as two MatMuls, not one packed MatMul + Split: the Split's copy cost more than it saved
        gate = matmul(x, f"{p}gate_proj", wm(p + "mlp.gate_proj.weight").T * s_gu[:, None] if (i, "gate_up") in awq
                      else wm(p + "mlp.gate_proj.weight").T, f"l{i}.gate", sources=[p + "mlp.gate_proj.weight"])
        w_up = wm(p + "mlp.up_proj.weight").T  # [H, I]: rows read x (gate/up's s), columns feed down (down's 1/s)
        if awq:
            w_up = (w_up * s_gu[:, None]) / s_down[None, :]
        up = matmul(x, f"{p}up_proj", w_up, f"l{i}.up", sources=[p + "mlp.up_proj.weight"])
        sig = node("Sigmoid", [gate], [f"l{i}.sig"])[0]
        silu = node("Mul", [gate, sig], [f"l{i}.silu"])[0]
        act = node("Mul", [silu, up], [f"l{i}.act"])[0]
        w_down = wm(p + "mlp.down_proj.weight").T
        down = matmul(act, f"{p}down_proj", w_down * s_down[:, None] if (i, "down") in awq else w_down, f"l{i}.down",
                      sources=[p + "mlp.down_proj.weight"])
        progress(i + 1, a.num_layers)

    g = init("model.norm", w("model.norm.weight"))
    x = node("SkipSimplifiedLayerNormalization", [down, residual, g], ["final_norm"], domain=MS, epsilon=eps)[0]
    # Only the columns in logits_index reach lm_head: generation needs one per row, and lm_head over a
    # whole prompt is a fifth of a prefill's work (576 x 49152 per token on the demo model).
    idx = node("Unsqueeze", ["logits_index", init("axis_2", np.array([2], np.int64))], ["logits_index_3d"])[0]
    x = node("GatherND", [x, idx], ["final_norm_kept"], batch_dims=1)[0]  # [B, logits_len, H]
    matmul(x, "lm_head", wm("lm_head.weight").T, "logits",  # a tied lm_head reads the embedding (weights.py)
           nbits.for_lm_head() if nbits else None)

    inputs, outputs = fused_io_specs(a, dtype)
    elem = {"int64": TensorProto.INT64, "int32": TensorProto.INT32, "float32": TensorProto.FLOAT,
            "float16": TensorProto.FLOAT16}
    vi = lambda t: helper.make_tensor_value_info(t.name, elem[t.dtype], t.dims)  # noqa: E731
    graph = helper.make_graph(nodes, "mistral", [vi(t) for t in inputs], [vi(t) for t in outputs], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="mistral-trt")
    proto.ir_version = IR_VERSION  # onnx's newest by default (14 with onnx 1.23), which onnxruntime < 1.32 refuses
    sink.close()
    path = folder / ONNX_NAME
    onnx.save_model(proto, str(path))
    return stats
